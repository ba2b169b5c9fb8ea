"""The cloud as a network service: gRPC, one bidirectional stream per generation session.

    python -m src.cloud_server --host 0.0.0.0 --port 50051 --first 1,2 --second 28,29 \
        [--tls-cert server.crt --tls-key server.key] [--token-file token.txt]

The server loads only the cloud's layers (`build_cloud`). Each stream is one session with its own
`Cloud(schedule, part)` (own KV caches; the weights are shared): every stream message is the bytes
of one request of `src/protocol.py`, every response the bytes of its reply. No proto file: the
methods use raw bytes.

    /triadic.Cloud/Session  stream-stream  request bytes -> reply bytes
    /triadic.Cloud/Stats    unary-unary    b"" -> JSON {"sessions", "sessions_total", "max_sessions", "rss_bytes", ...}

Status codes a client can see:
    INVALID_ARGUMENT     a message `Cloud.handle` refused (ProtocolError; the details are its one line).
                         The stream ends; the session's caches were not changed; other sessions go on.
    RESOURCE_EXHAUSTED   --max-sessions sessions are open, or a message exceeds --max-message-mb
    UNAUTHENTICATED      --token-file is set and the metadata lacks `authorization: Bearer <token>`
    CANCELLED            the session idled past --idle-timeout, or the server is shutting down
    INTERNAL             a bug on the server (traceback on its stderr)

A session is freed when its stream ends (the client half-closes), is cancelled, fails, or idles.
"""
from __future__ import annotations

import argparse
import hmac
import itertools
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent import futures

import grpc

from .utils import OneLineParser, ProtocolError, TriadicError, parse_layer_set, read_file, read_token

SERVICE = "triadic.Cloud"
SESSION_METHOD = f"/{SERVICE}/Session"
STATS_METHOD = f"/{SERVICE}/Stats"
PROG = "cloud_server"
# main_3_split.py's sets: the edge and the cloud must use the same ones (checked by fingerprint at START).
DEFAULT_FIRST = "1,2,3,4,5,6"
DEFAULT_SECOND = "24,25,26,27,28,29"


_log_lock = threading.Lock()


def log(*parts: object) -> None:
    """One line to stderr in a single write, so that lines from concurrent sessions never interleave."""
    line = " ".join(str(part) for part in parts) + "\n"
    with _log_lock:
        sys.stderr.write(line)
        sys.stderr.flush()


def rss_bytes() -> int:
    """Resident memory of this process now (peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Session:
    def __init__(self, number: int, context: grpc.ServicerContext) -> None:
        self.number = number
        self.context = context
        self.last_active = time.monotonic()
        self.busy = False
        self.idled_out = False


class CloudService:
    """Sessions over one loaded cloud part. Thread-safe: each stream runs in its own pool thread."""

    def __init__(self, schedule, part, max_sessions: int = 8, idle_timeout: float = 300.0, token: str | None = None) -> None:
        from .cloud import Cloud

        self._cloud_class = Cloud
        self.schedule = schedule
        self.part = part
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._expected_auth = f"Bearer {token}".encode() if token is not None else None
        self._lock = threading.Lock()
        self._sessions: dict[int, _Session] = {}
        self._numbers = itertools.count(1)
        self._total = 0
        self._rejected = 0
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap_idle, name="idle-reaper", daemon=True)
        self._reaper.start()
        self.batcher = None  # cross-session batching of the sessions' layer work (src/batching.py), if on

    # -- gRPC wiring -------------------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Session": grpc.stream_stream_rpc_method_handler(self.session),
                "Stats": grpc.unary_unary_rpc_method_handler(self.stats),
            },
        )

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self._expected_auth is None:
            return
        given = b""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        if not hmac.compare_digest(given, self._expected_auth):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (metadata authorization: Bearer <token>)")

    # -- methods -----------------------------------------------------------------------------
    def stats(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._authorize(context)
        with self._lock:
            report = {
                "sessions": len(self._sessions),
                "sessions_total": self._total,
                "sessions_rejected": self._rejected,
                "max_sessions": self.max_sessions,
                "idle_timeout": self.idle_timeout,
                "cloud_layers": [self.schedule.cloud_layers.start, self.schedule.cloud_layers.stop],
                "rss_bytes": rss_bytes(),
                "pid": os.getpid(),
            }
        return json.dumps(report).encode()

    def session(self, requests, context: grpc.ServicerContext):
        """One generation session: a fresh Cloud, one reply per request, in order."""
        import torch

        self._authorize(context)
        session = self._open(context)
        context.add_callback(lambda: self._close(session, "ended (connection closed)"))
        cloud = self._cloud_class(self.schedule, self.part)
        cloud.batcher = self.batcher
        outcome = "ended by the client"
        try:
            for request in requests:
                session.busy = True
                session.last_active = time.monotonic()
                try:
                    with torch.no_grad():
                        reply = cloud.handle(request)
                except ProtocolError as error:
                    outcome = f"rejected a message: {error}"
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
                except Exception as error:  # a bug: keep serving the other sessions, say what failed
                    outcome = f"failed: {type(error).__name__}: {error}"
                    traceback.print_exc(file=sys.stderr)
                    context.abort(grpc.StatusCode.INTERNAL, f"cloud error: {type(error).__name__}: {error}".splitlines()[0])
                finally:
                    session.busy = False
                    session.last_active = time.monotonic()
                yield reply
        except grpc.RpcError:  # the client cancelled or went away
            outcome = "idle timeout" if session.idled_out else "cancelled by the client"
        except GeneratorExit:  # gRPC dropped the stream while a reply was on its way
            outcome = "cancelled by the client"
            raise
        finally:
            self._close(session, outcome)

    # -- session bookkeeping -----------------------------------------------------------------
    def _open(self, context: grpc.ServicerContext) -> _Session:
        with self._lock:
            if self._stopping.is_set():
                context.abort(grpc.StatusCode.UNAVAILABLE, "the cloud is shutting down")
            if len(self._sessions) >= self.max_sessions:
                self._rejected += 1
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the cloud serves at most {self.max_sessions} sessions at once; try again later")
            session = _Session(next(self._numbers), context)
            self._sessions[session.number] = session
            self._total += 1
            count = len(self._sessions)
        log(f"session {session.number} opened from {context.peer()} ({count} open)")
        return session

    def _close(self, session: _Session, outcome: str) -> None:
        with self._lock:
            if self._sessions.pop(session.number, None) is None:
                return
            count = len(self._sessions)
        log(f"session {session.number} {outcome} ({count} open)")

    def _reap_idle(self) -> None:
        period = max(0.05, min(1.0, self.idle_timeout / 4))
        while not self._stopping.wait(period):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._sessions.values() if not s.busy and now - s.last_active > self.idle_timeout]
            for session in idle:
                session.idled_out = True
                session.context.cancel()  # its request iterator raises; the handler frees the session

    def stop(self) -> None:
        self._stopping.set()

    @property
    def open_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)


# -- command line ----------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Serve the cloud part of the triadic split over gRPC.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port (printed in the 'listening on' line)")
    p.add_argument("--base-model", default=None, help="LLaMA-family folder or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--lora-weights", default=None)
    p.add_argument("--first", default=DEFAULT_FIRST, help=f"first split set, as the edge's (default {DEFAULT_FIRST})")
    p.add_argument("--second", default=DEFAULT_SECOND, help=f"second split set, as the edge's (default {DEFAULT_SECOND})")
    p.add_argument("--two-part", action="store_true", help="two-part split: the cloud runs to the last layer and returns tokens")
    p.add_argument("--cloud-device", default="cpu")
    p.add_argument("--cloud-dtype", default="float32", help="float32, bfloat16, float16, or auto (bfloat16 where the device computes it natively)")
    p.add_argument("--load-in-8bit", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--token-file", default=None, help="file holding a bearer token clients must send")
    p.add_argument("--max-sessions", type=int, default=8, help="sessions open at once; more get RESOURCE_EXHAUSTED")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="seconds a session may wait for its next message")
    p.add_argument("--max-message-mb", type=float, default=64.0, help="largest request accepted, in MiB")
    p.add_argument("--batch-window-ms", type=float, default=2.0,
                   help="cross-session batching: how long a step may wait for other sessions' steps to run with it "
                        "(0: no waiting, steps that are already pending still run together)")
    p.add_argument("--no-batching", action="store_true", help="run every session's steps on its own")
    return p


def _check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise TriadicError(f"--port {args.port} is outside [0, 65535]")
    if args.max_sessions < 1:
        raise TriadicError("--max-sessions must be at least 1")
    if not args.idle_timeout > 0:
        raise TriadicError("--idle-timeout must be > 0 seconds")
    if not 0 < args.max_message_mb <= 2047:
        raise TriadicError("--max-message-mb must be in (0, 2047]")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise TriadicError("--tls-cert and --tls-key go together")
    if args.threads is not None and args.threads < 1:
        raise TriadicError("--threads must be at least 1")
    if not 0 <= args.batch_window_ms <= 1000:
        raise TriadicError("--batch-window-ms must be in [0, 1000]")


def _check_port_free(host: str, port: int) -> None:
    """Fail before the weights load, and with one line, where the address cannot be bound."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise TriadicError(f"--host {host}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind(address)
        except OSError as error:
            raise TriadicError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def build_server(args) -> tuple[grpc.Server, CloudService, int]:
    """Load the cloud part, bind the port, start serving. Raises TriadicError on bad input."""
    from .checkpoint import load_config, resolve_model_dir
    from .pipeline import SideOptions, build_cloud
    from .precision import resolve_dtype
    from .schedule import SplitSchedule

    _check_args(args)
    _check_port_free(args.host, args.port)
    first = parse_layer_set(args.first, "--first")
    second = parse_layer_set(args.second, "--second")
    side = SideOptions(args.cloud_device, resolve_dtype(args.cloud_dtype, args.cloud_device)[0], args.load_in_8bit)
    token = read_token(args.token_file) if args.token_file else None
    credentials = None
    if args.tls_cert:
        cert, key = read_file(args.tls_cert, "--tls-cert"), read_file(args.tls_key, "--tls-key")
        if b"-----BEGIN" not in cert or b"-----BEGIN" not in key:
            raise TriadicError("--tls-cert/--tls-key: expected PEM files")
        credentials = grpc.ssl_server_credentials([(key, cert)])

    model_dir = resolve_model_dir(args.base_model)
    config = load_config(model_dir)
    L = config.num_hidden_layers
    if args.two_part:
        second = {L}
    schedule = SplitSchedule(tuple(first), tuple(second), L)  # validates the sets (TriadicError)
    if not schedule.needs_cloud:
        raise TriadicError("these split sets give the cloud no layers (a == b at every step): nothing to serve")
    if args.two_part and schedule.first[-1] == L:
        raise TriadicError(f"two-part split: first may not contain {L} (= L)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cloud = build_cloud(model_dir, config, schedule, args.two_part, args.lora_weights, side)

    service = CloudService(schedule, cloud.part, args.max_sessions, args.idle_timeout, token)
    if not args.no_batching:
        from .batching import Batcher, enable_packing

        enable_packing(cloud.part)
        service.batcher = Batcher(args.batch_window_ms / 1e3, active=lambda: service.open_sessions)
    workers = args.max_sessions + 8  # a stream holds a worker; the spare ones answer Stats and refusals
    limit = int(args.max_message_mb * (1 << 20))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="session"),
        handlers=[service.handler()],
        maximum_concurrent_rpcs=workers,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
        ],
    )
    address = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as error:
        port = 0
        reason = str(error).splitlines()[0] if str(error) else "bind failed"
    else:
        reason = "address in use or not available"
    if port == 0:
        service.stop()
        raise TriadicError(f"cannot listen on {address}: {reason}")
    server.start()
    return server, service, port


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        server, service, port = build_server(args)
    except TriadicError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the weights load
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host = f"[{args.host}]" if ":" in args.host else args.host
    scheme = "TLS" if args.tls_cert else "plaintext"
    log(f"listening on {host}:{port}")
    log(f"{scheme}, cloud layers [{service.schedule.cloud_layers.start}, {service.schedule.cloud_layers.stop}), "
        f"first={list(service.schedule.first)} second={list(service.schedule.second)}, max {args.max_sessions} sessions"
        + (", token required" if args.token_file else ""))
    while not stop.wait(0.5):
        pass
    name = signal.Signals(received[0]).name if received else "stop"
    log(f"{name}: stopping ({service.open_sessions} open sessions cancelled)")
    service.stop()
    server.stop(grace=1.0).wait(5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
