"""The edge as an OpenAI-compatible HTTP service (FastAPI), and the page that shows where each token was computed.

    POST /v1/chat/completions   OpenAI's request and response (stream: server-sent events ending in [DONE]),
                                plus the extension field `split_trace` (per token: cuts a, b, bytes, positions)
    GET  /v1/models             the split model, and "<name>-unsplit" (the same weights on the edge alone)
    GET  /health                {"status": "ok", "running": ..., "waiting": ...}
    GET  /                      the page (src/serve/static: plain HTML, JS and CSS)

One request decodes at a time: the edge's caches belong to one sequence, and the CPU has nothing to
spare for a second. Up to `max_queue` more wait their turn in arrival order; past that a request is
refused at once with 429. Every request is bounded: its body in bytes and in the time it takes to
arrive, its tokens by the context, its decoding time (prefill included) by `time_limit`, its wait by
the queue's length times that.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import hmac
import itertools
import json
import logging
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..utils import TriadicError, adopt_torch_threads
from .api import ApiError, ChatRequest, error_body, parse_chat_request
from .engine import ROLES, Cancelled, Completion, EdgeEngine, Options, Started, TokenEvent

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
UNSPLIT_SUFFIX = "-unsplit"
CLIENT_GONE = 499  # nginx's status for a client that closed its request; nobody reads the answer
T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    """What the service allows; every field bounds something a client could otherwise grow."""

    max_queue: int = 4  # requests that may wait while one decodes; more are refused with 429
    api_key: str | None = None  # when set, /v1/* need "Authorization: Bearer <key>"
    max_body_bytes: int = 1 << 20  # a request body larger than this is refused with 413
    time_limit: float = 300.0  # seconds of decoding per request; then it ends with finish_reason "length"
    body_timeout: float = 30.0  # seconds for a request's body to arrive once its headers have; then 408


class Ticket:
    """One admitted request's place: waiting for the model, holding it, or handed to the decoding thread.

    `release` may be called from several exits (end of stream, client gone, response finished); it
    acts once, and never frees the model while a decoding thread still runs on it (that thread
    releases it when it returns).
    """

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.state = "waiting"

    async def acquire(self) -> None:
        """Wait for the model; ApiError 503 where the server begins to stop first."""
        locking = asyncio.ensure_future(self.admission.lock.acquire())
        stopping = asyncio.ensure_future(self.admission.stopping.wait())
        try:
            await asyncio.wait({locking, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not locking.done():
                locking.cancel()  # asyncio.Lock hands a grant it can no longer deliver to the next waiter
        if locking.done() and not locking.cancelled():
            self.state = "holding"
        self.admission.check_running()

    def release(self, by_worker: bool = False) -> None:
        if self.state == "done" or (self.state == "running" and not by_worker):
            return
        if self.state in ("holding", "running"):
            self.admission.lock.release()
        self.admission.admitted -= 1
        self.state = "done"


class Admission:
    """At most one request on the model and `max_queue` waiting; all on the event loop's thread."""

    def __init__(self, max_queue: int) -> None:
        self.lock = asyncio.Lock()  # FIFO: waiters are woken in arrival order
        self.limit = 1 + max_queue
        self.admitted = 0
        self.stopping = asyncio.Event()  # set as the server begins to stop (`stop`)

    def stop(self) -> None:
        """The server begins to stop: new and waiting requests get 503, the one decoding ends with an error (its stream
        with an error event and [DONE]), all within the server's graceful time, so that nothing is cut off unanswered."""
        self.stopping.set()

    def check_running(self) -> None:
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down; retry elsewhere or later", None, "server_shutting_down",
                           "server_error")

    def check(self) -> None:
        self.check_running()
        if self.admitted >= self.limit:
            raise ApiError(
                429, f"server busy: 1 request decoding and {self.limit - 1} waiting (the queue's limit); retry later",
                None, "rate_limit_exceeded", "requests",
            )

    def admit(self) -> Ticket:
        self.check()
        self.admitted += 1
        return Ticket(self)

    @property
    def running(self) -> int:
        return 1 if self.lock.locked() else 0


class ShortestFirst:
    """Encodings one at a time, the shortest waiting one next, but every other turn to one that waited past `patience`;
    all on the event loop's thread.

    Tokenizing comes before admission (a request's length in tokens decides whether it is admitted),
    so anyone may ask for it, and a 1 MiB message takes the tokenizer 0.5 s before it is refused as
    too long. In arrival order, an honest request waited behind every such message queued before it:
    its first token came 0.9 s late beside three clients posting them, 2.4 s beside eight. Shortest
    first, it waits for the one encoding under way, and one that waited long. That one is there so that
    short requests posted without pause cannot hold a long one back for ever: once it has waited
    `patience` seconds, it gets every other turn, the oldest first. Waiting costs no thread (the
    encoding runs in one); the connection limit bounds how many wait."""

    def __init__(self, patience: float = 1.0) -> None:
        self.patience = patience  # seconds after which a waiting encoding gets every other turn
        self._busy = False
        self._by_length: list[tuple[int, int, float, asyncio.Future]] = []  # a heap of (length, arrival number, since, turn)
        self._by_arrival: collections.deque[tuple[int, int, float, asyncio.Future]] = collections.deque()  # the same
        self._arrivals = itertools.count()
        self._last_to_shortest = False

    async def run(self, length: int, function: Callable[..., T], *args) -> T:
        """`function(*args)` in a thread, in its turn; `length` orders the waiting ones. A request cancelled meanwhile
        keeps the turn until its thread is done, so that encodings never run side by side."""
        async with self._turn(length):
            work = asyncio.ensure_future(asyncio.to_thread(function, *args))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                await asyncio.wait({work})
                raise

    @contextlib.asynccontextmanager
    async def _turn(self, length: int) -> AsyncIterator[None]:
        if self._busy:
            turn = asyncio.get_running_loop().create_future()
            entry = (length, next(self._arrivals), time.monotonic(), turn)
            heapq.heappush(self._by_length, entry)
            self._by_arrival.append(entry)
            try:
                await turn
            except asyncio.CancelledError:  # its client went away: pass the turn on if it had been given it
                if turn.done() and not turn.cancelled():
                    self._pass_on()
                raise
        self._busy = True
        try:
            yield
        finally:
            self._pass_on()

    def _pass_on(self) -> None:
        """The turn to the next waiting encoding (one given its turn or cancelled leaves both queues when met)."""
        while self._by_length and self._by_length[0][3].done():
            heapq.heappop(self._by_length)
        while self._by_arrival and self._by_arrival[0][3].done():
            self._by_arrival.popleft()
        if not self._by_length:
            self._busy = False
            return
        oldest = self._by_arrival[0]
        aged = time.monotonic() - oldest[2] > self.patience
        self._last_to_shortest = not (aged and self._last_to_shortest)
        (self._by_length[0] if self._last_to_shortest else oldest)[3].set_result(None)  # busy stays set: the turn is its


class DecodeThread:
    """The one thread that runs the admitted request's generation (Admission lets one run at a time).

    Long-lived rather than one per request, so that what torch keeps per thread is made once: its
    thread settings (`adopt_torch_threads`) and, on a GPU, the codec's CUDA graphs (`codec.replayed`),
    which a thread per request captured again at every request."""

    def __init__(self) -> None:
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, work: Callable[[], None]) -> None:
        """Run `work` on the thread, after those before it. It should answer its request whatever happens:
        what escapes it is logged, and the thread goes on to the next."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="edge-decode", daemon=True)
                self._thread.start()
        self._work.put(work)

    def _serve(self) -> None:
        adopt_torch_threads()
        while True:
            work = self._work.get()
            try:
                work()
            except Exception:  # a bug in `work`: the server keeps its decoding thread
                logger.exception("a generation's work raised")


class Models:
    """The served model ids: the split pipeline, and the unsplit baseline built on first use; the thread that runs them."""

    def __init__(self, split: EdgeEngine, build_unsplit: Callable[[], EdgeEngine] | None) -> None:
        self.split = split
        self._build_unsplit = build_unsplit
        self._unsplit: EdgeEngine | None = None
        self.decoder = DecodeThread()

    @property
    def ids(self) -> list[str]:
        return [self.split.name] + ([self.split.name + UNSPLIT_SUFFIX] if self._build_unsplit else [])

    def check(self, model: str | None) -> str:
        """The id a request names (none: the split model); 404 where it names none served here."""
        return self.served(model or self.split.name)

    def served(self, name: str) -> str:
        """`name` if it is served here, else the 404 OpenAI gives a model that does not exist (an empty id too)."""
        if name not in self.ids:
            raise ApiError(404, f"model {name!r} is not served here; choose from {', '.join(self.ids)}", "model", "model_not_found")
        return name

    def get(self, name: str) -> EdgeEngine:
        """The engine for a checked id; the unsplit one is loaded here, in the decoding thread, the first time."""
        if name == self.split.name:
            return self.split
        if self._unsplit is None:
            assert self._build_unsplit is not None  # its name is listed (and checked) only where it can be built
            began = time.perf_counter()
            self._unsplit = self._build_unsplit()
            logger.info("unsplit baseline loaded in %.1f s", time.perf_counter() - began)
        return self._unsplit


def create_app(models: Models, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="triadic-split edge", docs_url=None, redoc_url=None, openapi_url=None)
    admission = Admission(config.max_queue)
    app.state.admission = admission  # the server stops it (`Admission.stop`) as it begins to stop
    encodings = ShortestFirst()
    expected_auth = f"Bearer {config.api_key}".encode() if config.api_key else None
    engine = models.split
    created = int(time.time())

    def model_object(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "triadic-split"}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status == 429 else None
        if error.status in (408, CLIENT_GONE):  # the body was not read to its end: this connection cannot carry another request
            headers = {"Connection": "close"}
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {error.detail}", kind), status_code=error.status_code)

    def authorize(request: Request) -> None:
        """A dependency of every /v1 route (not a middleware: Starlette's would hide the client's disconnect)."""
        if expected_auth is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected_auth):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok", "model": engine.name, "models": models.ids, "split": engine.describe(), "auth": expected_auth is not None,
            "running": admission.running, "waiting": admission.admitted - admission.running,
        }

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict:
        return {"object": "list", "data": [model_object(name) for name in models.ids]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])  # a served name may hold a slash
    async def retrieve_model(model_id: str) -> dict:
        return model_object(models.served(model_id))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        admission.check()  # a full queue refuses before reading or tokenizing anything
        body = await _read_json(request, config.max_body_bytes, config.body_timeout)
        chat = parse_chat_request(body, ROLES)
        name = models.check(chat.model)
        try:
            length = sum(len(message["content"]) for message in chat.messages)
            prompt = await encodings.run(length, engine.prepare, chat.messages)  # every model here shares the tokenizer
        except TriadicError as error:
            raise ApiError(400, str(error), "messages") from None
        context = engine.context_length
        if len(prompt.token_ids) >= context:
            raise ApiError(400, f"the messages are {len(prompt.token_ids)} tokens; this model's context is {context}", "messages", "context_length_exceeded")
        max_tokens = chat.max_tokens if chat.max_tokens is not None else context - len(prompt.token_ids)
        if len(prompt.token_ids) + max_tokens > context:
            raise ApiError(
                400, f"{len(prompt.token_ids)} prompt tokens + max_tokens {max_tokens} exceed this model's context of {context}",
                chat.max_tokens_param, "context_length_exceeded",
            )
        options = Options(max_tokens, chat.stop, chat.temperature, chat.top_p, chat.seed, config.time_limit,
                          chat.top_k, chat.min_p, chat.repetition_penalty)
        try:  # the options with the model file's: refused here with 400, not after a stream has begun
            engine.sampling(options)
        except TriadicError as error:
            raise ApiError(400, str(error)) from None
        ticket = admission.admit()
        job = Job(models, name, prompt, options, ticket)
        reply = Reply(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), name, chat.include_usage)
        if chat.stream:
            return StreamingResponse(
                _sse(job, reply, chat), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, background=BackgroundTask(ticket.release),
            )
        try:
            completion = None
            async for item in job.events(request):
                if isinstance(item, Completion):
                    completion = item
        finally:
            ticket.release()
        if completion is None:  # the client went away: nobody reads this (499 as nginx logs it)
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(reply.completion(completion))

    return app


async def _read_json(request: Request, limit: int, timeout: float):
    """The body as JSON (400 if it is not): at most `limit` bytes (413 past it, without reading the rest),
    arriving within `timeout` seconds (408 after that: a client that promises a body and sends none
    must not hold a connection and a task for ever)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}", None, "request_too_large")
    try:
        async with asyncio.timeout(timeout):
            raw = await _read_body(request, limit)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s", None, "request_timeout") from None
    except ClientDisconnect:
        logger.info("client went away while sending its request body")
        raise ApiError(CLIENT_GONE, "the client closed the connection before its body arrived", None, "client_closed_request") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError:  # a number past Python's digit limit for int(): reading it would cost quadratic time
        raise ApiError(400, f"the request body holds an integer of more than {sys.get_int_max_str_digits()} digits") from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body's bytes, refused with 413 as soon as they pass `limit`."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class Job:
    """One request's decoding, run in its own thread once the model is free; events come back through a queue."""

    def __init__(self, models: Models, name: str, prompt, options: Options, ticket: Ticket) -> None:
        self.models, self.name, self.prompt, self.options, self.ticket = models, name, prompt, options, ticket

    async def _wait_for_the_model(self, request: Request | None) -> bool:
        """Take the model once it is free; False where the client left first.

        A stream's client that leaves cancels its response, and with it this wait (Starlette listens for the
        disconnect while it streams, under the ASGI 2.3 spec uvicorn speaks; a second reader here would race
        it). A client waiting for a whole answer is checked every second instead: one that left gives up its
        place in the queue then, not when its turn comes (retrying clients would otherwise fill the queue with
        requests nobody reads)."""
        if request is None:
            await self.ticket.acquire()
            return True
        waiting = asyncio.ensure_future(self.ticket.acquire())
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=1.0)
                if done:
                    waiting.result()
                    return True
                if await request.is_disconnected():
                    logger.info("client went away while its request waited for the model")
                    return False
        finally:
            if not waiting.done():
                waiting.cancel()  # asyncio.Lock hands a grant it can no longer deliver to the next waiter

    async def events(self, request: Request | None = None) -> AsyncIterator[Started | TokenEvent | Completion]:
        """Yields Started, every TokenEvent, then the Completion. Raises what decoding raised."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        if not await self._wait_for_the_model(request):
            return

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                cancel.set()

        def work() -> None:
            try:
                put(self.models.get(self.name).run(self.prompt, self.options, put, cancel.is_set))
            except Cancelled:
                put(Cancelled())
            except BaseException as error:  # handed to the request, which answers with it
                put(error)
            finally:
                try:
                    loop.call_soon_threadsafe(self.ticket.release, True)
                except RuntimeError:
                    pass

        self.ticket.state = "running"
        began = checked = time.monotonic()
        self.models.decoder.run(work)
        try:
            while True:
                try:
                    async with asyncio.timeout(0.25 if self.ticket.admission.stopping.is_set() else 1.0):
                        item = await queue.get()
                except TimeoutError:
                    item = None
                if request is not None and time.monotonic() - checked >= 1.0:  # a stream learns it from its send instead
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        logger.info("client went away; stopping its generation")
                        return
                if self.ticket.admission.stopping.is_set() and not isinstance(item, Completion):  # a finished one goes out
                    logger.info("the server is stopping: ending the generation under way")
                    raise ApiError(503, "the server is shutting down: the answer was cut short", None, "server_shutting_down",
                                   "server_error")
                if item is None:
                    continue
                if isinstance(item, Cancelled):
                    return
                if isinstance(item, BaseException):
                    raise _as_api_error(item)
                if isinstance(item, Completion):
                    seconds = time.monotonic() - began
                    logger.info(
                        "%s: %d prompt tokens, %d generated (%s) in %.1f s, %d bytes up, %d down", self.name,
                        item.prompt_tokens, len(item.token_ids), item.stopped_by, seconds, item.bytes_up, item.bytes_down,
                    )
                yield item
                if isinstance(item, Completion):
                    return
        finally:
            cancel.set()  # the thread stops at its next token if the answer is no longer wanted


def _as_api_error(error: BaseException) -> ApiError:
    """What a failure during decoding tells the client: the cloud link's one line, or that the server failed."""
    if isinstance(error, TriadicError):  # the link or the cloud (LinkError, ProtocolError) or the edge's own checks
        logger.warning("generation failed: %s", error)
        if getattr(error, "code", None) == "RESOURCE_EXHAUSTED" and "too large" in str(error):
            # The cloud's own limit on one message (`--max-message-positions`, its bytes) or a session's positions:
            # the request is too long for this split, whichever cloud serves it (the unsplit model has no such limit).
            return ApiError(400, f"the request is too long for the split's cloud: {error}", "messages", "context_length_exceeded")
        return ApiError(502, f"the split generation failed: {error}", None, "split_failed", "server_error")
    logger.error("generation failed", exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}", None, None, "server_error")


@dataclass(frozen=True)
class Reply:
    """OpenAI's envelope around one completion: the same id, time and model in every chunk."""

    id: str
    created: int
    model: str
    include_usage: bool = False  # a stream that ends with a usage chunk: every chunk before it says "usage": null, as OpenAI's

    def envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    @staticmethod
    def usage(done: Completion) -> dict:
        completion_tokens = len(done.token_ids)
        return {
            "prompt_tokens": done.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": done.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
        }

    @staticmethod
    def trace_end(done: Completion) -> dict:
        return {"stopped_by": done.stopped_by, "bytes_up": done.bytes_up, "bytes_down": done.bytes_down}

    def completion(self, done: Completion) -> dict:
        trace = {**done.head, "tokens": [event.trace() for event in done.events], **self.trace_end(done)}
        return {
            **self.envelope("chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": None, "finish_reason": done.finish_reason}],
            "usage": self.usage(done),
            "split_trace": trace,
        }

    def chunk(self, delta: dict, finish_reason: str | None = None, trace: dict | None = None) -> dict:
        out = {**self.envelope("chat.completion.chunk"), "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if self.include_usage:
            out["usage"] = None
        if trace is not None:
            out["split_trace"] = trace
        return out


def _event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(job: Job, reply: Reply, chat: ChatRequest) -> AsyncIterator[str]:
    """The stream: a role chunk (with the trace's head), one chunk per token (with its trace), a last chunk, [DONE].

    A failure after the first byte can no longer change the status code: it goes out as an
    `{"error": ...}` event, as OpenAI's streams do, before [DONE].
    """
    try:
        async for item in job.events():
            if isinstance(item, Started):
                yield _event(reply.chunk({"role": "assistant", "content": ""}, trace=item.trace))
            elif isinstance(item, TokenEvent):
                yield _event(reply.chunk({"content": item.text}, trace={"tokens": [item.trace()]}))
            else:
                if item.tail:
                    yield _event(reply.chunk({"content": item.tail}))
                yield _event(reply.chunk({}, item.finish_reason, trace=reply.trace_end(item)))
                if chat.include_usage:
                    yield _event({**reply.envelope("chat.completion.chunk"), "choices": [], "usage": reply.usage(item)})
    except ApiError as error:
        yield _event(error.body())
    finally:
        job.ticket.release()
    yield _event("[DONE]")
