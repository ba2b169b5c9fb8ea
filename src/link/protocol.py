"""The binary message that crosses the link between Edge and Cloud.

Every message is a 24-byte little-endian header followed by a payload:

    offset size field
    0      2    magic  b"TS"
    2      1    version (1)
    3      1    kind: 1 START, 2 HIDDEN, 3 TOKEN, 4 TURN
    4      1    codec id (see codec.py): 0 none, 1 fp16, 2 bf16, 3 int8-fixed, 4 bnb8, 5 int8
    5      1    dtype code of the payload: 0 float32, 1 float16, 2 bfloat16
    6      2    hidden size
    8      4    step (0 = prefill)
    12     4    first position carried
    16     4    number of positions carried
    20     4    CRC-32 of the whole message with this field set to zero

    START  payload: seed u64, resplit_every u32, schedule fingerprint u32 (count = 0),
           then optionally the SAMPLING block of the session's first request (absent: greedy)
    HIDDEN payload: the codec's encoding of `count` hidden states of size `hidden`
    TOKEN  payload: the chosen token id, u32 (two-part split: the cloud holds the head)
    TURN   a new request in the same session: step = its first step, start = the positions both
           sides keep (fewer than cached: the caches are truncated to them), count = the positions
           its first step appends; payload: the edge's processed length u32 before the turn, then
           the SAMPLING block of this request

    SAMPLING (48 bytes): flags u8 (bit 0: sample), 3 zero bytes, top_k u32, temperature f64,
           top_p f64, min_p f64 (0: off), repetition_penalty f64, sampling seed u64 (all
           resolved: the cloud applies exactly these; it chooses the token in the two-part split)

Decoding checks everything a receiver relies on (length, magic, version, kind, codec, dtype, CRC,
hidden size, finiteness) and raises ProtocolError with one line saying what is wrong.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

import torch

from ..sampling import SamplingConfig
from ..utils import ProtocolError, TriadicError
from .codec import CODE_DTYPES, CODECS_BY_ID, Codec

MAGIC = b"TS"
VERSION = 3  # 2: int8 codecs carry the outliers' shift byte; 3: they rotate by a randomized Walsh-Hadamard transform
HEADER = struct.Struct("<2sBBBBHIIII")
HEADER_SIZE = HEADER.size  # 24
START_PAYLOAD = struct.Struct("<QII")
TOKEN_PAYLOAD = struct.Struct("<I")
SAMPLING_PAYLOAD = struct.Struct("<B3xIddddQ")
TURN_PAYLOAD = struct.Struct("<I")
MAX_POSITIONS = 1 << 20
# How a cloud's refusal of a session past its --session-lifetime begins (gRPC DEADLINE_EXCEEDED): an edge's link then
# opens a new session there and replays this one (GrpcLink), where a hung cloud's DEADLINE_EXCEEDED is not retried.
PAST_LIFETIME = "the session is past its lifetime"


class Kind(IntEnum):
    START = 1
    HIDDEN = 2
    TOKEN = 3
    TURN = 4


@dataclass
class Message:
    kind: Kind
    step: int = 0
    start: int = 0
    count: int = 0
    codec_id: int = 0
    hidden: torch.Tensor | None = None  # [count, hidden_size], float
    peak: float = math.inf  # HIDDEN: a bound on the states' magnitude, known on the host (Codec.decoded)
    token: int | None = None
    seed: int = 0
    resplit_every: int = 1
    fingerprint: int = 0
    sampling: SamplingConfig = SamplingConfig().resolved()  # START and TURN: the request's decoding options
    edge_end: int = 0  # TURN: positions the edge had processed before this request


def _pack(kind: Kind, codec_id: int, dtype_code: int, hidden_size: int, step: int, start: int, count: int, payload: bytes) -> bytes:
    header = HEADER.pack(MAGIC, VERSION, kind, codec_id, dtype_code, hidden_size, step, start, count, 0)
    crc = zlib.crc32(payload, zlib.crc32(header))
    return header[:-4] + struct.pack("<I", crc) + payload


def encode_start(seed: int, resplit_every: int, fingerprint: int, hidden_size: int, sampling: SamplingConfig | None = None) -> bytes:
    """`sampling` (resolved) travels only where given; a START without it means greedy."""
    payload = START_PAYLOAD.pack(seed, resplit_every, fingerprint) + (_pack_sampling(sampling) if sampling is not None else b"")
    return _pack(Kind.START, 0, 0, hidden_size, 0, 0, 0, payload)


def encode_turn(step: int, keep: int, count: int, edge_end: int, sampling: SamplingConfig, hidden_size: int) -> bytes:
    """A new request in the session: keep positions [0, keep), its first step appends `count` positions."""
    return _pack(Kind.TURN, 0, 0, hidden_size, step, keep, count, TURN_PAYLOAD.pack(edge_end) + _pack_sampling(sampling))


def _pack_sampling(config: SamplingConfig) -> bytes:
    return SAMPLING_PAYLOAD.pack(
        int(config.do_sample), config.top_k, config.temperature, config.top_p, config.min_p or 0.0,
        config.repetition_penalty, config.seed,
    )


def _unpack_sampling(payload: memoryview) -> SamplingConfig:
    flags, top_k, temperature, top_p, min_p, penalty, seed = SAMPLING_PAYLOAD.unpack_from(payload)
    if flags > 1:
        raise ProtocolError(f"unknown sampling flags {flags:#x}")
    try:
        config = SamplingConfig(bool(flags), temperature, top_k, top_p, min_p, penalty, seed)
    except TriadicError as error:
        raise ProtocolError(f"bad sampling options: {error}") from None
    return config.resolved()


def encode_hidden(step: int, start: int, hidden: torch.Tensor, codec: Codec, finite: bool = True) -> bytes:
    """`hidden` is [count, hidden_size]: the states of positions start .. start + count - 1.

    NotFinite where they hold Inf or NaN (`finite=False`: tests playing a peer that sends them anyway)."""
    count, hidden_size = hidden.shape
    payload, dtype_code = codec.encode(hidden, finite)
    return _pack(Kind.HIDDEN, codec.codec_id, dtype_code, hidden_size, step, start, count, payload)


def encode_token(step: int, position: int, token: int, hidden_size: int) -> bytes:
    return _pack(Kind.TOKEN, 0, 0, hidden_size, step, position, 1, TOKEN_PAYLOAD.pack(token))


def decode(buffer: bytes, hidden_size: int, device: torch.device | str = "cpu") -> Message:
    """Parse and validate one message; raise ProtocolError on anything malformed. Hidden states land on `device`."""
    if not isinstance(buffer, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"message must be bytes, got {type(buffer).__name__}")
    view = memoryview(buffer)
    if len(view) < HEADER_SIZE:
        raise ProtocolError(f"truncated message: {len(view)} bytes, the header alone is {HEADER_SIZE}")
    magic, version, kind, codec_id, dtype_code, size, step, start, count, crc = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}: not a triadic-split message")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (expected {VERSION})")
    zeroed = bytes(view[: HEADER_SIZE - 4]) + b"\0\0\0\0"
    if zlib.crc32(view[HEADER_SIZE:], zlib.crc32(zeroed)) != crc:
        raise ProtocolError("checksum mismatch: the message was corrupted or truncated")
    if kind not in Kind._value2member_map_:
        raise ProtocolError(f"unknown message kind {kind}")
    if size != hidden_size:
        raise ProtocolError(f"hidden size {size} does not match this model's {hidden_size}")
    if dtype_code not in CODE_DTYPES:
        raise ProtocolError(f"unknown dtype code {dtype_code}")
    payload = view[HEADER_SIZE:]
    kind = Kind(kind)

    if kind is Kind.START:
        if len(payload) != START_PAYLOAD.size + SAMPLING_PAYLOAD.size:  # without the block: a greedy START
            _expect_length(payload, START_PAYLOAD.size, "START")
        seed, resplit_every, fingerprint = START_PAYLOAD.unpack_from(payload)
        message = Message(kind, seed=seed, resplit_every=resplit_every, fingerprint=fingerprint)
        if len(payload) > START_PAYLOAD.size:
            message.sampling = _unpack_sampling(payload[START_PAYLOAD.size :])
        return message
    if kind is Kind.TURN:
        _expect_length(payload, TURN_PAYLOAD.size + SAMPLING_PAYLOAD.size, "TURN")
        if not 0 < count <= MAX_POSITIONS:
            raise ProtocolError(f"TURN appends {count} positions: out of range (1..{MAX_POSITIONS})")
        (edge_end,) = TURN_PAYLOAD.unpack_from(payload)
        sampling = _unpack_sampling(payload[TURN_PAYLOAD.size :])
        return Message(kind, step=step, start=start, count=count, sampling=sampling, edge_end=edge_end)
    if kind is Kind.TOKEN:
        _expect_length(payload, TOKEN_PAYLOAD.size, "TOKEN")
        return Message(kind, step=step, start=start, count=1, token=TOKEN_PAYLOAD.unpack_from(payload)[0])

    codec = CODECS_BY_ID.get(codec_id)
    if codec is None:
        raise ProtocolError(f"unknown codec id {codec_id}")
    if not 0 < count <= MAX_POSITIONS:
        raise ProtocolError(f"position count {count} out of range (1..{MAX_POSITIONS})")
    hidden, peak = codec.decoded(payload, count, hidden_size, dtype_code, device)  # finite, or ProtocolError
    return Message(kind, step=step, start=start, count=count, codec_id=codec_id, hidden=hidden, peak=peak)


def _expect_length(payload: memoryview, expected: int, what: str) -> None:
    if len(payload) != expected:
        raise ProtocolError(f"wrong payload length for {what}: {len(payload)} bytes, expected {expected}")
