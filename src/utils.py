"""Small shared helpers: the user-facing error type, set parsing, prompt templates, logging, the stop check between layers."""
from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import NoReturn


class TriadicError(Exception):
    """An error caused by the user's input or by a peer's message.

    Entry scripts print it as one line and exit with code 2; nothing else is caught that way,
    so a real bug still shows its traceback.
    """


def first_line(error: BaseException) -> str:
    """An exception's message as one line (its name where it has none), for a TriadicError that wraps it."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]


class ProtocolError(TriadicError):
    """A message that cannot be decoded or does not fit the receiver's state."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit code 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def read_file(path: str, what: str) -> bytes:
    """A file named on the command line (`what` is the flag), or a one-line TriadicError."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise TriadicError(f"{what} {path}: cannot read ({error.strerror or type(error).__name__})") from None


def read_token(path: str, what: str = "--token-file") -> str:
    """A bearer token file: one token, no spaces."""
    token = read_file(path, what).decode("utf-8", "replace").strip()
    if not token or any(c.isspace() for c in token):
        raise TriadicError(f"{what} {path}: expected one token without spaces")
    return token


# Seconds flags (timeouts, lifetimes) end up as gRPC's int32 milliseconds or a time_t deadline: at most ~24.8 days.
MAX_SECONDS = (2**31 - 1) // 1000


def check_seconds(value: float, flag: str) -> float:
    """A duration flag: > 0, finite, and small enough for the clocks it reaches (`MAX_SECONDS`)."""
    if not 0 < value <= MAX_SECONDS:  # also refuses NaN and inf
        raise TriadicError(f"{flag} {value:g}: must be > 0 and at most {MAX_SECONDS} seconds")
    return value


def is_unsigned(value: object, bits: int) -> bool:
    """Whether `value` is an integer (not a bool) that fits an unsigned field of `bits` bits in a message."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << bits


def check_text(text: str, what: str) -> str:
    """Text as the tokenizer needs it: valid Unicode (undecodable bytes in argv or stdin arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise TriadicError(f"{what} is not valid UTF-8 text (at character {error.start})") from None
    return text


def log(*parts: object) -> None:
    """Progress and streamed text go to stderr so that `--json` leaves stdout to one JSON line."""
    print(*parts, file=sys.stderr, flush=True)


def adopt_torch_threads() -> None:
    """Give the calling thread the process's torch thread count (what `torch.set_num_threads` set in the main thread).

    torch applies that count to OpenMP and MKL per thread, and to a new thread only at the thread's first
    parallel loop. An MKL product before that (a codec's rotation, a linear layer) runs on every core and
    leaves an OpenMP worker spinning after it: measured, a thread's 512 x 512 products at 2x the CPU of
    its wall time on 2 cores with `--threads 1`, and 10 ms per token more in a cloud session thread that
    began with a rotation. Every thread a server starts to compute in calls this first.
    """
    import torch

    torch.set_num_threads(torch.get_num_threads())  # the getter returns the process's count, whichever thread asks


def parse_layer_set(text: str, name: str) -> set[int]:
    """Parse '1,2,3' into {1, 2, 3}; an empty list, an empty item ('1,,2') or a non-integer is a user error.

    Items are ASCII digits with an optional sign: `int` alone also reads '1_0' as 10 and '٣' as 3."""
    items = [item.strip() for item in text.split(",")]
    if items == [""]:
        raise TriadicError(f"{name}: empty set of split layers")
    values = set()
    for item in items:
        if not item:
            raise TriadicError(f"{name}: {text!r} has an empty item")
        if not re.fullmatch(r"[+-]?[0-9]+", item):
            raise TriadicError(f"{name}: {item!r} is not an integer layer index")
        values.add(int(item))
    return values


def validate_split_sets(first: Iterable[int], second: Iterable[int], num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check both sets against the model and return them sorted.

    Every pair drawn from the sets must satisfy 0 <= a <= b <= L, so max(first) <= min(second).
    """
    checked = []
    for name, values in (("first", first), ("second", second)):
        if isinstance(values, (str, bytes)):
            raise TriadicError(f"{name}: expected a set of integers, got {values!r}")
        values = list(values)
        if not values:
            raise TriadicError(f"{name}: empty set of split layers")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TriadicError(f"{name}: {v!r} is not an integer layer index")
            if not 0 <= v <= num_layers:
                raise TriadicError(f"{name}: split index {v} is outside [0, {num_layers}] for this {num_layers}-layer model")
        checked.append(tuple(sorted(set(values))))
    first_sorted, second_sorted = checked
    if first_sorted[-1] > second_sorted[0]:
        raise TriadicError(
            f"max(first) = {first_sorted[-1]} > min(second) = {second_sorted[0]}: "
            f"the pair ({first_sorted[-1]}, {second_sorted[0]}) would put the second cut before the first"
        )
    return first_sorted, second_sorted


ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(tokenizer, prompt: str, prompt_format: str) -> list[int]:
    """Token ids of the prompt: chat template, Alpaca template (as Alpaca-LoRA), or raw text."""
    if prompt_format == "auto":
        prompt_format = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    check_text(prompt, "the prompt")
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise TriadicError("--prompt-format chat: this tokenizer has no chat template")
        return apply_chat_template(tokenizer, [{"role": "user", "content": prompt}])
    if prompt_format == "alpaca":
        return list(tokenizer(ALPACA_TEMPLATE.format(instruction=prompt))["input_ids"])
    if prompt_format == "raw":
        return list(tokenizer(prompt)["input_ids"])
    raise TriadicError(f"unknown prompt format {prompt_format!r}")


def conversation_ids(tokenizer, messages: list[dict[str, str]], prompt_format: str) -> list[int]:
    """Token ids of a whole conversation (user and assistant turns, ending with a user turn), ready for the answer.

    One message is `format_prompt`'s prompt. Longer conversations use the chat template, or repeat the
    Alpaca template per exchange (each response followed by a blank line), or join raw texts by newlines.
    """
    for message in messages:
        check_text(message["content"], f"a {message['role']} message")
    if len(messages) == 1:
        return format_prompt(tokenizer, messages[0]["content"], prompt_format)
    if prompt_format == "auto":
        prompt_format = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if prompt_format == "chat":
        format_prompt(tokenizer, "", "chat")  # the same refusal when there is no template
        return apply_chat_template(tokenizer, messages)
    if prompt_format == "alpaca":
        text = "".join(
            ALPACA_TEMPLATE.format(instruction=m["content"]) if m["role"] == "user" else m["content"] + "\n\n" for m in messages
        )
        return list(tokenizer(text)["input_ids"])
    if prompt_format == "raw":
        return list(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])
    raise TriadicError(f"unknown prompt format {prompt_format!r}")


def apply_chat_template(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The tokenizer's chat template over `messages`, ready for the answer; a template that fails is one line.

    Templates fail on their own syntax (a broken `chat_template.jinja`), on purpose through
    `raise_exception` (e.g. roles that do not alternate), or on content they do not expect: the
    template is the model's code, run on the user's messages, so any failure there is one line.
    """
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as error:  # noqa: BLE001 (jinja2's TemplateError and whatever the template's own code raises)
        raise TriadicError(f"the tokenizer's chat template fails: {error}") from None
    return list(encoded["input_ids"])


class Stopped(Exception):
    """Raised between layers (`Party.on_layer`): `reason` is "cancelled" (the client went away) or "deadline"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StopSignal:
    """The check a computation runs before each layer (`Party.on_layer = signal.check`): the cloud server's
    per-message deadline and cancellation, the edge server's time limit and departed client."""

    def __init__(self, deadline: float | None, client_left: Callable[[], bool] | None = None) -> None:
        self.deadline = deadline  # time.monotonic() by which the computation must have ended; None: no limit
        self.cancelled = threading.Event()  # set from another thread (the serving loop) when the request is cancelled
        self.client_left = client_left  # asked at each check, where the caller polls its client rather than being told

    def check(self) -> None:
        if self.cancelled.is_set() or (self.client_left is not None and self.client_left()):
            raise Stopped("cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Stopped("deadline")
