"""The Rice code of the int8 codec (`RiceCodec`): its definition in numpy, and the same in C where it builds.

A message's integers are coded in two runs: the k low bits of every zigzagged value, then the rest of
each in unary. numpy codes them in whole-array operations (`rice_encode`, `rice_decode`: the definition,
and the path wherever no C compiler is). src/link/rice.c does the same in one pass each way, with the
rounding before the code and the scaling after it. On one core of the 2-core EPYC, over 64 different
messages in turn (so that no branch predictor learns one): at hidden 4096 and one position, rounding
and coding 48 -> 20 us and decoding and scaling 50 -> 19 us; a whole int8 message 204 -> 154 us to
encode and 202 -> 136 us to decode; at hidden 576, 147 -> 124 and 174 -> 126 us. Both paths give the
same bytes and the same floats (`_check` before first use, and the tests).
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np

from .. import native
from ..utils import ProtocolError

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rice.c")
FLAGS = ("-O2", "-ffp-contract=off", "-shared", "-fPIC")  # portable code, no fused multiply-adds: numpy's bits

_BIT_OFFSETS = {k: np.arange(8, dtype=np.uint64) * np.uint64(k) for k in range(9)}  # of 8 k-bit values in a word


def _pack_low_bits(z: np.ndarray, k: int) -> np.ndarray:
    """The k low bits of every value, end to end in little-endian bit order, zero-padded to a byte.

    Eight values fill exactly k bytes, so each group of eight is ORed into one little-endian 64-bit
    word whose first k bytes are that group's bytes of the stream: a few whole-array operations,
    where unpacking every bit into its own byte costs k bytes per value in between.
    """
    n, groups = len(z), -(-len(z) // 8)
    padded: np.ndarray = np.zeros(groups * 8, np.uint64)
    padded[:n] = z & ((1 << k) - 1)
    words = np.bitwise_or.reduce(padded.reshape(groups, 8) << _BIT_OFFSETS[k], axis=1).astype("<u8")
    return words.view(np.uint8).reshape(groups, 8)[:, :k].reshape(-1)[: (n * k + 7) // 8]


def _unpack_low_bits(raw: np.ndarray, n: int, k: int) -> np.ndarray:
    """`_pack_low_bits` undone: the values of the stream's whole groups of eight (the padding's read as values past n)."""
    groups = -(-n // 8)
    stream: np.ndarray = np.zeros(groups * k, np.uint8)
    stream[: len(raw)] = raw
    words: np.ndarray = np.zeros((groups, 8), np.uint8)
    words[:, :k] = stream.reshape(groups, k)
    return ((words.view("<u8") >> _BIT_OFFSETS[k]) & np.uint64((1 << k) - 1)).reshape(-1).astype(np.int64)


def rice_encode(q: np.ndarray, k: int) -> bytes:
    """Signed integers (in any dtype that holds them exactly) as a Rice code with k <= 8 low bits, in two runs so
    that both sides stay vectorized.

    Zigzag first (z = 2q for q >= 0, -2q - 1 below), then the k low bits of every value (little-endian
    bit order, zero-padded to a byte), then z >> k of every value in unary: that many ones and a zero
    (zero-padded to a byte).
    """
    q = q.astype(np.int64, copy=False).reshape(-1)
    z = (q << 1) ^ (q >> 63)  # zigzag
    low = _pack_low_bits(z, k).tobytes() if k else b""
    ends = np.cumsum((z >> k) + 1)  # one past each value's terminating zero
    unary: np.ndarray = np.ones(int(ends[-1]) if len(ends) else 0, dtype=np.uint8)
    unary[ends - 1] = 0
    return low + np.packbits(unary, bitorder="little").tobytes()


def rice_decode(buffer: memoryview, n: int, k: int, codec: str) -> np.ndarray:
    """The n integers of `rice_encode`; ProtocolError unless the buffer holds exactly them."""
    if n == 0:
        if len(buffer):
            raise ProtocolError(f"codec {codec}: {len(buffer)} bytes after the last value")
        return np.zeros(0, np.int64)
    low_size = (n * k + 7) // 8
    if len(buffer) < low_size + (n + 7) // 8:
        raise ProtocolError(f"codec {codec}: truncated payload, {len(buffer)} bytes for {n} values")
    low = _unpack_low_bits(np.frombuffer(buffer, np.uint8, low_size), n, k) if k else np.zeros(n, np.int64)
    if low[n:].any():
        raise ProtocolError(f"codec {codec}: non-zero padding after the low bits")
    unary = np.unpackbits(np.frombuffer(buffer, np.uint8, offset=low_size), bitorder="little")
    ends = np.flatnonzero(unary == 0)[:n]
    if len(ends) < n:
        raise ProtocolError(f"codec {codec}: truncated payload, {len(ends)} of {n} values")
    used = (int(ends[-1]) + 8) // 8
    if len(unary) // 8 != used or unary[ends[-1] + 1 :].any():
        raise ProtocolError(f"codec {codec}: {len(unary) // 8 - used} bytes after the last value")
    z = (np.diff(ends, prepend=-1) - 1) << k | low[:n]
    return (z >> 1) ^ -(z & 1)


def library() -> ctypes.CDLL | None:
    """rice.c's library, built on first use; None where it cannot be (the reason is logged once, numpy serves)."""
    return _kernel.get()


def _prepare(lib: ctypes.CDLL) -> None:
    """Declare the library's two functions and check them against numpy (`_check`)."""
    pointer, long = ctypes.c_void_p, ctypes.c_long
    lib.rice_round_encode.argtypes = [pointer, long, long, pointer, ctypes.c_int, pointer, long]
    lib.rice_round_encode.restype = long
    lib.rice_decode_scale.argtypes = [pointer, long, long, long, ctypes.c_int, pointer, pointer]
    lib.rice_decode_scale.restype = ctypes.c_int
    _check(lib)


def _check(lib: ctypes.CDLL) -> None:
    """The bytes and floats of numpy's definition, before any message uses the library (a miscompiled one is refused):
    every k, ties, zeros, a value of many unary bytes, integers past 2**22, and a damaged code refused."""
    generator = np.random.default_rng(0)
    rotated = (generator.standard_normal((3, 37)) * 40).astype(np.float32)
    rotated[0, :4] = [0.5, 1.5, -2.5, 0.0]  # ties round to even
    rotated[1, 5] = 3000.0  # many ones in unary
    step = np.array([[1.0], [0.75], [2.0]], np.float32)
    large = np.array([[4194305.0, -5000001.0, 8388607.0, 4194304.75, 8388608.0]], np.float32)  # from 2**22, where floats
    cases = [(rotated, step, k) for k in range(9)] + [(large, np.ones((1, 1), np.float32), 8)]  # are 0.5 apart, to 2**23
    for rotated, step, k in cases:
        expected = rice_encode(np.rint(rotated / step), k)
        got = _encoded(lib, rotated, step, k, len(expected) + 8)
        if got != expected:
            raise RuntimeError(f"its code with k={k} differs from numpy's")
        count, hidden = rotated.shape
        decoded = _decoded(lib, memoryview(expected), count, hidden, k, step)
        reference = rice_decode(memoryview(expected), rotated.size, k, "check").astype(np.float32).reshape(count, hidden) * step
        if decoded is None or not np.array_equal(decoded, reference):
            raise RuntimeError(f"its decoding with k={k} differs from numpy's")
        if _decoded(lib, memoryview(expected + b"\0"), count, hidden, k, step) is not None:
            raise RuntimeError("it accepts a code with a byte after its last value")


def _encoded(lib: ctypes.CDLL, rotated: np.ndarray, step: np.ndarray, k: int, capacity: int) -> bytes | None:
    """The C code of float32 C-ordered `rotated` on `step`, or None where numpy's path must decide."""
    count, hidden = rotated.shape
    if step.shape != (count, 1):  # the C code reads one step per row, as many as there are rows
        raise ValueError(f"steps of shape {step.shape} for {count} rows")
    out = np.empty(capacity, np.uint8)
    size = lib.rice_round_encode(rotated.ctypes.data, count, hidden, step.ctypes.data, k, out.ctypes.data, capacity)
    return out[:size].tobytes() if size >= 0 else None


def _decoded(lib: ctypes.CDLL, buffer: memoryview, count: int, hidden: int, k: int, step: np.ndarray) -> np.ndarray | None:
    """The C decoding of `buffer`, times the steps, or None where it is not exactly a code (numpy then says why)."""
    if step.shape != (count, 1):
        raise ValueError(f"steps of shape {step.shape} for {count} rows")
    out = np.empty((count, hidden), np.float32)
    address = np.frombuffer(buffer, np.uint8).ctypes.data if len(buffer) else 0
    return out if lib.rice_decode_scale(address, len(buffer), count, hidden, k, step.ctypes.data, out.ctypes.data) == 0 else None


def round_encode(rotated: np.ndarray, step: np.ndarray, k: int) -> bytes:
    """rice_encode(np.rint(rotated / step), k) for float32 [count, hidden] values on float32 [count, 1] steps."""
    lib = library()
    rotated, step = np.ascontiguousarray(rotated, np.float32), np.ascontiguousarray(step, np.float32)
    if lib is not None:
        # Room for every value's low bits and 9 unary bits on average (a Gaussian message on the codec's step uses
        # about 2.5). A message past that (no encoder of this codec's makes one) is numpy's.
        code = _encoded(lib, rotated, step, k, (rotated.size * k + 7) // 8 + rotated.size * 9 // 8 + 8)
        if code is not None:
            return code
    return rice_encode(np.rint(rotated / step), k)


def decode_scale(buffer: memoryview, count: int, hidden: int, k: int, step: np.ndarray, codec: str) -> np.ndarray:
    """The float32 [count, hidden] values of `round_encode`'s code times their rows' steps; ProtocolError unless
    the buffer holds exactly the code of count * hidden values."""
    lib = library()
    step = np.ascontiguousarray(step, np.float32)
    decoded = _decoded(lib, buffer, count, hidden, k, step) if lib is not None else None
    if decoded is not None:
        return decoded
    # No library, or a code the library refused: the definition decodes it or says what is wrong.
    return rice_decode(buffer, count * hidden, k, codec).astype(np.float32).reshape(count, hidden) * step


_kernel = native.OptionalLibrary(SOURCE, FLAGS, _prepare, "C Rice code", "numpy codes the int8 messages", logger)
