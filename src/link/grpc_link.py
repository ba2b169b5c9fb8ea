"""The edge's side of the network link: `GrpcLink`, a `Link` over one gRPC stream per session.

    link = GrpcLink("grpc://cloud.example:50051", tls_ca="ca.pem", token="...")
    edge = build_edge(..., link=link)
    edge.generate(...)

A START message (the first request of every `Edge.generate` or `Session`) opens a new bidirectional
stream to `/triadic.Cloud/Session` (closing the previous one); every later request, the TURN messages
of a session's later requests included, goes down that stream and waits, at most `timeout` seconds,
for its one reply. Any failure (cloud unreachable, message
refused, stream lost, no reply in time) raises `TriadicError` with one line; the stream is then
dropped (cancelled: the cloud stops computing), so the next generation starts over with a fresh session.

Failover: given several URLs (`grpc://a:50051,grpc://b:50051`), the link keeps the session's uplink
messages (`ReplayLog`). When the serving cloud fails mid-session (connection lost, UNAVAILABLE, no
reply in time, ...; not when it refuses a message), the link opens a session on the next URL,
replays the messages there, sends the pending one and goes on: the edge does not notice, and the
tokens are those of an uninterrupted run, for lossy codecs too. `failovers` and `replayed_bytes`
count what happened in the current session.

URLs: `grpc://host:port` (plaintext, or TLS where a CA is given) and `grpcs://host:port` (TLS; the
system's roots unless a CA is given). The port defaults to 50051.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import zlib
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

# gRPC's C core logs a TLS handshake failure on stderr by itself, before our one error line says the
# same; silence it (set before grpc is first imported; GRPC_VERBOSITY=INFO in the environment brings it back).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
import grpc  # noqa: E402

from ..utils import ProtocolError, TriadicError, check_seconds, log, read_file, read_token
from .protocol import MAGIC, PAST_LIFETIME, Kind

SESSION_METHOD = "/triadic.Cloud/Session"
BATCHING_METADATA = "triadic-batching"  # the cloud batches sessions together (src/serve/cloud_server.py)
STATS_METHOD = "/triadic.Cloud/Stats"
DEFAULT_PORT = 50051
_END = object()  # the reply queue's marker: the cloud ended the stream


class LinkError(TriadicError):
    """The link failed; `code` is the gRPC status name where the cloud or gRPC gave one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class RejectedError(LinkError, ProtocolError):
    """The cloud refused a message (INVALID_ARGUMENT): the details are its one-line reason."""


class SessionRefused(RejectedError):
    """A cloud refused the session's START (other split sets, another model): the next cloud named may serve it."""


def parse_url(url: str) -> tuple[str, bool]:
    """'grpc://host:port' -> ('host:port', tls_required). Raises TriadicError on anything else."""
    text = url.strip()
    if "://" not in text:
        text = "grpc://" + text
    try:
        parts = urlsplit(text)
    except ValueError as error:  # e.g. an unclosed IPv6 bracket
        raise TriadicError(f"--cloud {url}: {error}") from None
    if parts.scheme not in ("grpc", "grpcs"):
        raise TriadicError(f"--cloud {url}: expected grpc://host:port or grpcs://host:port")
    try:
        port = parts.port
    except ValueError:
        raise TriadicError(f"--cloud {url}: bad port") from None
    host = parts.hostname
    if not host or (parts.path not in ("", "/")) or parts.query or parts.username:
        raise TriadicError(f"--cloud {url}: expected grpc://host:port")
    port = DEFAULT_PORT if port is None else port
    if not 0 < port <= 65535:
        raise TriadicError(f"--cloud {url}: port {port} is outside [1, 65535]")
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}", parts.scheme == "grpcs"


def _is_start(data: bytes) -> bool:
    return len(data) >= 4 and data[:2] == MAGIC and data[3] == Kind.START


class _Stream:
    """One session: a request queue feeding the call, a thread moving replies into a queue."""

    def __init__(self, channel: grpc.Channel, metadata) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        method = channel.stream_stream(SESSION_METHOD)  # no serializers: bytes in, bytes out
        self.call = method(self._request_iterator(), metadata=metadata)
        self.reader = threading.Thread(target=self._read, name="grpc-link-reader", daemon=True)
        self.reader.start()

    def _request_iterator(self):
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for reply in self.call:
                self.replies.put(reply)
            self.replies.put(_END)
        except grpc.RpcError as error:
            self.replies.put(error)
        except Exception as error:  # never leave request() waiting on a dead reader
            self.replies.put(error)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self.call.cancel()
        self.requests.put(None)  # half-close (the cloud frees the session); ends the request iterator


class ReplayLog:
    """The current session's uplink messages, as sent, and a CRC of each reply: what a second cloud
    needs to rebuild the first one's state.

    Replaying the same bytes in the same order makes a fresh cloud run the same chunks on the same
    inputs, so its caches, and its replies, are those of the cloud that failed, for lossy codecs
    too. It holds every position as many times as it crossed the link: once at a fixed split, 2.48
    times on average with moving cuts {1..6}/{24..29} (README, "Failover"). The CRCs check that the
    new cloud did reproduce the old one's replies; where the old one batched this session with
    others (`batched`, from its stream's metadata), they may differ in the last bits, and a
    mismatch is reported as expected.
    """

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.reply_crcs: list[int] = []
        self.bytes = 0
        self.batched = False  # a cloud that batches sessions served some of them: CRCs may differ on replay

    def reset(self) -> None:
        self.messages, self.reply_crcs, self.bytes, self.batched = [], [], 0, False

    def append(self, request: bytes, reply: bytes) -> None:
        self.messages.append(request)
        self.reply_crcs.append(zlib.crc32(reply))
        self.bytes += len(request)

    def __len__(self) -> int:
        return len(self.messages)


# Failures after which another cloud may serve the session: the cloud is gone, hung, full (at START)
# or broke. Not INVALID_ARGUMENT or a message over a limit (another cloud would refuse them too), nor
# auth and method errors.
PAST_LIFETIME_CODE = "SESSION_LIFETIME"  # our code for a cloud's DEADLINE_EXCEEDED that says the session outlived its lifetime
FAILOVER_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL", "RESOURCE_EXHAUSTED", "ABORTED",
                            PAST_LIFETIME_CODE, None})
# Of those, the ones after which the same cloud may serve the session again at once: it restarted, or it
# dropped the session (idle timeout, a stop, its lifetime: an edge server's one session outlives it) and is up.
# Not a hung cloud or a full one.
REOPEN_CODES = frozenset({"UNAVAILABLE", "CANCELLED", "UNKNOWN", "INTERNAL", "ABORTED", PAST_LIFETIME_CODE, None})


class _Endpoint:
    """One cloud URL and its channel (made on first use, remade after a failure)."""

    def __init__(self, url: str, credentials, options) -> None:
        self.target, tls_required = parse_url(url)
        self.tls = tls_required or credentials is not None
        if tls_required and credentials is None:
            credentials = grpc.ssl_channel_credentials()
        self._credentials, self._options = credentials, options
        self._channel: grpc.Channel | None = None
        self.broken = False

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is not None and self.broken:  # connect from scratch, without inherited backoff
            self._channel.close()
            self._channel = None
        if self._channel is None:
            self.broken = False
            if self._credentials is not None:
                self._channel = grpc.secure_channel(self.target, self._credentials, options=self._options)
            else:
                self._channel = grpc.insecure_channel(self.target, options=self._options)
        return self._channel

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class GrpcLink:
    """`Link` to a cloud served by `python -m src.serve.cloud_server`, failing over to the next URL where it has several."""

    def __init__(
        self,
        url: str | Sequence[str] = "grpc://127.0.0.1:50051",
        tls_ca: bytes | str | None = None,
        token: str | None = None,
        timeout: float = 120.0,
        tls_server_name: str | None = None,
        max_message_bytes: int = -1,
    ) -> None:
        """`url`: one URL or several (a list, or comma-separated): the first serves, the others take
        over a session when it fails. `tls_ca`: PEM bytes (or a path) of the CA that signed the
        clouds' certificates; TLS is used when it is given or the URL is grpcs://. `timeout`:
        seconds to wait for each reply. `tls_server_name`: the name the certificates must carry,
        where it is not the host dialled (e.g. dialling 127.0.0.1 with a certificate for a DNS name)."""
        urls = [u for u in url.split(",") if u.strip()] if isinstance(url, str) else list(url)
        if not urls:
            raise TriadicError("--cloud: no URL given")
        if isinstance(tls_ca, str):
            tls_ca = read_file(tls_ca, "--tls-ca")
        self.timeout = check_seconds(float(timeout), "--cloud-timeout")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Own subchannels: a link rebuilt after a failure connects afresh instead of
            # inheriting another channel's reconnect backoff (a restarted cloud is found at once).
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca) if tls_ca is not None else None
        self._endpoints = [_Endpoint(u, credentials, options) for u in urls]
        plain = [endpoint.target for endpoint in self._endpoints if not endpoint.tls]
        if tls_server_name and plain:  # a name to check, on a link that checks none: refuse rather than mislead
            raise TriadicError(f"--tls-server-name {tls_server_name}: the link to {plain[0]} is not TLS; "
                               "it goes with --tls-ca or a grpcs:// URL")
        self._current = 0
        self._stream: _Stream | None = None
        self._lock = threading.Lock()
        self.requests = 0
        self.replay = ReplayLog()
        self.failovers = 0  # of the current session (since its START)
        self.replayed_bytes = 0  # of the current session
        self.replay_mismatches = 0  # replayed replies whose CRC differs from the first cloud's
        self.cloud_batches = False  # the serving cloud batches sessions together (its stream's metadata says so)
        self._check: Callable[[], None] | None = None  # run between replayed messages (`watch`)

    def watch(self, check: Callable[[], None] | None) -> None:
        """Run `check` before each message a failover or a reopening replays (it raises to stop the request); None: no
        longer. A replay is one round trip per message the session sent (hundreds after a long conversation): an edge
        server's time limit and its client's leaving must reach it (they did not: 16.4 s under --time-limit 4)."""
        self._check = check

    @property
    def target(self) -> str:
        """host:port of the cloud serving now."""
        return self._endpoints[self._current].target

    @property
    def tls(self) -> bool:
        return self._endpoints[self._current].tls

    @property
    def channel(self) -> grpc.Channel:
        return self._endpoints[self._current].channel

    # -- Link ------------------------------------------------------------------------------------
    def request(self, data: bytes) -> bytes:
        data = bytes(data)
        with self._lock:
            if _is_start(data):
                self.replay.reset()
                self.failovers = self.replayed_bytes = 0
            try:
                reply = self._send(data, new_stream=_is_start(data) or self._stream is None)
            except LinkError as error:
                if isinstance(error, RejectedError) and _is_start(data) and len(self._endpoints) > 1:
                    error = SessionRefused(str(error), error.code)  # this cloud cannot serve the session: the next may
                elif isinstance(error, RejectedError) or error.code not in FAILOVER_CODES:
                    raise
                if error.code == "RESOURCE_EXHAUSTED" and not _is_start(data):
                    raise  # a limit on this message, not a full cloud: another cloud would refuse it too
                reply = self._fail_over(data, error) if len(self._endpoints) > 1 else self._reopen(data, error)
            self.replay.append(data, reply)
            self.replay.batched |= self.cloud_batches
            self.requests += 1
            return reply

    def _send(self, data: bytes, new_stream: bool = False) -> bytes:
        """One request on the current stream (a new one where asked); LinkError, with the stream dropped, on failure."""
        if new_stream:
            previous = self._stream
            self._end_stream()
            if previous is not None:  # let the cloud free the last session first: a full cloud counts it until then
                previous.reader.join(timeout=min(2.0, self.timeout))
            self._stream = _Stream(self.channel, self.metadata)
        stream = self._stream
        assert stream is not None, "a request without a stream"  # new_stream is asked for whenever there is none
        stream.requests.put(data)
        try:
            item = stream.replies.get(timeout=self.timeout)
        except queue.Empty:
            self._drop_stream()
            raise LinkError(f"cloud at {self.target} did not reply within {self.timeout:g} s", "DEADLINE_EXCEEDED") from None
        if isinstance(item, bytes):
            if new_stream:  # the metadata came before the reply: reading it does not wait
                self.cloud_batches = any(key == BATCHING_METADATA for key, _ in stream.call.initial_metadata() or ())
            return item
        self._drop_stream()
        if item is _END:
            raise LinkError(f"cloud at {self.target} ended the session without a reply")
        raise self._error(item) from None

    def _fail_over(self, data: bytes, error: LinkError) -> bytes:
        """Open the session on the next cloud, replay this session's messages, then send `data` there."""
        for _ in range(len(self._endpoints) - 1):
            failed = self.target
            self._current = (self._current + 1) % len(self._endpoints)
            log(f"note: {error}; failing over to {self.target}, replaying {len(self.replay)} messages ({self.replay.bytes} bytes)")
            try:
                return self._replay_then_send(data, failed)
            except SessionRefused as refused:
                error = refused
            except RejectedError:
                raise
            except LinkError as next_error:
                if next_error.code not in FAILOVER_CODES:
                    raise
                error = next_error
        raise error

    def _reopen(self, data: bytes, error: LinkError) -> bytes:
        """With one cloud: open the session there again, once, replay it and send `data`; else raise `error`.

        A cloud that restarted, or that dropped the session while it stayed up (its idle timeout, between
        two requests of a conversation; its lifetime, under an edge server's one session), then serves it
        again as a second cloud would. Only a session that
        was open: a START that failed (nothing listening, a certificate refused) would fail the same way
        again. Where the cloud is still down the cause stays the first failure's, which says what happened."""
        if _is_start(data) or error.code not in REOPEN_CODES:
            raise error
        log(f"note: {error}; opening the session at {self.target} again, replaying {len(self.replay)} messages ({self.replay.bytes} bytes)")
        try:
            return self._replay_then_send(data, self.target)
        except RejectedError:
            raise
        except LinkError as retry_error:
            raise LinkError(f"{error} (opening it again: {retry_error})", error.code) from None

    def _replay_then_send(self, data: bytes, failed: str) -> bytes:
        """On a new stream to the current cloud: this session's messages again, then `data`; its reply."""
        mismatches = 0
        for i, message in enumerate([*self.replay.messages, data]):
            if self._check is not None:
                self._check()
            try:
                reply = self._send(message, new_stream=i == 0)
            except RejectedError as error:
                if i == 0 and _is_start(message):  # the session's START: this cloud has other split sets or another model
                    raise SessionRefused(str(error), error.code) from None
                raise
            if i < len(self.replay):
                mismatches += zlib.crc32(reply) != self.replay.reply_crcs[i]
        if mismatches:
            self.replay_mismatches += mismatches
            why = ("expected: it batched this session with others, which changes the last bits"
                   if self.replay.batched else "another build or device?")
            log(f"note: {mismatches} of {len(self.replay)} replayed replies from {self.target} differ from {failed}'s "
                f"({why}): the tokens may differ from an uninterrupted run")
        self.failovers += 1
        self.replayed_bytes += self.replay.bytes
        return reply

    # -- session and channel -----------------------------------------------------------------------
    def cancel(self) -> None:
        """Abort the current session's stream (as a client killed mid-generation would)."""
        with self._lock:
            self._end_stream(cancel=True)

    def end_session(self) -> None:
        """Half-close the current stream and wait (2 s at most) until the cloud has freed the session."""
        with self._lock:
            stream = self._stream
            self._end_stream()
        if stream is not None:
            stream.reader.join(timeout=min(2.0, self.timeout))

    def close(self) -> None:
        """End the session (the cloud frees it at once) and the channels."""
        with self._lock:
            stream = self._stream
            self._end_stream()
            if stream is not None:
                stream.reader.join(timeout=2.0)  # let the half-close reach the cloud before the channel goes
            for endpoint in self._endpoints:
                endpoint.close()

    def __enter__(self) -> GrpcLink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """The serving cloud's /triadic.Cloud/Stats: open sessions, computations, memory, ..."""
        with self._lock:
            channel = self.channel
        try:
            raw = channel.unary_unary(STATS_METHOD)(b"", metadata=self.metadata, timeout=min(self.timeout, 30.0))
        except grpc.RpcError as error:
            raise self._error(error) from None
        return json.loads(raw)

    def _end_stream(self, cancel: bool = False) -> None:
        if self._stream is not None:
            self._stream.close(cancel)
            self._stream = None

    def _drop_stream(self) -> None:
        """After a failure: cancel the stream (the cloud stops its computation) and reconnect next time."""
        self._end_stream(cancel=True)
        self._endpoints[self._current].broken = True

    def _error(self, error: BaseException) -> LinkError:
        if not isinstance(error, grpc.RpcError) or not hasattr(error, "code"):
            return LinkError(f"link to the cloud at {self.target} failed: {type(error).__name__}: {error}")
        code = error.code()
        details = (error.details() or "").strip().splitlines()
        details = details[0] if details else ""
        name = code.name if code is not None else "UNKNOWN"
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return RejectedError(f"cloud at {self.target} rejected the message: {details}", name)
        if code is grpc.StatusCode.UNAVAILABLE:
            lowered = details.lower()
            if "hostname verification" in lowered:
                hint = " (the server's certificate does not name this host; --tls-server-name names the one it does)"
            elif "certificate_verify_failed" in lowered:
                hint = " (the server's certificate is not signed by --tls-ca)"
            elif "handshake" in lowered:
                hint = " (TLS on one side only? --tls-ca turns it on at the edge, --tls-cert at the server)"
            elif "socket closed" in lowered:
                hint = " (the cloud went away; or TLS is on at one side only: --tls-ca turns it on at the edge, --tls-cert at the server)"
            elif "refused" in lowered:
                hint = " (is the cloud server running there?)"
            else:
                hint = ""
            return LinkError(f"cloud unreachable at {self.target}: {details}{hint}", name)
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return LinkError(f"cloud at {self.target} refused the token: {details}", name)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            if "sessions at once" in details:
                return LinkError(f"cloud at {self.target} is out of capacity: {details}", name)
            return LinkError(f"cloud at {self.target} refused the message as too large: {details}", name)
        if code is grpc.StatusCode.CANCELLED:
            return LinkError(f"cloud session at {self.target} was cancelled (idle timeout, server shutdown or client cancel)", name)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            if details.startswith(PAST_LIFETIME):  # the cloud's own refusal, not this link's timeout
                return LinkError(f"cloud at {self.target} ended the session: {details}", PAST_LIFETIME_CODE)
            return LinkError(f"cloud at {self.target} did not reply in time", name)
        return LinkError(f"cloud at {self.target} failed ({name}): {details}", name)


def make_link(
    url: str, tls_ca_path: str | None = None, token_file_path: str | None = None, timeout: float = 120.0, tls_server_name: str | None = None,
) -> GrpcLink:
    """A GrpcLink from command-line values (`url` may list several, comma-separated): CA and token are read from files."""
    tls_ca = read_file(tls_ca_path, "--tls-ca") if tls_ca_path else None
    if tls_ca is not None and b"-----BEGIN CERTIFICATE-----" not in tls_ca:
        raise TriadicError(f"--tls-ca {tls_ca_path}: expected a PEM certificate")
    token = read_token(token_file_path) if token_file_path else None
    link = GrpcLink(url, tls_ca=tls_ca, token=token, timeout=timeout, tls_server_name=tls_server_name)
    for endpoint in link._endpoints:
        host = endpoint.target.rsplit(":", 1)[0].strip("[]")
        if token and not endpoint.tls and host not in ("127.0.0.1", "localhost", "::1"):
            log(f"note: the token goes to {endpoint.target} without TLS; pass --tls-ca to encrypt the link")
    return link
