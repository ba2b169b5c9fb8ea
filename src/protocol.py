"""The binary message that crosses the link between Edge and Cloud.

Every message is a 24-byte little-endian header followed by a payload:

    offset size field
    0      2    magic  b"TS"
    2      1    version (1)
    3      1    kind: 1 START, 2 HIDDEN, 3 TOKEN
    4      1    codec id (see codec.py): 0 none, 1 fp16, 2 bf16, 3 int8-fixed, 4 bnb8, 5 int8
    5      1    dtype code of the payload: 0 float32, 1 float16, 2 bfloat16
    6      2    hidden size
    8      4    step (0 = prefill)
    12     4    first position carried
    16     4    number of positions carried
    20     4    CRC-32 of the whole message with this field set to zero

    START  payload: seed u64, resplit_every u32, schedule fingerprint u32 (count = 0)
    HIDDEN payload: the codec's encoding of `count` hidden states of size `hidden`
    TOKEN  payload: the greedy token id, u32 (two-part split: the cloud holds the head)

Decoding checks everything a receiver relies on (length, magic, version, kind, codec, dtype, CRC,
hidden size, finiteness) and raises ProtocolError with one line saying what is wrong.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

import torch

from .codec import CODE_DTYPES, CODECS_BY_ID, Codec
from .utils import ProtocolError

MAGIC = b"TS"
VERSION = 1
HEADER = struct.Struct("<2sBBBBHIIII")
HEADER_SIZE = HEADER.size  # 24
START_PAYLOAD = struct.Struct("<QII")
TOKEN_PAYLOAD = struct.Struct("<I")
MAX_POSITIONS = 1 << 20


class Kind(IntEnum):
    START = 1
    HIDDEN = 2
    TOKEN = 3


@dataclass
class Message:
    kind: Kind
    step: int = 0
    start: int = 0
    count: int = 0
    codec_id: int = 0
    hidden: torch.Tensor | None = None  # [count, hidden_size], float
    token: int | None = None
    seed: int = 0
    resplit_every: int = 1
    fingerprint: int = 0


def _pack(kind: Kind, codec_id: int, dtype_code: int, hidden_size: int, step: int, start: int, count: int, payload: bytes) -> bytes:
    header = HEADER.pack(MAGIC, VERSION, kind, codec_id, dtype_code, hidden_size, step, start, count, 0)
    crc = zlib.crc32(payload, zlib.crc32(header))
    return header[:-4] + struct.pack("<I", crc) + payload


def encode_start(seed: int, resplit_every: int, fingerprint: int, hidden_size: int) -> bytes:
    return _pack(Kind.START, 0, 0, hidden_size, 0, 0, 0, START_PAYLOAD.pack(seed, resplit_every, fingerprint))


def encode_hidden(step: int, start: int, hidden: torch.Tensor, codec: Codec) -> bytes:
    """`hidden` is [count, hidden_size]: the states of positions start .. start + count - 1."""
    count, hidden_size = hidden.shape
    payload, dtype_code = codec.encode(hidden)
    return _pack(Kind.HIDDEN, codec.codec_id, dtype_code, hidden_size, step, start, count, payload)


def encode_token(step: int, position: int, token: int, hidden_size: int) -> bytes:
    return _pack(Kind.TOKEN, 0, 0, hidden_size, step, position, 1, TOKEN_PAYLOAD.pack(token))


def decode(buffer: bytes, hidden_size: int) -> Message:
    """Parse and validate one message; raise ProtocolError on anything malformed."""
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
        _expect_length(payload, START_PAYLOAD.size, "START")
        seed, resplit_every, fingerprint = START_PAYLOAD.unpack_from(payload)
        return Message(kind, seed=seed, resplit_every=resplit_every, fingerprint=fingerprint)
    if kind is Kind.TOKEN:
        _expect_length(payload, TOKEN_PAYLOAD.size, "TOKEN")
        return Message(kind, step=step, start=start, count=1, token=TOKEN_PAYLOAD.unpack_from(payload)[0])

    codec = CODECS_BY_ID.get(codec_id)
    if codec is None:
        raise ProtocolError(f"unknown codec id {codec_id}")
    if not 0 < count <= MAX_POSITIONS:
        raise ProtocolError(f"position count {count} out of range (1..{MAX_POSITIONS})")
    hidden = codec.decode(payload, count, hidden_size, dtype_code)
    if not torch.isfinite(hidden).all():
        raise ProtocolError("hidden states contain NaN or Inf")
    return Message(kind, step=step, start=start, count=count, codec_id=codec_id, hidden=hidden)


def _expect_length(payload: memoryview, expected: int, what: str) -> None:
    if len(payload) != expected:
        raise ProtocolError(f"wrong payload length for {what}: {len(payload)} bytes, expected {expected}")
