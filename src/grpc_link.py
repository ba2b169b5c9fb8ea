"""The edge's side of the network link: `GrpcLink`, a `Link` over one gRPC stream per session.

    link = GrpcLink("grpc://cloud.example:50051", tls_ca="ca.pem", token="...")
    edge = build_edge(..., link=link)
    edge.generate(...)

A START message (the first request of every `Edge.generate` or `Session`) opens a new bidirectional
stream to `/triadic.Cloud/Session` (closing the previous one); every later request, the TURN messages
of a session's later requests included, goes down that stream and waits, at most `timeout` seconds,
for its one reply. Any failure (cloud unreachable, message
refused, stream lost, no reply in time) raises `TriadicError` with one line; the stream is then
dropped, so the next generation starts over with a fresh session.

URLs: `grpc://host:port` (plaintext, or TLS where a CA is given) and `grpcs://host:port` (TLS; the
system's roots unless a CA is given). The port defaults to 50051.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from urllib.parse import urlsplit

# gRPC's C core logs a TLS handshake failure on stderr by itself, before our one error line says the
# same; silence it (set before grpc is first imported; GRPC_VERBOSITY=INFO in the environment brings it back).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
import grpc  # noqa: E402

from .protocol import MAGIC, Kind
from .utils import ProtocolError, TriadicError, log, read_file, read_token

SESSION_METHOD = "/triadic.Cloud/Session"
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


def parse_url(url: str) -> tuple[str, bool]:
    """'grpc://host:port' -> ('host:port', tls_required). Raises TriadicError on anything else."""
    text = url.strip()
    if "://" not in text:
        text = "grpc://" + text
    parts = urlsplit(text)
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


class GrpcLink:
    """`Link` to a cloud served by `python -m src.cloud_server`."""

    def __init__(
        self,
        url: str = "grpc://127.0.0.1:50051",
        tls_ca: bytes | str | None = None,
        token: str | None = None,
        timeout: float = 120.0,
        tls_server_name: str | None = None,
        max_message_bytes: int = -1,
    ) -> None:
        """`tls_ca`: PEM bytes (or a path) of the CA that signed the cloud's certificate; TLS is used
        when it is given or the URL is grpcs://. `timeout`: seconds to wait for each reply."""
        self.target, tls = parse_url(url)
        if isinstance(tls_ca, str):
            tls_ca = read_file(tls_ca, "--tls-ca")
        self.tls = tls or tls_ca is not None
        self.timeout = float(timeout)
        if not self.timeout > 0:
            raise TriadicError("the link timeout must be > 0 seconds")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Own subchannels: a link rebuilt after a failure connects afresh instead of
            # inheriting another channel's reconnect backoff (a restarted cloud is found at once).
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if tls_server_name:
            self._options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca) if self.tls else None
        self.channel = self._new_channel()
        self._broken = False
        self._stream: _Stream | None = None
        self._lock = threading.Lock()
        self.requests = 0

    def _new_channel(self) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(self.target, self._credentials, options=self._options)
        return grpc.insecure_channel(self.target, options=self._options)

    def _reconnect_if_broken(self) -> None:
        if self._broken:  # the last stream failed: connect from scratch, without inherited backoff
            self.channel.close()
            self.channel, self._broken = self._new_channel(), False

    # -- Link ------------------------------------------------------------------------------------
    def request(self, data: bytes) -> bytes:
        data = bytes(data)
        with self._lock:
            if self._stream is None or _is_start(data):
                self._end_stream()
                self._reconnect_if_broken()
                self._stream = _Stream(self.channel, self.metadata)
            stream = self._stream
            stream.requests.put(data)
            try:
                item = stream.replies.get(timeout=self.timeout)
            except queue.Empty:
                self._end_stream(cancel=True)
                self._broken = True
                raise LinkError(f"cloud at {self.target} did not reply within {self.timeout:g} s", "DEADLINE_EXCEEDED") from None
            if isinstance(item, bytes):
                self.requests += 1
                return item
            self._end_stream(cancel=True)
            self._broken = True
            if item is _END:
                raise LinkError(f"cloud at {self.target} ended the session without a reply")
            raise self._error(item) from None

    # -- session and channel -----------------------------------------------------------------------
    def cancel(self) -> None:
        """Abort the current session's stream (as a client killed mid-generation would)."""
        with self._lock:
            self._end_stream(cancel=True)

    def end_session(self) -> None:
        """Half-close the current stream: the cloud frees the session."""
        with self._lock:
            self._end_stream()

    def close(self) -> None:
        """End the session (the cloud frees it at once) and the channel."""
        with self._lock:
            stream = self._stream
            self._end_stream()
            if stream is not None:
                stream.reader.join(timeout=2.0)  # let the half-close reach the cloud before the channel goes
            self.channel.close()

    def __enter__(self) -> GrpcLink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """The cloud's /triadic.Cloud/Stats: open sessions, memory, ..."""
        with self._lock:
            if self._stream is None:
                self._reconnect_if_broken()
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

    def _error(self, error: BaseException) -> LinkError:
        if not isinstance(error, grpc.RpcError) or not hasattr(error, "code"):
            return LinkError(f"link to the cloud at {self.target} failed: {type(error).__name__}: {error}")
        code = error.code()
        details = (error.details() or "").strip().splitlines()
        details = details[0] if details else ""
        name = code.name if code is not None else "UNKNOWN"
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return RejectedError(f"cloud rejected the message: {details}", name)
        if code is grpc.StatusCode.UNAVAILABLE:
            lowered = details.lower()
            if "certificate_verify_failed" in lowered:
                hint = " (the server's certificate is not signed by --tls-ca)"
            elif "handshake" in lowered or "socket closed" in lowered:
                hint = " (TLS on one side only? --tls-ca turns it on at the edge, --tls-cert at the server)"
            elif "refused" in lowered:
                hint = " (is the cloud server running there?)"
            else:
                hint = ""
            return LinkError(f"cloud unreachable at {self.target}: {details}{hint}", name)
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return LinkError(f"cloud at {self.target} refused the token: {details}", name)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return LinkError(f"cloud at {self.target} is out of capacity: {details}", name)
        if code is grpc.StatusCode.CANCELLED:
            return LinkError(f"cloud session at {self.target} was cancelled (idle timeout, server shutdown or client cancel)", name)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return LinkError(f"cloud at {self.target} did not reply in time", name)
        return LinkError(f"cloud at {self.target} failed ({name}): {details}", name)


def make_link(url: str, tls_ca_path: str | None = None, token_file_path: str | None = None, timeout: float = 120.0) -> GrpcLink:
    """A GrpcLink from command-line values: CA and token are read from files (TriadicError if unreadable)."""
    tls_ca = read_file(tls_ca_path, "--tls-ca") if tls_ca_path else None
    if tls_ca is not None and b"-----BEGIN CERTIFICATE-----" not in tls_ca:
        raise TriadicError(f"--tls-ca {tls_ca_path}: expected a PEM certificate")
    token = read_token(token_file_path) if token_file_path else None
    link = GrpcLink(url, tls_ca=tls_ca, token=token, timeout=timeout)
    host = link.target.rsplit(":", 1)[0].strip("[]")
    if token and not link.tls and host not in ("127.0.0.1", "localhost", "::1"):
        log(f"note: the token goes to {link.target} without TLS; pass --tls-ca to encrypt the link")
    return link
