"""The OpenAI chat-completions request, checked field by field, and the error shape every refusal uses.

A request that fails a check gets HTTP 400 and `{"error": {"message", "type", "param", "code"}}`, as
OpenAI answers: `param` names the offending field, the message says what is wrong with it. A field
that would change the answer and that this server does not carry out (log probabilities, tools,
structured output, logit bias, presence and frequency penalties, `n` other than 1) is refused by
name rather than ignored: a client asking for JSON or a forced tool call must not get plain text
with a 200. Fields that change nothing here (`user`, `metadata`, `store`, `logprobs` false, a
penalty of 0, `response_format` text, `tool_choice` "none") are accepted. As vLLM's server does, the
request may also carry `top_k`, `min_p` and `repetition_penalty`, transformers' own options.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..sampling import REPETITION_PENALTY_RANGE
from ..utils import TriadicError, check_text

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256  # per stop string: the detokenizer holds back up to this much text


class ApiError(Exception):
    """A refusal with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    """The fields of a chat-completions request that this server acts on."""

    model: str | None  # None: the server's split model
    messages: tuple[dict, ...]  # {"role", "content"} with content as one string
    max_tokens: int | None  # None: up to the end of the context
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage and no choices
    max_tokens_param: str = "max_tokens"  # the field max_tokens came from, for a refusal's `param`
    top_k: int | None = None  # extension (as vLLM's): keep the k most likely tokens; 0 (or -1, vLLM's "off") keeps all
    min_p: float | None = None  # extension: drop tokens below min_p x the top probability
    repetition_penalty: float | None = None  # extension: transformers' (CTRL's) penalty on tokens already in the sequence


def _bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(body: dict, name: str, allowed: Callable[[float], bool], values: str) -> float | None:
    """An optional finite number field, refused by name outside its `values` (as written in the message)."""
    value = body.get(name)
    if value is not None and (not _is_number(value) or not allowed(value)):
        raise _bad(f"'{name}' must be a number in {values}, not {_shown(value)}", name)
    return value


def _shown(value) -> str:
    """A client's value for an error message, cut short: a refusal must not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _content(value, where: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(value, str):
        return _text(value, where, where)
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}[{i}]: only parts of type 'text' with a string 'text' are supported", where)
            texts.append(_text(part["text"], f"{where}[{i}].text", where))
        return "".join(texts)
    raise _bad(f"{where} must be a string or a list of text parts, not {type(value).__name__}", where)


def _text(text: str, what: str, param: str) -> str:
    """Valid Unicode: JSON's escapes can spell a lone surrogate ("\\ud800"), which is no character (`check_text`)."""
    try:
        return check_text(text, what)
    except TriadicError as error:
        raise _bad(str(error), param) from None


# Fields that would change the answer, and what of each this server accepts (the value, in its request, that changes nothing).
_NOT_CARRIED_OUT = {
    "logprobs": ("log probabilities are not returned by this server", lambda v, body: v is None or v is False),
    "top_logprobs": ("log probabilities are not returned by this server", lambda v, body: v is None or v == 0),
    # Tools the model is told not to call ("none") leave a plain answer, which is what was asked for.
    "tools": ("this server does not call tools", lambda v, body: v in (None, []) or body.get("tool_choice") == "none"),
    "functions": ("this server does not call functions", lambda v, body: v in (None, []) or body.get("function_call") == "none"),
    "tool_choice": ("this server does not call tools", lambda v, body: v is None or v == "none"),
    "function_call": ("this server does not call functions", lambda v, body: v is None or v == "none"),
    "response_format": ("this server answers in plain text only", lambda v, body: v is None or v == {"type": "text"}),
    "logit_bias": ("logit bias is not supported", lambda v, body: v is None or v == {}),
    "modalities": ("this server answers in text only", lambda v, body: v is None or v == ["text"]),
    "audio": ("this server answers in text only", lambda v, body: v is None),
    "prediction": ("predicted outputs are not supported", lambda v, body: v is None),
}


def _refuse_what_is_not_carried_out(body: dict) -> None:
    for name, (why, harmless) in _NOT_CARRIED_OUT.items():
        if name in body and not harmless(body[name], body):
            raise _bad(f"'{name}': {why} (got {_shown(body[name])})", name, "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, lambda v: -2 <= v <= 2, "[-2, 2]"):
            raise _bad(f"'{name}' other than 0 is not supported; 'repetition_penalty' (transformers', as in vLLM) "
                       f"penalizes tokens already in the sequence", name, "unsupported_parameter")


def parse_chat_request(body, roles: tuple[str, ...]) -> ChatRequest:
    """Check a decoded JSON body; ApiError(400) names the first field that is wrong."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, not {type(body).__name__}", None)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model")

    if "messages" not in body:
        raise _bad("'messages' is required", "messages")
    raw = body["messages"]
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    messages = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in roles:
            raise _bad(f"{where}.role must be one of {', '.join(roles)}, not {_shown(role)}", f"{where}.role")
        if "content" not in message or message["content"] is None:
            raise _bad(f"{where}.content is required", f"{where}.content")
        messages.append({"role": role, "content": _content(message["content"], f"{where}.content")})

    # OpenAI's API allows null for either; null counts as absent, so max_tokens decides then.
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(param)
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise _bad(f"'{param}' must be an integer >= 1, not {_shown(max_tokens)}", param)

    temperature = _number(body, "temperature", lambda v: 0 <= v <= 2, "[0, 2]")
    top_p = _number(body, "top_p", lambda v: 0 < v <= 1, "(0, 1]")
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**64):  # as --sampling-seed: not reduced mod 2**64
        raise _bad(f"'seed' must be an integer in [0, 2**64), not {_shown(seed)}", "seed")

    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _bad("'stop' must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP:
        raise _bad(f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad(f"each stop string must have 1 to {MAX_STOP_CHARS} characters", "stop")
    for i, text in enumerate(stops):
        _text(text, f"stop[{i}]", "stop")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be a boolean, not {_shown(stream)}", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise _bad("'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
    if options is not None and not stream:
        raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise _bad(f"'n' must be 1: this server returns one choice, not {_shown(n)}", "n")
    _refuse_what_is_not_carried_out(body)

    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1 or top_k >= 1 << 32):
        raise _bad(f"'top_k' must be an integer >= -1 (0 or -1: off), not {_shown(top_k)}", "top_k")
    min_p = _number(body, "min_p", lambda v: 0 <= v <= 1, "[0, 1]")
    low, high = REPETITION_PENALTY_RANGE
    penalty = _number(body, "repetition_penalty", lambda v: low <= v <= high, f"[{low:g}, {high:g}] (1: off)")

    return ChatRequest(
        model=model, messages=tuple(messages), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        seed=seed, stop=stops, stream=stream, include_usage=bool(options and options.get("include_usage")),
        max_tokens_param=param, top_k=None if top_k is None else max(top_k, 0), min_p=min_p, repetition_penalty=penalty,
    )
