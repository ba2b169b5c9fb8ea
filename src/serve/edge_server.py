"""The edge as a local OpenAI-compatible server, with a page that shows where each token was computed.

    python -m src.serve.edge_server --host 127.0.0.1 --port 8000 [--cloud grpc://host:50051] \
        [--first 1,2,3 --second 28,29 --codec int8 --base-model ... (the scripts' flags)]

Loads the edge (and, without --cloud, the cloud in this process) with main_3_split.py's split sets
unless --first/--second say otherwise, then serves src/serve/app.py with uvicorn. It prints
`listening on http://HOST:PORT` once it accepts requests (--port 0 picks a free port).
Bad flags end with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path

import torch

from ..cli import add_pipeline_arguments, baseline_args, build_from_args
from ..link.codec import get_codec
from ..utils import OneLineParser, TriadicError, check_seconds, parse_layer_set, read_token
from .cloud_server import DEFAULT_FIRST, DEFAULT_SECOND

PROG = "edge_server"
logger = logging.getLogger(PROG)


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="OpenAI-compatible chat completions over the triadic split, and its page")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--served-model-name", default=None, help="model id in the API (default: the model folder's name)")
    parser.add_argument("--max-queue", type=int, default=4, help="requests that may wait while one decodes; more get 429")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds of decoding per request at most")
    parser.add_argument("--max-body-kb", type=int, default=1024, help="largest request body accepted (KiB)")
    parser.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request's headers may take to arrive (then the connection closes), and its body (then 408)")
    parser.add_argument("--max-connections", type=int, default=64,
                        help="open connections and requests at most; a request past it gets 503 and the connection is closed")
    parser.add_argument("--api-key-file", default=None, help="file holding the bearer token clients must send to /v1/*")
    parser.add_argument("--no-unsplit", action="store_true", help="do not offer the unsplit baseline (<name>-unsplit), which loads every layer on the edge")
    parser.add_argument("--no-prefix-reuse", action="store_true",
                        help="start every request afresh: its whole prompt is prefilled, its answer does not depend on earlier requests, "
                             "and no caller learns from cached_tokens what another's prompt began with")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    add_pipeline_arguments(parser)
    return parser


def _check(args) -> None:
    if not 0 <= args.port <= 65535:
        raise TriadicError(f"--port {args.port} is outside [0, 65535]")
    if args.max_queue < 0:
        raise TriadicError("--max-queue must be >= 0")
    check_seconds(args.time_limit, "--time-limit")
    if args.max_body_kb < 1:
        raise TriadicError("--max-body-kb must be at least 1")
    check_seconds(args.body_timeout, "--body-timeout")
    if args.max_connections < args.max_queue + 2:
        raise TriadicError(f"--max-connections must be at least --max-queue + 2 ({args.max_queue + 2}): the decoding request, the queue and one more")
    if args.threads is not None and args.threads < 1:
        raise TriadicError("--threads must be at least 1")
    get_codec(args.codec)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # connections made before uvicorn's loop runs wait in the backlog
    except OSError as error:
        raise TriadicError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def build(args):
    """The app for these flags: the split engine now, the unsplit one on first use."""
    from .app import Models, ServerConfig, create_app
    from .engine import ChatTokenizer, EdgeEngine

    sets = (parse_layer_set(DEFAULT_FIRST, "first"), parse_layer_set(DEFAULT_SECOND, "second"))
    pipeline = build_from_args("three", args, *sets)
    name = args.served_model_name or Path(pipeline.model_dir).name
    chat = ChatTokenizer(pipeline.tokenizer)
    reuse = not args.no_prefix_reuse
    split = EdgeEngine(pipeline, name, chat, split=True, reuse_prefix=reuse)

    def build_unsplit() -> EdgeEngine:
        return EdgeEngine(build_from_args("one", baseline_args(args), None, None), name + "-unsplit", chat, split=False, reuse_prefix=reuse)

    api_key = read_token(args.api_key_file, "--api-key-file") if args.api_key_file else None
    config = ServerConfig(max_queue=args.max_queue, api_key=api_key, max_body_bytes=args.max_body_kb * 1024, time_limit=args.time_limit,
                          body_timeout=args.body_timeout)
    models = Models(split, None if args.no_unsplit else build_unsplit)
    return create_app(models, config), split


def header_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, with `seconds` for each request's headers to arrive; then the connection closes.

    uvicorn times a connection out only between requests (keep-alive), and the app bounds the body
    (`--body-timeout`). A client that opens connections and never completes their headers would hold
    each for ever, and `--max-connections` of them would shut the server. Here a request's headers are
    due `seconds` after the connection opens, or after the previous response on it.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _headers_due: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._headers_due = self.loop.call_later(seconds, self._headers_late)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self._headers_due is not None:  # a whole request head is in
                self._headers_due.cancel()
                self._headers_due = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._headers_due is None and not self.transport.is_closing():  # the next request on this connection
                self._headers_due = self.loop.call_later(seconds, self._headers_late)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
                self._headers_due = None
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            self._headers_due = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                logger.info("closing a connection whose request headers did not arrive within %g s", seconds)
                self.transport.close()

    return HeaderDeadline


def _stopping_server_class():
    """uvicorn's Server, which first tells the app that it stops (`Admission.stop`) when a signal asks it to."""
    import asyncio

    import uvicorn

    class StoppingServer(uvicorn.Server):
        """On SIGINT/SIGTERM the requests waiting get 503 and the one decoding ends with an error event, within the graceful
        time: uvicorn alone cancelled them past it, which answered a plain-text 500 to each waiting request, cut the
        stream under way without an error or [DONE], and logged a traceback for each."""

        _loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.config.app.state.admission.stop)
            super().handle_exit(sig, frame)

    return StoppingServer


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    sock = None
    try:
        _check(args)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        if args.threads:
            torch.set_num_threads(args.threads)
        sock = _bind(args.host, args.port)  # before loading: a taken port fails in a second, not after the weights
        app, split = build(args)
    except TriadicError as error:
        if sock is not None:
            sock.close()
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2

    import uvicorn

    StoppingServer = _stopping_server_class()
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    described = split.describe()
    logger.info("model %s: first=%s second=%s codec=%s cloud=%s", split.name, described["first"], described["second"],
                described["codec"], args.cloud or "in this process")
    # limit_concurrency bounds the connections (idle, sending, waiting) that hold a socket and a task each;
    # the protocol bounds the time a request's headers take, as the app bounds its body's.
    server = StoppingServer(uvicorn.Config(app, log_config=None, log_level="info", timeout_graceful_shutdown=5,
                                           limit_concurrency=args.max_connections,
                                           http=header_deadline_protocol(args.body_timeout)))
    logger.info("listening on http://%s:%d", shown, port)
    status = 0
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises SIGINT again once it has stopped: the exit status says so, not a traceback
        status = 130
    close = getattr(split.edge.link, "close", None)
    if close is not None:
        close()
    return status


if __name__ == "__main__":
    sys.exit(main())
