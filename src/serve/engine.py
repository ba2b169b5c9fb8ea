"""The one place where the edge server meets the decoding API: messages + options in, tokens with their trace out.

    engine = EdgeEngine(pipeline, name="SmolLM2-135M-Instruct", chat=ChatTokenizer(pipeline.tokenizer))
    prompt = engine.prepare(messages)                  # token ids; TriadicError for what the model cannot take
    done = engine.run(prompt, options, emit, cancelled)  # emit(Started), then emit(TokenEvent) per token

Everything the HTTP layer (src/serve/app.py) and the page know about the split comes through here:

- one edge session (`edge.session()`) serves every request, so a conversation whose messages extend
  the previous request's keeps both sides' caches and prefills only its new positions (llama.cpp's
  prefix reuse; `cached_tokens` in the usage and the trace); an edited history is cut back to the
  longest common prefix on both sides. With `reuse_prefix` off (`--no-prefix-reuse`) every request
  starts a new session instead, so that its answer does not depend on the requests before it;
- `temperature`, `top_p`, `seed` and the extensions `top_k`, `min_p`, `repetition_penalty` become a
  `SamplingConfig` (temperature 0: greedy), applied with transformers' own logits processors;
- stop strings are matched on the detokenized text by `TextStream` and end the generation from the
  `on_token` hook;
- the time limit and the client's departure are checked after every token (`on_token`) and, during
  the prefill, between layers (`Party.on_layer`) on the edge and on a cloud in this process, so a
  long prompt stops within one layer. A prefill stopped there leaves both sides' caches partial:
  the session is dropped and the next request starts a new one.

The per-token trace does not need the decoding API at all: the cuts of step t are the shared
schedule's pure function `schedule.cuts(t)`, and the bytes are counted where they cross, on the link
(`TracingLink` reads each message's 24-byte header for its position count).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..cli import eos_token_ids
from ..families import context_length
from ..link import protocol
from ..pipeline import Pipeline
from ..sampling import MIN_TEMPERATURE, SEED_LIMIT, Sampler, SamplingConfig, TextStream, model_generation_defaults
from ..utils import ALPACA_TEMPLATE, StopSignal, Stopped, TriadicError, apply_chat_template

logger = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Options:
    """How one request decodes; validated by the HTTP layer before it gets here."""

    max_tokens: int  # new tokens at most, the end-of-sequence token included
    stop: tuple[str, ...] = ()  # the text ends before the first of these; finish_reason "stop"
    temperature: float | None = None  # 0: greedy; None (not given): sample at the model's default, as OpenAI's API
    top_p: float | None = None  # nucleus mass
    seed: int | None = None  # the sampler's seed (not the split schedule's); None: a fresh one per request
    time_limit: float | None = None  # seconds of decoding at most; then finish_reason "length"
    top_k: int | None = None  # None: the model's generation_config, else transformers' 50 (as generate); 0: off
    min_p: float | None = None  # None: the model's generation_config, else off
    repetition_penalty: float | None = None  # None: the model's generation_config, else off; applies when greedy too


@dataclass(frozen=True)
class Prompt:
    """A conversation as the model reads it."""

    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Started:
    """The request has the model; the first thing `run` emits, before any token."""

    trace: dict  # the split (`describe`), prompt_tokens, cached_tokens, prefilled, decoding


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and what its step cost on the link."""

    index: int  # the schedule's step that produced it (0 = the prefill of a session's first request)
    token_id: int
    piece: str  # what this token adds to the decoded text ("" while a multi-byte character is incomplete)
    text: str  # what the client may show now (held back while it may be the start of a stop string)
    a: int  # first cut of this step: the edge ran [0, a)
    b: int  # second cut: the cloud ran [a, b), the edge [b, L)
    bytes_up: int  # bytes of this step's message to the cloud (0 when a == b: nothing crossed)
    bytes_down: int
    positions_up: int  # hidden states that message carried (all prompt positions at the prefill)
    positions_down: int

    def trace(self) -> dict:
        return {
            "id": self.token_id, "text": self.piece, "step": self.index, "a": self.a, "b": self.b,
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "positions_up": self.positions_up, "positions_down": self.positions_down,
        }


@dataclass
class Completion:
    """The outcome of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str  # OpenAI's: "stop" (end of sequence or a stop string) or "length"
    stopped_by: str  # finer: "eos", "stop", "max_tokens" or "time_limit"
    head: dict  # what `Started` said
    events: list[TokenEvent] = field(default_factory=list)
    tail: str = ""  # text released after the last token's event (held back, or an incomplete last character)

    @property
    def prompt_tokens(self) -> int:
        return self.head["prompt_tokens"]

    @property
    def cached_tokens(self) -> int:
        return self.head["cached_tokens"]

    @property
    def bytes_up(self) -> int:
        return sum(e.bytes_up for e in self.events)

    @property
    def bytes_down(self) -> int:
        return sum(e.bytes_down for e in self.events)


class TracingLink:
    """A `Link` that forwards every message unchanged and records its size and position count.

    Counting here, where the bytes cross, needs nothing from the decoding loop. Only HIDDEN requests
    are steps; the START message that opens a session is not recorded.
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.exchanges: list[tuple[int, int, int, int]] = []  # (bytes up, bytes down, positions up, positions down)

    def request(self, data: bytes) -> bytes:
        reply = self.inner.request(data)
        if _header(data)[0] == protocol.Kind.HIDDEN:  # a step's states; not a session's START (or a later turn's)
            self.exchanges.append((len(data), len(reply), _header(data)[1], _header(reply)[1]))
        return reply

    def take(self) -> tuple[int, int, int, int]:
        """What crossed since the last call (one exchange per step at most), and forget it."""
        total = tuple(sum(column) for column in zip(*self.exchanges)) if self.exchanges else (0, 0, 0, 0)
        self.exchanges.clear()
        return total

    def __getattr__(self, name: str):  # close, end_session, stats of a GrpcLink
        return getattr(self.inner, name)


def _header(message: bytes) -> tuple[int, int]:
    """(kind, positions carried) from a message's header: protocol.py's layout, no payload decoding."""
    _magic, _version, kind, _codec, _dtype, _hidden, _step, _start, count, _crc = protocol.HEADER.unpack_from(message)
    return kind, count


class ChatTokenizer:
    """Messages to token ids with the tokenizer's chat template, and text back.

    Encodings run one at a time (`encoding`), and never hold back the decoding thread's detokenizing,
    which takes no lock: with one lock for both, a client posting 1 MiB messages (0.5 s each to tokenize, then
    refused as too long) held it nearly all the time, and an admitted stream's tokens came 0.4-1.2 s
    apart instead of 0.05 s. Both may use the one tokenizer at once: a fast tokenizer refuses that
    ("Already borrowed") only beside a call that changes it, and the only such calls, its truncation
    and padding settings, are made by an encoding whose settings differ from the tokenizer's, which
    never happens after the first (made here, before any decoding thread runs). A second tokenizer
    would cost 257 MB for Gemma 3's vocabulary.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.encoding = threading.Lock()  # one encoding at a time: refused requests cost at most one core
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        tokenizer("Hi.")  # settles its truncation and padding (none) before anything decodes

    def encode(self, messages: Sequence[dict]) -> list[int]:
        """Chat template with the generation prompt; without a template, one user message in the Alpaca template."""
        if not self.has_template:
            if len(messages) != 1 or messages[0]["role"] != "user":
                raise TriadicError("this model has no chat template: send exactly one user message")
            with self.encoding:
                return list(self.tokenizer(ALPACA_TEMPLATE.format(instruction=messages[0]["content"]))["input_ids"])
        plain = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages]
        with self.encoding:
            return apply_chat_template(self.tokenizer, plain)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


class Cancelled(Exception):
    """The client went away; nothing is returned."""


class EdgeEngine:
    """One pipeline (split, or the unsplit baseline) behind the server; one request at a time (the caller's lock)."""

    def __init__(self, pipeline: Pipeline, name: str, chat: ChatTokenizer, split: bool = True, reuse_prefix: bool = True) -> None:
        self.pipeline = pipeline
        # Keep the session between requests (prefill only what a request adds); False: every request starts
        # a new one, so that its answer is the same whatever came before, and `cached_tokens` is always 0.
        self.reuse_prefix = reuse_prefix
        self.name = name
        self.chat = chat
        self.split = split
        self.edge = pipeline.edge
        self.schedule = pipeline.schedule
        self.context_length = context_length(pipeline.config)[0]  # fewer than the model's where its RoPE switches (longrope)
        self.link = TracingLink(self.edge.link) if self.edge.link is not None else None
        if self.link is not None:
            self.edge.link = self.link
        self.session = self.edge.session()  # one conversation's caches, kept between requests, on both sides
        self.generation_defaults = model_generation_defaults(pipeline.model_dir)
        self.eos = eos_token_ids(chat.tokenizer, pipeline.config, self.generation_defaults)
        self._check_decoding(int(pipeline.config.vocab_size))

    def _check_decoding(self, vocab_size: int) -> None:
        """The model file's options as a request that leaves them out gets them, run once on a step of zeros at the
        first position. A file on which greedy requests fail too (an eos id its length decay cannot index, a decay
        that overflows at once) stops the server in one line; one on which only sampling fails (a top_p of 0) is
        logged, and each request that samples with it gets the reason (400). Failures deeper into an answer (a mild
        decay overflows after thousands of tokens) end that request in one line, where generate fails too."""
        for options in (Options(1, temperature=0.0), Options(1)):
            try:
                sampling = self.sampling(options)
                sampling.check_vocabulary(vocab_size)
                Sampler(sampling, "cpu", (0,), self.context_length - 1, self.eos).choose(torch.zeros(vocab_size), [0])
            except TriadicError as error:
                if options.temperature == 0:
                    raise
                logger.warning("requests that sample with the model file's options will be refused: %s", error)

    def describe(self) -> dict:
        """The trace fields that do not change from token to token."""
        return {
            "split": self.split, "num_layers": self.schedule.num_layers,
            "first": list(self.schedule.first), "second": list(self.schedule.second),
            "codec": self.edge.codec.name if self.split else "none",
            "resplit_every": self.schedule.resplit_every,
            "prefix_reuse": self.reuse_prefix,
        }

    def prepare(self, messages: Sequence[dict]) -> Prompt:
        """The conversation as token ids (any thread: the tokenizer has its own lock)."""
        ids = self.chat.encode(messages)
        if not ids:
            raise TriadicError("the messages encode to an empty prompt")
        return Prompt(tuple(ids))

    def sampling(self, options: Options) -> SamplingConfig:
        """OpenAI's options as transformers' (temperature 0: greedy; left out: sampling, the model's generation_config).

        A temperature below `MIN_TEMPERATURE` is greedy too, as in vLLM: transformers would divide the
        logits by it into inf, and OpenAI's API accepts any value in [0, 2]. So is a request that leaves the
        temperature out where the model's file says 0."""
        temperature = options.temperature
        if temperature is None:
            temperature = getattr(self.generation_defaults, "temperature", None)
        if isinstance(temperature, (int, float)) and temperature < MIN_TEMPERATURE:
            return SamplingConfig(repetition_penalty=options.repetition_penalty).resolved(self.generation_defaults)
        seed = options.seed if options.seed is not None else secrets.randbits(63)
        config = SamplingConfig(True, options.temperature, options.top_k, options.top_p, options.min_p, options.repetition_penalty,
                                seed % SEED_LIMIT)
        return config.resolved(self.generation_defaults)

    def run(self, prompt: Prompt, options: Options, emit: Callable[[Started | TokenEvent], None], cancelled: Callable[[], bool]) -> Completion:
        """Decode; `emit` sees `Started`, then every token as it comes. Raises Cancelled when `cancelled()` turns true."""
        ids = list(prompt.token_ids)
        sampling = self.sampling(options)
        if not self.reuse_prefix:
            self.session.close()  # a new session on both sides: the schedule's steps start at 0 again
        cached = self.edge.planned_keep(ids)
        decoding = f"sampling (seed {sampling.seed})" if sampling.do_sample else "greedy"
        head = {**self.describe(), "prompt_tokens": len(ids), "cached_tokens": cached, "prefilled": len(ids) - cached, "decoding": decoding}
        emit(Started(head))
        written: list[str] = []
        text = TextStream(self.chat, options.stop, write=written.append)
        events: list[TokenEvent] = []
        deadline = None if options.time_limit is None else time.monotonic() + options.time_limit
        if self.link is not None:
            self.link.take()
        stopped_by = None

        def on_token(token: int) -> bool:
            nonlocal stopped_by
            self._watch_layers(None)  # the prefill is over: from here on the check after each token suffices
            step = self.edge.next_step - 1  # steps count on across a session's requests
            a, b = self.schedule.cuts(step)
            up, down, positions_up, positions_down = self.link.take() if self.link is not None else (0, 0, 0, 0)
            before = len(text.text)
            if text.add(token):
                stopped_by = "stop"
            piece = text.text[before:]
            released = "".join(written)
            written.clear()
            event = TokenEvent(step, token, piece, released, a, b, up, down, positions_up, positions_down)
            events.append(event)
            emit(event)
            if stopped_by is None and cancelled():
                stopped_by = "cancelled"
            elif stopped_by is None and deadline is not None and time.monotonic() > deadline:
                stopped_by = "time_limit"
            return stopped_by is not None

        self._watch_layers(StopSignal(deadline, cancelled).check)  # a long prompt must not outlive its client or time limit
        try:
            result = self.session.generate(ids, options.max_tokens, self.eos, on_token=on_token, sampling=sampling)
        except Stopped as stop:  # mid-prefill: both sides' caches are partial
            self.session.close()  # ends the cloud's session too: a local cloud frees its caches now
            if stop.reason == "cancelled":
                raise Cancelled() from None
            logger.info("time limit reached during the prefill of %d positions; the session starts afresh", len(ids) - cached)
            return Completion("", [], "length", "time_limit", head)
        except TriadicError:
            self.session.close()  # the link or the cloud failed: the next request starts a new session
            raise
        finally:
            self._watch_layers(None)
        if result.cached_positions != cached:
            logger.warning("the session kept %d positions where %d were expected", result.cached_positions, cached)
        if stopped_by == "cancelled":
            raise Cancelled()
        if stopped_by is None or (stopped_by == "time_limit" and events[-1].token_id in self.eos):
            stopped_by = "eos" if events and events[-1].token_id in self.eos else "max_tokens"
        finish = "stop" if stopped_by in ("eos", "stop") else "length"
        final = text.finish()
        return Completion(final, [e.token_id for e in events], finish, stopped_by, head, events, "".join(written))

    def _watch_layers(self, check: Callable[[], None] | None) -> None:
        """Install (or, with None, remove) the check run before every layer on the edge and on a cloud in this
        process (`LocalLink.watch`), and between the messages a remote cloud's link replays to open the session again
        (`GrpcLink.watch`); a remote cloud's own layers are bounded by the link's timeout and its server's limits."""
        self.edge.on_layer = check
        watch = getattr(self.edge.link, "watch", None)
        if watch is not None:
            watch(check)
