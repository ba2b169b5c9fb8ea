"""The cloud as a network service: gRPC, one bidirectional stream per generation session.

    python -m src.serve.cloud_server --host 0.0.0.0 --port 50051 --first 1,2 --second 28,29 \
        [--tls-cert server.crt --tls-key server.key] [--token-file token.txt]

The server loads only the cloud's layers (`build_cloud`). Each stream is one session with its own
`Cloud(schedule, part)` (own KV caches; the weights are shared): every stream message is the bytes
of one request of `src/link/protocol.py`, every response the bytes of its reply. No proto file: the
methods use raw bytes.

    /triadic.Cloud/Session  stream-stream  request bytes -> reply bytes
    /triadic.Cloud/Stats    unary-unary    b"" -> JSON {"sessions", "computations_running", "max_computations_running", ...}

What limits work (an asyncio server: waiting costs no thread, only computing does):
- The token is checked by an interceptor on the event loop, before any handler runs: an
  unauthenticated call never reaches a session, a computation slot or a worker thread.
- Stats is answered on the event loop from counters; it never waits for a session or a slot.
- A computation (one HIDDEN message through the cloud's layers) runs in a pool of
  --max-computations threads behind a semaphore whose slot is released only when the computation
  has really ended. Between layers it checks whether its client cancelled or its deadline passed
  (`Party.on_layer`), so a cancelled or expired request stops within one layer. A session counts
  against --max-sessions until its last computation has ended, not when its stream does.
- Every message is checked against the limits from its 24-byte header before it is queued:
  positions per message, positions per session (at most the model's context), bytes per message
  (derived from the positions: 4 bytes per value), session lifetime and idle time.
- gRPC's own options bound connections: idle and age, keepalive and its enforcement, streams per
  connection, handshake time, and the number of connections.

Status codes a client can see (every refusal is one log line naming the peer):
    INVALID_ARGUMENT     the client's bytes are wrong: a message `Cloud.handle` refused (codec,
                         protocol, positions beyond the model's context), or states that drive the
                         model to Inf/NaN. Logged once, never a traceback.
    RESOURCE_EXHAUSTED   --max-sessions sessions are open, a message carries more positions or bytes
                         than the limits, or a session would grow past --max-session-positions
    DEADLINE_EXCEEDED    a message did not finish within --request-timeout (or the client's own
                         deadline), or the session is past --session-lifetime
    UNAUTHENTICATED      --token-file is set and the metadata lacks `authorization: Bearer <token>`
    CANCELLED            the session idled past --idle-timeout, or the server is shutting down
    INTERNAL             a bug on the server (traceback in its log)
A refusal ends the stream (gRPC has no status for one message of a stream); the session and its
caches are dropped, other sessions go on.

Cross-session batching (default on; `--no-batching`, `--batch-window-ms`, `--batch-max-rows`): the
layer work of concurrent sessions runs together on one thread (`src/serve/batching.py`), a step
waiting at most the window for the other sessions mid-generation, and a batch holding at most
`--batch-max-rows` positions besides its decode steps (a longer step runs a layer call at a time
between batches). Packed products differ from a session's own in the
last bits, so each session stream's initial metadata says `triadic-batching: <window ms>`: an
edge's failover replay then reports CRC differences as expected rather than as a fault.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import hmac
import itertools
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable
from concurrent import futures
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc import aio

from ..families import context_length
from ..link import protocol
from ..link.codec import CODECS
from ..precision import dtype_name
from ..utils import (
    OneLineParser, StopSignal, Stopped, TriadicError, adopt_torch_threads, check_seconds, parse_layer_set, read_file, read_token,
)

if TYPE_CHECKING:  # imported where used: `--help` and bad arguments answer before torch loads
    from ..cloud import Cloud
    from .batching import Batcher

logger = logging.getLogger(__name__)

SERVICE = "triadic.Cloud"
SESSION_METHOD = f"/{SERVICE}/Session"
STATS_METHOD = f"/{SERVICE}/Stats"
PROG = "cloud_server"
# main_3_split.py's sets: the edge and the cloud must use the same ones (checked by fingerprint at START).
DEFAULT_FIRST = "1,2,3,4,5,6"
DEFAULT_SECOND = "24,25,26,27,28,29"
BYTES_PER_VALUE = 4  # the widest codec (`none` in float32) sends 4 bytes per value
MESSAGE_SLACK = 4096  # header and codec side data beyond the values, in bytes
# Long enough for edges that got their replies together to come back together (results/cloud_batching.md:
# 2 ms leaves 8 contending edges in two alternating groups); a step waits only while others are mid-generation.
DEFAULT_BATCH_WINDOW_MS = 100.0
DEFAULT_BATCH_MAX_ROWS = 128
BATCHING_METADATA = "triadic-batching"  # initial metadata of a session stream: the window in ms where the server batches


@dataclass(frozen=True)
class Limits:
    """What one client may ask of this server. Every field has a command-line flag."""

    max_sessions: int = 8  # sessions open at once; a session counts until its last computation ends
    max_computations: int = 8  # computations (HIDDEN messages) running at once, across sessions
    session_positions: int = 8192  # positions one session may reach; at most the model's context
    message_positions: int = 4096  # positions one message may carry
    message_bytes: int = 4096 * 576 * BYTES_PER_VALUE + MESSAGE_SLACK  # largest request, from message_positions
    request_timeout: float = 120.0  # seconds from a message's arrival to its reply, waiting for a slot included
    session_lifetime: float = 3600.0  # seconds a session may live from its start, however active
    idle_timeout: float = 300.0  # seconds a session may go without states to compute (a START computes nothing)
    context: int = 8192  # the positions the split runs the model over (`families.context_length`): beyond them, invalid


def rss_bytes() -> int:
    """Resident memory of this process now (peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Libc:
    """glibc's allocator knobs, where there is glibc: fewer arenas, and giving freed memory back.

    Without them a burst of large sessions leaves its peak resident: freed blocks stay in per-thread
    arenas, and glibc's dynamic mmap threshold grows past the size of a large prefill's tensors.
    """

    M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        self.libc: ctypes.CDLL | None = None
        try:
            libc = ctypes.CDLL(name) if name else None
            if libc is not None:
                libc.malloc_trim  # noqa: B018 (not glibc: no trimming)
                self.libc = libc
        except (OSError, AttributeError):
            pass

    def configure(self, arenas: int = 2, mmap_threshold: int = 256 << 10) -> None:
        """Call before threads start: at most `arenas` arenas, blocks over `mmap_threshold` mmapped (and unmapped when freed)."""
        if self.libc is not None:
            self.libc.mallopt(self.M_ARENA_MAX, arenas)
            self.libc.mallopt(self.M_MMAP_THRESHOLD, mmap_threshold)

    def trim(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)


LIBC = _Libc()


class Refusal(Exception):
    """A request this server will not serve: a status and a one-line reason for the client and the log."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class _Session:
    number: int
    peer: str
    opened: float  # time.monotonic()
    expires: float  # opened + the session lifetime
    worked: float = 0.0  # when it last sent states to compute (HIDDEN), began a request (TURN), or opened: idle counts from there
    turned: bool = False  # a TURN has counted as work since its last computation (so TURNs alone cannot keep it)
    cloud: Cloud | None = None  # its Cloud: caches and stored states, dropped as soon as the session ends
    computation: futures.Future | None = None
    closed: bool = False
    handler: asyncio.Task | None = None  # the task serving its stream, cancelled when the server stops
    sending: asyncio.Future | None = None  # its last send to the client (metadata or a reply), run to its end


@dataclass
class Counters:
    """What Stats reports besides the sessions: computations and refusals since the server started."""

    sessions_total: int = 0
    computations_running: int = 0
    max_computations_running: int = 0  # the peak of computations_running
    computations_total: int = 0  # computations started (HIDDEN messages that reached the layers)
    computations_stopped: int = 0  # stopped between layers: cancelled or past their deadline
    refusals: dict[str, int] = field(default_factory=dict)  # status name -> count


class RefusalLog:
    """Refusal lines, at most `burst` per client host and status code in any `period` seconds: the rest are counted
    (Stats counts them all) and said in one line once the period has ended (`flush`, at the next refusal from any host, or as
    the server stops). Logged one by one, a client
    opening 724 garbage sessions a second wrote 219 KiB of log a second, 13 times its own bytes. Per code, so that a
    flood of one kind (tokens, say) does not hide another's refusals from the same host."""

    def __init__(self, burst: int = 20, period: float = 10.0, hosts: int = 1024, total: int = 200) -> None:
        self.burst, self.period, self.hosts, self.total = burst, period, hosts, total
        self._windows: dict[tuple[str, str], list] = {}  # (host, code) -> [when its period began, lines logged, held back]
        self._all = [0.0, 0, 0]  # the same for all hosts together: at most `total` lines a period (many addresses)
        self._flushed = 0.0  # when ended periods' held-back counts were last said

    def flush(self, now: float | None = None) -> None:
        """Say what was held back in every period that has ended (all of them where `now` is None: the server stops)."""
        for (host, code), window in list(self._windows.items()):
            if window[2] and (now is None or now - window[0] >= self.period):
                logger.warning("%d more %s refusals from %s in %g s, not logged one by one", window[2], code, host, self.period)
                window[2] = 0
        if self._all[2] and (now is None or now - self._all[0] >= self.period):
            logger.warning("%d more refusals in %g s, not logged one by one (past %d lines from all hosts)", self._all[2],
                           self.period, self.total)
            self._all[2] = 0

    def warning(self, peer: str, code: str, message: str, *args) -> None:
        host = peer.rsplit(":", 1)[0]  # "ipv4:127.0.0.1:54321" -> "ipv4:127.0.0.1": a client's connections together
        now = time.monotonic()
        window = self._windows.get((host, code))
        held = [w for w in (window, self._all) if w is not None and w[2] and now - w[0] >= self.period]
        if held or now - self._flushed >= 1.0:  # a period that ends has its count said before the next begins, and a
            self._flushed = now  # host that stopped refusing has it said within a second of any other refusal
            self.flush(now)
        if now - self._all[0] >= self.period:
            self._all = [now, 0, 0]
        if window is None or now - window[0] >= self.period:
            if window is None and len(self._windows) >= self.hosts:  # many hosts: forget those past their period
                self._windows = {key: held for key, held in self._windows.items() if now - held[0] < self.period}
            window = [now, 0, 0]
            if len(self._windows) < self.hosts:  # else counted for all hosts together only
                self._windows[(host, code)] = window
        if window[1] >= self.burst:
            window[2] += 1
        elif self._all[1] >= self.total:
            self._all[2] += 1
        else:
            window[1] += 1
            self._all[1] += 1
            logger.warning(message, *args)


class CloudService:
    """Sessions over one loaded cloud part. Handlers run on one asyncio loop; computations in a thread pool."""

    def __init__(self, schedule, part, limits: Limits, token: str | None = None) -> None:
        from ..cloud import Cloud

        self._cloud_class = Cloud
        self.schedule = schedule
        self.part = part
        self.limits = limits
        self.hidden_size = part.config.hidden_size
        self._expected_auth = f"Bearer {token}".encode() if token is not None else None
        self._sessions: dict[int, _Session] = {}
        self._numbers = itertools.count(1)
        self.counters = Counters()
        self.refusal_log = RefusalLog()
        self._counter_lock = threading.Lock()  # computations are counted from their threads
        self._executor = futures.ThreadPoolExecutor(max_workers=limits.max_computations, thread_name_prefix="compute",
                                                    initializer=adopt_torch_threads)
        self._slots: asyncio.Semaphore  # made on the serving loop (bind_loop)
        self._loop: asyncio.AbstractEventLoop
        self._stopping = False
        self.batcher: Batcher | None = None  # cross-session batching of the sessions' layer work (src/serve/batching.py), if on

    # -- gRPC wiring -------------------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Session": grpc.stream_stream_rpc_method_handler(self.session),
                "Stats": grpc.unary_unary_rpc_method_handler(self.stats),
            },
        )

    def interceptors(self) -> list[aio.ServerInterceptor]:
        return [_TokenCheck(self._expected_auth, self)] if self._expected_auth is not None else []

    def bind_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.limits.max_computations)

    def refuse(self, peer: str, code: grpc.StatusCode, reason: str, session: _Session | None = None) -> None:
        """Count and log a refusal: one line, with the peer (`RefusalLog`: a flood of them is counted, not logged each)."""
        self.counters.refusals[code.name] = self.counters.refusals.get(code.name, 0) + 1
        where = f"session {session.number} from {peer}" if session is not None else peer
        self.refusal_log.warning(peer, code.name, "refused %s: %s %s", where, code.name, reason)

    # -- methods -----------------------------------------------------------------------------
    async def stats(self, request: bytes, context: aio.ServicerContext) -> bytes:
        """Counters only: never waits for a session or a computation slot, so floods and long prefills cannot starve it."""
        counters = asdict(self.counters)
        report = {
            "sessions": len(self._sessions),
            "sessions_rejected": counters["refusals"].get("RESOURCE_EXHAUSTED", 0),
            **counters,
            "max_sessions": self.limits.max_sessions,
            "idle_timeout": self.limits.idle_timeout,
            "limits": asdict(self.limits),
            "cloud_layers": [self.schedule.cloud_layers.start, self.schedule.cloud_layers.stop],
            "batching": None if self.batcher is None else self.batcher.stats(),
            "rss_bytes": rss_bytes(),
            "pid": os.getpid(),
        }
        return json.dumps(report).encode()

    async def session(self, request_iterator, context: aio.ServicerContext) -> None:
        """One generation session: a fresh Cloud, one reply per request, in order."""
        peer = context.peer()
        session = None
        outcome = "ended by the client"
        refusal = None
        try:
            session = self._open(peer)
            session.handler = asyncio.current_task()
            session.cloud = self._cloud_class(self.schedule, self.part)
            session.cloud.batcher = self.batcher
            if self.batcher is not None:  # the edge's failover replay learns that replies depend on their batch
                metadata = ((BATCHING_METADATA, f"{1e3 * self.batcher.window:g}"),)
                await self._send(session, context.send_initial_metadata(metadata), "its stream's metadata")
            while True:
                request = await self._next_request(session, context)
                if request is aio.EOF:
                    break
                self._check_request(request)
                kind = _kind(request)
                if kind == protocol.Kind.HIDDEN:
                    reply = await self._compute(session, request, context)
                    session.worked, session.turned = time.monotonic(), False
                else:  # START, TURN (or a refused kind): no layers run, answered on the loop
                    reply = self._handle(session.cloud, request)
                    if kind == protocol.Kind.TURN and not session.turned:  # a new request's first message: the user's pause
                        session.worked, session.turned = time.monotonic(), True  # ends here (once per computation)
                await self._write(session, context, reply)
        except Refusal as error:
            refusal = error
            outcome = f"refused ({error.code.name})"
        except asyncio.CancelledError:
            if not self._stopping:
                outcome = "cancelled by the client"
                raise
            # `end_sessions` cancelled it: the client is told why, and gRPC's stop finds no call left to abort.
            # A send still under way finishes first: gRPC cannot end a stream halfway through a send.
            if session is not None and session.sending is not None and not session.sending.done():
                await asyncio.wait([session.sending], timeout=1.0)
            refusal = Refusal(grpc.StatusCode.UNAVAILABLE, "the cloud is shutting down")
            outcome = "ended: the server is stopping"
        finally:
            if session is not None:
                self._close(session, outcome)
        if refusal is not None:
            self.refuse(peer, refusal.code, refusal.reason, session)
            await context.abort(refusal.code, refusal.reason)

    # -- one message -------------------------------------------------------------------------
    async def _next_request(self, session: _Session, context: aio.ServicerContext):
        """The next message, or EOF; Refusal when the session idles out or outlives its lifetime first.

        Idle counts from the session's last computation (or its opening), not from its last message: a START
        computes nothing, and one connection that sent a 40-byte START on each of 8 streams every few seconds
        held every session of the cloud past four idle timeouts, refusing every other client.

        Waits use `asyncio.timeout`, never `asyncio.wait_for`: on Python 3.11, `wait_for` swallows a
        cancel that lands as its awaitable finishes, and the server's stop cancels the handlers."""
        now = time.monotonic()
        wait = min(session.worked + self.limits.idle_timeout - now, session.expires - now)
        try:
            async with asyncio.timeout(max(0.0, wait)):
                return await context.read()
        except TimeoutError:
            if time.monotonic() >= session.expires:
                raise self._past_lifetime() from None
            raise Refusal(grpc.StatusCode.CANCELLED, f"idle for {self.limits.idle_timeout:g} s (no states to compute)") from None

    def _past_lifetime(self) -> Refusal:
        return Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, f"{protocol.PAST_LIFETIME} of {self.limits.session_lifetime:g} s")

    async def _write(self, session: _Session, context: aio.ServicerContext, reply: bytes) -> None:
        await self._send(session, context.write(reply), "its reply")

    async def _send(self, session: _Session, send: Awaitable[None], what: str) -> None:
        """Run a send to the client to its end, even when the server's stop cancels the handler meanwhile
        (`session.sending`: the stop waits for it before ending the stream; ending it halfway fails in gRPC,
        and the client would hear "Cancelling all calls" instead of why). A client that does not take it
        within the idle time (or the session's life) is refused."""
        sending = session.sending = asyncio.ensure_future(send)
        sending.add_done_callback(lambda done: done.cancelled() or done.exception())  # its error is the handler's to raise
        wait = min(self.limits.idle_timeout, session.expires - time.monotonic())
        try:
            async with asyncio.timeout(max(1.0, wait)):
                await asyncio.shield(sending)
        except TimeoutError:
            raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, f"the client did not read {what} in time") from None

    def _check_request(self, request: bytes) -> None:
        """The limits, from the length and the header alone: a refused message costs no computation."""
        limits = self.limits
        if len(request) > limits.message_bytes:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"message of {len(request)} bytes exceeds the limit of {limits.message_bytes}")
        if _kind(request) != protocol.Kind.HIDDEN:
            return
        *_, step, start, count, _crc = protocol.HEADER.unpack_from(request)
        end = start + count
        if end > limits.context:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"positions up to {end - 1} (step {step}) go beyond the model's context of {limits.context}")
        if count > limits.message_positions:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"message carries {count} positions, more than the limit of {limits.message_positions}")
        if end > limits.session_positions:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the session would reach {end} positions, more than the limit of {limits.session_positions}")

    def _handle(self, cloud, request: bytes) -> bytes:
        """`Cloud.handle`, with any error caused by the client's bytes turned into INVALID_ARGUMENT."""
        try:
            return cloud.handle(request)
        except TriadicError as error:  # ProtocolError, or a codec refusing what the client's states became
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(error).splitlines()[0]) from None

    async def _compute(self, session: _Session, request: bytes, context: aio.ServicerContext) -> bytes:
        """Run one message in the pool, under a computation slot held until the computation really ends."""
        now = time.monotonic()
        deadline = min(now + self.limits.request_timeout, session.expires)
        client_left = context.time_remaining()
        if client_left is not None:
            deadline = min(deadline, now + client_left)
        try:
            async with asyncio.timeout(max(0.0, deadline - now)):
                await self._slots.acquire()
        except TimeoutError:
            raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, "no computation slot came free before the request's deadline") from None
        signal_ = StopSignal(deadline)
        try:
            job = self._executor.submit(self._run, session.cloud, request, signal_)
        except BaseException:
            self._slots.release()
            raise
        job.add_done_callback(self._release_slot)
        session.computation = job
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            signal_.cancelled.set()  # the thread stops at its next layer; the slot is freed then
            raise
        except Stopped as stopped:
            if stopped.reason == "cancelled":
                raise Refusal(grpc.StatusCode.CANCELLED, "cancelled") from None
            if time.monotonic() >= session.expires:  # the deadline was the session's end, not the message's
                raise self._past_lifetime() from None
            raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, f"the message did not finish within its deadline ({self.limits.request_timeout:g} s per message)") from None
        except Refusal:
            raise
        except Exception as error:  # a bug: keep serving the other sessions, say what failed
            logger.exception("session %d from %s failed", session.number, session.peer)
            raise Refusal(grpc.StatusCode.INTERNAL, f"cloud error: {type(error).__name__}: {error}".splitlines()[0]) from None

    def _run(self, cloud, request: bytes, stop: StopSignal) -> bytes:
        """In a pool thread: the layers, with the stop check between them."""
        with self._counter_lock:
            counters = self.counters
            counters.computations_total += 1
            counters.computations_running += 1
            counters.max_computations_running = max(counters.max_computations_running, counters.computations_running)
        try:
            stop.check()
            cloud.on_layer = stop.check
            return self._handle(cloud, request)
        except Stopped:
            with self._counter_lock:
                self.counters.computations_stopped += 1
            raise
        finally:
            cloud.on_layer = None
            with self._counter_lock:
                self.counters.computations_running -= 1

    def _release_slot(self, job: futures.Future) -> None:
        self._on_loop(self._slots.release)

    def _on_loop(self, function, *args) -> None:
        """Run `function` on the serving loop, from a computing thread."""
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass

    # -- session bookkeeping -----------------------------------------------------------------
    def _open(self, peer: str) -> _Session:
        if self._stopping:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "the cloud is shutting down")
        if len(self._sessions) >= self.limits.max_sessions:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the cloud serves at most {self.limits.max_sessions} sessions at once; try again later")
        now = time.monotonic()
        session = _Session(next(self._numbers), peer, now, now + self.limits.session_lifetime, worked=now)
        self._sessions[session.number] = session
        self.counters.sessions_total += 1
        logger.debug("session %d opened from %s (%d open)", session.number, peer, len(self._sessions))
        return session

    def _close(self, session: _Session, outcome: str) -> None:
        """Free the session once its last computation has ended (now, or from that computation's callback)."""
        job = session.computation
        if job is not None and not job.done():
            job.add_done_callback(lambda _: self._on_loop(self._close, session, outcome))
            return
        if session.closed:
            return
        session.closed = True
        self._sessions.pop(session.number, None)
        # A refused session's line is its refusal's (`refuse`); the others that computed say how they ended, and from where
        # (a session that computed nothing is a debug line: a client opening and closing streams in a loop wrote 40 KB/s).
        level = logging.DEBUG if outcome.startswith("refused") or session.computation is None else logging.INFO
        logger.log(level, "session %d from %s %s (%d open)", session.number, session.peer, outcome, len(self._sessions))
        if session.cloud is not None:
            if self.batcher is not None:
                self.batcher.forget(session.cloud)
            # Free the caches now, whoever still refers to the Cloud (a traceback's frame, say), then
            # hand the freed memory back to the system instead of keeping it in malloc's arenas. A session that
            # never computed holds neither (a client churning empty sessions cost 4.2 ms of CPU a session).
            if session.computation is not None:
                session.cloud.reset()
                if not self._stopping:  # a stopping server exits (and asyncio.run may have shut the executor trim would use)
                    self._loop.run_in_executor(None, LIBC.trim)
            session.cloud = None

    def stop(self) -> None:
        self._stopping = True
        self.refusal_log.flush()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def end_sessions(self, wait: float) -> None:
        """Refuse new sessions, cancel the open ones' handlers (each ends its stream with UNAVAILABLE and a reason),
        and give them, and the computations they leave running, `wait` seconds in all to end (so each session's
        end is logged while the loop still runs)."""
        self._stopping = True
        deadline = time.monotonic() + wait
        handlers = [s.handler for s in self._sessions.values() if s.handler is not None]
        for handler in handlers:
            handler.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=wait)
        while self._sessions and time.monotonic() < deadline:  # computations stop at their next layer; then each session closes and says how
            await asyncio.sleep(0.01)

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)


def _kind(request: bytes) -> int | None:
    """The message kind from a header that looks like ours; None otherwise (Cloud.handle says what is wrong)."""
    if len(request) >= protocol.HEADER_SIZE and request[:2] == protocol.MAGIC:
        return request[3]
    return None


class _TokenCheck(aio.ServerInterceptor):
    """Checks the bearer token on the event loop, before a handler is chosen: a wrong token costs no session, slot or thread."""

    def __init__(self, expected: bytes, service: CloudService) -> None:
        self.expected, self.service = expected, service

        async def refuse_unary(request, context):
            await self._refuse(context)

        async def refuse_stream(request_iterator, context):
            await self._refuse(context)

        self._unary = grpc.unary_unary_rpc_method_handler(refuse_unary)
        self._stream = grpc.stream_stream_rpc_method_handler(refuse_stream)

    async def _refuse(self, context: aio.ServicerContext) -> None:
        reason = "missing or wrong token (metadata authorization: Bearer <token>)"
        self.service.refuse(context.peer(), grpc.StatusCode.UNAUTHENTICATED, reason)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        given = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        if hmac.compare_digest(given, self.expected):
            return await continuation(details)
        return self._stream if details.method == SESSION_METHOD else self._unary


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
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice); a batching server on an AVX-512 CPU runs its fp32 (or, with AVX512_BF16, bf16) products on them in src/panels.py's kernel")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--token-file", default=None, help="file holding a bearer token clients must send")
    g = p.add_argument_group("limits (every refusal is one log line naming the peer)")
    g.add_argument("--max-sessions", type=int, default=8, help="sessions open at once; more get RESOURCE_EXHAUSTED (default 8)")
    g.add_argument("--max-computations", type=int, default=None, help="messages computed at once (default: --max-sessions)")
    g.add_argument("--max-session-positions", type=int, default=None, help="positions one session may reach (default and maximum: the model's context)")
    g.add_argument("--max-message-positions", type=int, default=4096, help="positions one message may carry (default 4096, at most the context); "
                   "the byte limit per message follows: 4 bytes per value")
    g.add_argument("--max-message-mb", type=float, default=None, help="a lower byte limit per message, in MiB (default: the one derived from the positions)")
    g.add_argument("--request-timeout", type=float, default=120.0, help="seconds one message may take, waiting included (default 120)")
    g.add_argument("--session-lifetime", type=float, default=3600.0, help="seconds a session may live (default 3600)")
    g.add_argument("--idle-timeout", type=float, default=300.0, help="seconds a session may go without states to compute, STARTs aside (default 300)")
    g.add_argument("--connection-idle", type=float, default=120.0, help="seconds a connection without streams stays open (default 120)")
    g.add_argument("--max-connections", type=int, default=1024, help="TCP connections at once (default 1024; limits per peer belong in a firewall)")
    g.add_argument("--max-streams-per-connection", type=int, default=16, help="concurrent calls on one connection (default 16)")
    g.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True,
                   help="cross-session batching: concurrent sessions' layer work runs together (default on; packed products "
                        "differ from a session's own in the last bits, so a failover replay is no longer bit-exact: the server "
                        "says so to each edge in the stream's metadata, `triadic-batching`)")
    g.add_argument("--batch-window-ms", type=float, default=DEFAULT_BATCH_WINDOW_MS,
                   help=f"how long a step may wait for the other sessions mid-generation to join it (default {DEFAULT_BATCH_WINDOW_MS:g}; "
                        "it runs as soon as all have; 0: no waiting, steps already pending still run together)")
    g.add_argument("--batch-max-rows", type=int, default=DEFAULT_BATCH_MAX_ROWS,
                   help=f"positions one batch runs at most over all its sessions, decode steps aside (default {DEFAULT_BATCH_MAX_ROWS}); "
                        "a longer step (a long prompt) runs one layer call at a time between batches, so that it never holds "
                        "the others back for more than one of its calls")
    return p


def _check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise TriadicError(f"--port {args.port} is outside [0, 65535]")
    for name in ("max_sessions", "max_connections", "max_streams_per_connection", "max_message_positions", "batch_max_rows"):
        if getattr(args, name) < 1:
            raise TriadicError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_computations", "max_session_positions"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TriadicError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("request_timeout", "session_lifetime", "idle_timeout", "connection_idle"):
        check_seconds(getattr(args, name), f"--{name.replace('_', '-')}")
    if args.max_message_mb is not None and not 0 < args.max_message_mb <= 2047:
        raise TriadicError("--max-message-mb must be in (0, 2047]")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise TriadicError("--tls-cert and --tls-key go together")
    if args.threads is not None and args.threads < 1:
        raise TriadicError("--threads must be at least 1")
    if not 0 <= args.batch_window_ms <= 1000:
        raise TriadicError("--batch-window-ms must be in [0, 1000]")


def make_limits(args, config) -> Limits:
    """The limits from the flags and the model: nothing may exceed the model's context (as the split runs it)."""
    context = context_length(config)[0]
    session_positions = min(args.max_session_positions or context, context)
    message_positions = min(args.max_message_positions, session_positions)
    derived_bytes = message_positions * config.hidden_size * BYTES_PER_VALUE + MESSAGE_SLACK
    return Limits(
        max_sessions=args.max_sessions,
        max_computations=args.max_computations or args.max_sessions,
        session_positions=session_positions,
        message_positions=message_positions,
        message_bytes=min(derived_bytes, int(args.max_message_mb * (1 << 20))) if args.max_message_mb else derived_bytes,
        request_timeout=args.request_timeout,
        session_lifetime=args.session_lifetime,
        idle_timeout=args.idle_timeout,
        context=context,
    )


def server_options(args, limits: Limits) -> list[tuple[str, int]]:
    """gRPC's own bounds on connections, calls and bytes."""
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    return [
        # Twice the limit: a message up to it reaches the handler and is refused with a log line; a
        # larger one gRPC refuses itself (RESOURCE_EXHAUSTED) before any handler sees it.
        ("grpc.max_receive_message_length", 2 * limits.message_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.max_metadata_size", 16 * 1024),
        ("grpc.max_concurrent_streams", args.max_streams_per_connection),
        ("grpc.max_allowed_incoming_connections", args.max_connections),
        ("grpc.server_handshake_timeout_ms", 5_000),  # a connection that never completes its handshake is dropped
        ("grpc.max_connection_idle_ms", ms(args.connection_idle)),
        # A connection lives at most two session lifetimes: GOAWAY after one, streams then have one more to end.
        ("grpc.max_connection_age_ms", ms(limits.session_lifetime)),
        ("grpc.max_connection_age_grace_ms", ms(limits.session_lifetime)),
        ("grpc.keepalive_time_ms", 60_000),  # ping each client every minute: a vanished one frees its session
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients may not ping more often than this
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
    ]


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


@dataclass
class Loaded:
    """What `load` prepared before the server starts: the service and how to listen."""

    service: CloudService
    credentials: grpc.ServerCredentials | None
    options: list[tuple[str, int]]


def _check_tls_pair(cert_path: str, key_path: str) -> None:
    """The certificate and key as a TLS server would use them (Python's OpenSSL), before the weights load: gRPC finds a
    key that is not the certificate's, or a PEM that holds no certificate, only when the port opens, and then says it
    cannot bind to the address."""
    import ssl

    def no_password() -> bytes:  # gRPC takes no encrypted key: a password prompt would hang a server
        raise TriadicError(f"--tls-key {key_path}: the key is encrypted; gRPC needs it unencrypted")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=no_password)
    except ssl.SSLError as error:
        reason = {"KEY_VALUES_MISMATCH": "the key does not belong to the certificate"}.get(error.reason or "") or \
            f"OpenSSL cannot read them as a certificate chain and its key ({error.reason or error.args[-1]})"
        raise TriadicError(f"--tls-cert {cert_path} / --tls-key {key_path}: {reason}") from None


def load(args) -> Loaded:
    """Check the flags, load the cloud part. Raises TriadicError on bad input."""
    from ..checkpoint import load_config, resolve_model_dir
    from ..pipeline import SideOptions, build_cloud, cloud_part_class
    from ..precision import check_device, resolve_dtype
    from ..schedule import SplitSchedule

    _check_args(args)
    _check_port_free(args.host, args.port)
    first = parse_layer_set(args.first, "--first")
    second = parse_layer_set(args.second, "--second")
    check_device(args.cloud_device, "--cloud-device")
    side = SideOptions(args.cloud_device, resolve_dtype(args.cloud_dtype, args.cloud_device)[0], args.load_in_8bit)
    token = read_token(args.token_file) if args.token_file else None
    credentials = None
    if args.tls_cert:
        cert, key = read_file(args.tls_cert, "--tls-cert"), read_file(args.tls_key, "--tls-key")
        if b"-----BEGIN" not in cert or b"-----BEGIN" not in key:
            raise TriadicError("--tls-cert/--tls-key: expected PEM files")
        _check_tls_pair(args.tls_cert, args.tls_key)
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
    limits = make_limits(args, config)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from .batching import Batcher, enable_packing, why_not_batchable
    from ..panels import use_panels

    batching = args.batching
    if batching:  # asked of the part built on the meta device (no weights read): its family and resolved attention
        reason = why_not_batchable(cloud_part_class(args.two_part)(config, schedule.cloud_layers))
        if reason is not None:
            logger.info("cross-session batching is off: %s", reason)
            batching = False
    # Batched results differ from a lone run's in the last bits anyway, so a batching server stores its
    # weights in the layout that is faster over several rows; unbatched, in transformers' layout, to compute what HF computes.
    cloud = build_cloud(model_dir, config, schedule, args.two_part, args.lora_weights, side, column_major=batching)
    service = CloudService(schedule, cloud.part, limits, token)
    for codec in CODECS.values():  # any an edge may send: built now, not inside its first request
        codec.prepare()
    if batching:
        enable_packing(cloud.part)
        reason = use_panels(cloud.part)  # faster still over a few rows, where it can run
        if reason is not None:
            logger.info("the layers' products stay torch's: %s", reason)
        service.batcher = Batcher(args.batch_window_ms / 1e3, max_rows=args.batch_max_rows)
    return Loaded(service, credentials, server_options(args, limits))


async def serve(args, loaded: Loaded, stop: _StopEvent) -> int:
    """Listen until `stop` is set; 2 where the address cannot be bound."""
    service = loaded.service
    service.bind_loop()
    server = aio.server(handlers=[service.handler()], interceptors=service.interceptors(), options=loaded.options)
    address = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    try:
        port = server.add_secure_port(address, loaded.credentials) if loaded.credentials else server.add_insecure_port(address)
    except RuntimeError as error:
        port, reason = 0, (str(error).splitlines()[0] if str(error) else "bind failed")
    else:
        reason = "address in use or not available"
    if port == 0:
        service.stop()
        print(f"{PROG}: error: cannot listen on {address}: {reason}", file=sys.stderr)
        return 2
    await server.start()
    host = f"[{args.host}]" if ":" in args.host else args.host
    limits = service.limits
    scheme = "TLS" if args.tls_cert else "plaintext"
    logger.info("listening on %s:%d", host, port)
    # Said at start: an edge checking lossless tokens against HF needs this dtype on its side too, and an unbatched
    # server (a batching one computes in another layout and order: the same tokens in fp32, not always in bf16).
    dtype = dtype_name(next(service.part.parameters()).dtype)
    batching = f"batching (window {1e3 * service.batcher.window:g} ms)" if service.batcher is not None else "no batching"
    logger.info("computes in %s, %s", dtype, batching)
    logger.info(
        "%s, cloud layers [%d, %d), first=%s second=%s; at most %d sessions, %d computations, %d positions per session, "
        "%d per message (%d bytes), %gs per message, %gs per session%s",
        scheme, service.schedule.cloud_layers.start, service.schedule.cloud_layers.stop, list(service.schedule.first),
        list(service.schedule.second), limits.max_sessions, limits.max_computations, limits.session_positions,
        limits.message_positions, limits.message_bytes, limits.request_timeout, limits.session_lifetime,
        ", token required" if args.token_file else "",
    )
    await stop.wait()
    logger.info("%s: stopping (%d open sessions cancelled)", stop.reason, service.open_sessions)
    await service.end_sessions(wait=1.0)
    await server.stop(grace=1.0)
    service.stop()
    return 0


class _StopEvent(asyncio.Event):
    reason = "stop"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    LIBC.configure()  # before the compute and gRPC threads exist
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        loaded = load(args)
    except TriadicError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the weights load
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130

    async def run() -> int:
        stop = _StopEvent()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            def on_signal(signum: int = signum) -> None:
                stop.reason = signal.Signals(signum).name
                stop.set()

            loop.add_signal_handler(signum, on_signal)
        return await serve(args, loaded, stop)

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
