"""What an observer of the link records and reads: the raw messages of a session, decoded into
per-layer exposures, and the split schedule that the START message gives away."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from src.link import protocol
from src.link.codec import get_codec
from src.link.protocol import Kind
from src.schedule import SplitSchedule


class UplinkCaptured(Exception):
    """Raised by a RecordingLink told to stop once the first HIDDEN request has been recorded."""


class RecordingLink:
    """A link that records every request (edge->cloud) and reply (cloud->edge) as raw bytes.

    `send` is the receiving side (normally `cloud.handle`). With `stop_at_uplink` the session stops
    (UplinkCaptured) right after the first HIDDEN request: the edge has sent its message, the cloud
    never computes, which is all an uplink-only measurement needs.
    """

    def __init__(self, send: Callable[[bytes], bytes], hidden_size: int, stop_at_uplink: bool = False):
        self.send, self.hidden_size, self.stop_at_uplink = send, hidden_size, stop_at_uplink
        self.requests: list[bytes] = []
        self.replies: list[bytes] = []

    def request(self, data: bytes) -> bytes:
        data = bytes(data)
        self.requests.append(data)
        if self.stop_at_uplink and protocol.decode(data, self.hidden_size).kind is Kind.HIDDEN:
            raise UplinkCaptured
        reply = bytes(self.send(data))
        self.replies.append(reply)
        return reply


@dataclass
class Recording:
    requests: list[bytes]
    replies: list[bytes]
    generation: object | None  # src.edge.Generation, None when stopped at the uplink


def record(
    pipeline, prompt_ids: Sequence[int], max_new_tokens: int, forced_tokens: Sequence[int] | None = None,
    stop_at_uplink: bool = False,
) -> Recording:
    """Run one session through the pipeline with a recording link in place of the edge's link."""
    hidden = pipeline.config.hidden_size
    link = RecordingLink(pipeline.cloud.handle, hidden, stop_at_uplink)
    original = pipeline.edge.link
    pipeline.edge.link = link
    generation = None
    try:
        generation = pipeline.edge.generate(
            list(prompt_ids), max_new_tokens, forced_tokens=list(forced_tokens) if forced_tokens is not None else None
        )
    except UplinkCaptured:
        pass
    finally:
        pipeline.edge.link = original
    return Recording(link.requests, link.replies, generation)


def hidden_messages(raws: Iterable[bytes], hidden_size: int) -> list[protocol.Message]:
    """The HIDDEN messages among raw recorded bytes (START and TOKEN messages are skipped)."""
    messages = [protocol.decode(raw, hidden_size) for raw in raws]
    return [m for m in messages if m.kind is Kind.HIDDEN]


def transcode(raw: bytes, codec_name: str, hidden_size: int) -> bytes:
    """The bytes the sender would have produced with another codec for the same states.

    Exact for messages whose states do not depend on the codec (every edge->cloud message of a fixed
    split: the edge computes layers 0..a-1 from the embeddings alone); tests/test_privacy.py checks
    it against a real int8 pipeline.
    """
    message = protocol.decode(raw, hidden_size)
    return protocol.encode_hidden(message.step, message.start, message.hidden, get_codec(codec_name))


@dataclass
class Exposure:
    """One message: the states of positions start .. start + count - 1 at one cut layer."""

    step: int
    layer: int
    start: int
    states: torch.Tensor

    @property
    def positions(self) -> range:
        return range(self.start, self.start + len(self.states))


def exposures(messages: Iterable[protocol.Message], layer_of_step: Callable[[int], int]) -> list[Exposure]:
    return [Exposure(m.step, layer_of_step(m.step), m.start, m.hidden.float()) for m in messages]


def schedule_from_start(raw: bytes, hidden_size: int, num_layers: int) -> SplitSchedule | None:
    """What an eavesdropper learns from the START message: the seed is in clear, and the split sets
    follow from the fingerprint by trying every pair of contiguous ranges (about 40,000 at L = 30)."""
    message = protocol.decode(raw, hidden_size)
    if message.kind is not Kind.START:
        raise ValueError("not a START message")
    sets = _sets_from_fingerprint(message.fingerprint, num_layers)
    return None if sets is None else SplitSchedule(sets[0], sets[1], num_layers, message.seed, message.resplit_every)


@functools.lru_cache(maxsize=16)
def _sets_from_fingerprint(fingerprint: int, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    L = num_layers
    for lo1 in range(L + 1):
        for hi1 in range(lo1, L + 1):
            for lo2 in range(hi1, L + 1):
                for hi2 in range(lo2, L + 1):
                    sets = tuple(range(lo1, hi1 + 1)), tuple(range(lo2, hi2 + 1))
                    if SplitSchedule(sets[0], sets[1], L).fingerprint() == fingerprint:
                        return sets
    return None


def lowest_exposure(found: Sequence[Exposure], length: int, layer_of: Callable[[Exposure], int] | None = None,
                    first_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the state from the message with the lowest (identified) layer, or the first message.

    Returns (layer per position, -1 where never seen; states [length, hidden]).
    """
    layer_of = layer_of or (lambda e: e.layer)
    hidden = found[0].states.shape[1]
    layers = torch.full((length,), -1, dtype=torch.long)
    states = torch.zeros(length, hidden)
    for exposure in found:
        layer = layer_of(exposure)
        for i, position in enumerate(exposure.positions):
            if position >= length:
                continue
            if layers[position] < 0 or (not first_only and layer < layers[position]):
                layers[position] = layer
                states[position] = exposure.states[i]
    return layers, states
