"""How a block of hidden states [count, hidden] becomes bytes and back.

Each codec has a one-byte id carried in the message header. Decoding validates the payload (its
length, scales, indices, padding) and returns finite float values, with a bound on their magnitude
known on the host (`Codec.decoded`). Encoding refuses states that are not finite (`NotFinite`), seen
on the host copy it makes anyway. Both keep the sides' range checks off the device: on a GPU, a check
there is a wait for the GPU in every step.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Callable

import numpy as np
import torch

from ..utils import ProtocolError, TriadicError
from . import rice, rotation

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def tensor_bytes(x: torch.Tensor) -> bytes:
    return x.contiguous().view(torch.uint8).numpy().tobytes()


def bytes_tensor(payload: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(shape)


class NotFinite(TriadicError):
    """The states to encode hold Inf or NaN: nothing a receiver could use."""


def finite_on_host(codec: str, *arrays: np.ndarray) -> None:
    """NotFinite unless every value is finite (host arrays: no wait on a device)."""
    if not all(np.isfinite(a).all() for a in arrays):
        raise NotFinite(f"codec {codec}: the states to send hold Inf or NaN")


class Codec:
    name: str
    codec_id: int
    # Quantizes on one grid for all channels: the sides weigh the channels first where the family says so
    # (Party.weigh). Lossless and plain casts keep every channel's own precision and are never weighed.
    channel_weighted = False
    # Whether decoding gives back the sender's values bit for bit (`none`): then a side computing in
    # bf16/fp16 catches lagging layers up step by step, to stay bit-identical to HF (Party.catch_up_by_step).
    lossless = False

    def prepare(self) -> None:
        """Build what coding needs before the first message (at start-up, not inside a request)."""

    def encode(self, x: torch.Tensor, finite: bool = True) -> tuple[bytes, int]:
        """Payload bytes and the dtype code for the header; NotFinite where `finite` and x holds Inf or NaN.

        (`finite=False` only for tests that play a peer sending what a receiver must refuse.)"""
        raise NotImplementedError

    def decode(self, payload: memoryview, count: int, hidden: int, dtype_code: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[count, hidden] finite float values on `device`; ProtocolError if the payload is malformed.

        Validation runs on the host, before anything reaches `device` (no wait on a GPU); the arithmetic
        over all values (the inverse rotation) runs on `device`, where the receiver computes."""
        return self.decoded(payload, count, hidden, dtype_code, device)[0]

    def decoded(self, payload: memoryview, count: int, hidden: int, dtype_code: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
        """`decode`'s states and `peak`, a bound on their magnitude known on the host: what lets a receiver
        check them against its dtype's range (`Party.received`) without reading them back from a GPU."""
        raise NotImplementedError


def expect_length(payload: memoryview, expected: int, codec: str, count: int) -> None:
    if len(payload) != expected:
        raise ProtocolError(f"wrong payload length for {codec} with {count} positions: {len(payload)} bytes, expected {expected}")


class RawCodec(Codec):
    """Lossless in the sender's compute dtype (`none`), or a plain cast (`fp16`, `bf16`)."""

    def __init__(self, name: str, codec_id: int, dtype: torch.dtype | None):
        self.name, self.codec_id, self.dtype = name, codec_id, dtype
        self.lossless = dtype is None

    def encode(self, x: torch.Tensor, finite: bool = True) -> tuple[bytes, int]:
        x = x.detach().to("cpu")
        peak = float(x.abs().max()) if x.numel() else 0.0  # NaN where one is: one pass for both checks
        if finite and not math.isfinite(peak):
            raise NotFinite(f"codec {self.name}: the states to send hold Inf or NaN")
        if self.dtype is not None:
            if finite and peak > torch.finfo(self.dtype).max:  # the cast would send Inf
                wider = "bf16 or int8" if self.dtype == torch.float16 else "none"
                raise TriadicError(f"codec {self.name}: a hidden state exceeds the {self.name} range; use {wider}")
            x = x.to(self.dtype)
        return tensor_bytes(x), DTYPE_CODES[x.dtype]

    def payload_size(self, count: int, hidden: int, dtype_code: int) -> int:
        dtype = CODE_DTYPES[dtype_code]
        if self.dtype is not None and dtype != self.dtype:
            raise ProtocolError(f"codec {self.name}: dtype code {dtype_code} does not match the codec")
        return count * hidden * dtype.itemsize

    def decoded(self, payload: memoryview, count: int, hidden: int, dtype_code: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
        expect_length(payload, self.payload_size(count, hidden, dtype_code), self.name, count)
        states = bytes_tensor(payload, CODE_DTYPES[dtype_code], (count, hidden))
        peak = float(states.abs().max()) if states.numel() else 0.0  # NaN where one is
        if not math.isfinite(peak):
            raise ProtocolError("hidden states contain NaN or Inf")
        return states.to(device), peak


FP16_MAX = torch.finfo(torch.float16).max
MAX_OUTLIER_SHIFT = 60  # outliers up to 65504 * 2**60: beyond any float32 activation a model should have


def rotated_with_outliers(x: torch.Tensor, k: int, codec: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k largest-magnitude channels of each position, and the rest (those zeroed) rotated: as host arrays.

    Returns (indices int64, values float32, rotated float32), all [count, ...]. The selection and the
    rotation (`rotation.outliers_and_rest`) run where `x` lives and the results reach the host in one
    copy: on a GPU, one graph replay (`replayed`) and the encoding's only wait; on the host, one call of
    src/link/rotate.c. What follows (the outliers' range, the step, the rounding) is per-value work that
    numpy does on the host in less time than launches would take.
    """
    count, hidden = x.shape
    if hidden < k:
        raise TriadicError(f"codec {codec}: {hidden} channels, fewer than its {k} outliers; use --codec none")
    if x.device.type == "cpu":
        return rotation.host_outliers_and_rest(x, k)
    joined = replayed(functools.partial(_joined_outliers_and_rest, k=k), x, x.device, count, ("encode", k)).cpu().numpy()
    return parted(joined, count, k, hidden)


def _joined_outliers_and_rest(x: torch.Tensor, k: int) -> torch.Tensor:
    """`rotation.outliers_and_rest` as the bytes of one tensor, the int64 indices first (so every part starts aligned)."""
    return torch.cat([t.reshape(-1).view(torch.uint8) for t in rotation.outliers_and_rest(x, k)])


def parted(joined: np.ndarray, count: int, k: int, hidden: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_joined_outliers_and_rest`'s bytes, on the host, as (indices int64, values float32, rotated float32)."""
    cut = (8 * count * k, 12 * count * k)
    return (joined[: cut[0]].view(np.int64).reshape(count, k), joined[cut[0] : cut[1]].view(np.float32).reshape(count, k),
            joined[cut[1] :].view(np.float32).reshape(count, hidden))


GRAPHED_POSITIONS = 8  # a message of up to this many positions runs its GPU work as one CUDA graph replay


class _ThreadGraphs(threading.local):
    """This thread's captured graphs. A graph's input and output buffers are reused by every replay,
    so two threads must never replay one at once: each thread captures its own. A graph carries nothing
    from one message to the next, so the two sides of one thread (`LocalLink`) may both replay it."""

    def __init__(self) -> None:
        self.by_key: dict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]] = {}


_graphs = _ThreadGraphs()


def replayed(work: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device | str, positions: int,
             key: tuple, fresh: bool = False) -> torch.Tensor:
    """work(x) on `device`; on a GPU, for up to GRAPHED_POSITIONS positions, as one replay of a CUDA graph.

    Why: at batch 1 the host is the bottleneck, and a message's device work is some ten small kernels,
    each bound by its launch (10 to 30 us of host time on an H100's host). Measured there at hidden
    4096: an encoding's device part and copy 435 us eager, 84 us replayed; a decoding's 253 and 41 us.
    The graph is captured on first use for x's shape and dtype and `key`, in this thread: `key` must
    name `work` and every constant it holds (two works over inputs of one shape must not share a
    graph). `x` may be on the host: the copy into the graph's input is then the upload. The result is
    the graph's own output buffer, which the next replay in this thread overwrites: read it at once,
    or ask for a `fresh` copy. Elsewhere (the CPU, a prefill's long message): plain `work(x.to(device))`.
    """
    device = torch.device(device)
    if device.type != "cuda" or not 0 < positions <= GRAPHED_POSITIONS:
        return work(x.to(device))
    with torch.inference_mode():  # the graph's buffers are inference tensors: copy into them in that mode only
        full_key = (key, device, x.dtype, tuple(x.shape))
        entry = _graphs.by_key.get(full_key)
        if entry is None:
            entry = _graphs.by_key[full_key] = _capture(work, x.to(device))
        static_in, graph, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone() if fresh else static_out


_capture_lock = threading.Lock()  # CUDA graphs' own rule: one capture at a time in a process


def _capture(work: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]:
    """A CUDA graph of work(static_in), after two eager runs (cuBLAS chooses its kernels there).

    On a stream of its own (torch's default capture stream is one for the whole process), one
    capture at a time, and `thread_local`: the other side may be launching its own work meanwhile."""
    with _capture_lock:
        static_in = example.clone()
        side = torch.cuda.Stream(example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                work(static_in)
        torch.cuda.current_stream(example.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            static_out = work(static_in)
        return static_in, graph, static_out


def outliers_fp16(values: np.ndarray, codec: str) -> tuple[int, np.ndarray]:
    """The outliers as fp16 values / 2**shift, and the shift.

    The shift is the message's smallest power of two that brings its largest outlier into fp16's
    range: 0 where it fits already (SmolLM2's reach about 25,000), 1 for Gemma 3's residual stream
    (about 100,000). fp16 keeps its 11 bits of precision either way.
    """
    peak = float(np.abs(values).max()) if values.size else 0.0
    shift = math.ceil(math.log2(peak / FP16_MAX)) if FP16_MAX < peak < math.inf else 0
    if shift > MAX_OUTLIER_SHIFT or not math.isfinite(peak):
        raise TriadicError(f"codec {codec}: an outlier of {peak:.3g} is beyond the codec's range; use --codec none")
    if shift:
        values = values / np.float32(2.0**shift)
    return shift, values.astype(np.float16)


def read_shift(payload: memoryview, codec: str) -> int:
    """The outlier shift in the first payload byte of the outlier-aware codecs."""
    if len(payload) < 1:
        raise ProtocolError(f"codec {codec}: empty payload")
    if payload[0] > MAX_OUTLIER_SHIFT:
        raise ProtocolError(f"codec {codec}: outlier shift {payload[0]} beyond {MAX_OUTLIER_SHIFT}")
    return payload[0]


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest, ties to even, as torch does), as their uint16 bits."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def read_parts(payload: memoryview, parts: list[tuple[type, tuple[int, ...]]]) -> tuple[list[np.ndarray], int]:
    """Fixed-size arrays laid end to end at the start of a payload (read in place), and the offset after them."""
    pieces: list[np.ndarray] = []
    offset = 0
    for kind, shape in parts:
        dtype, n = np.dtype(kind), math.prod(shape)
        if offset + dtype.itemsize * n > len(payload):
            raise ProtocolError(f"truncated payload: {len(payload)} bytes, at least {offset + dtype.itemsize * n} needed")
        pieces.append(np.frombuffer(payload, dtype, n, offset).reshape(shape))
        offset += dtype.itemsize * n
    return pieces, offset


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values (as their uint16 bits; numpy has no bfloat16) widened exactly to float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def check_outliers(index: np.ndarray, values: np.ndarray, hidden: int, codec: str) -> np.ndarray:
    """Indices as int64 (what a scatter takes) once known to be valid, and the values finite."""
    if not np.isfinite(values).all():
        raise ProtocolError(f"codec {codec}: non-finite outlier value")
    index = index.view(np.uint16)
    if (index >= hidden).any():
        raise ProtocolError(f"codec {codec}: outlier index beyond hidden size {hidden}")
    return index.astype(np.int64)


def check_scale(scale: np.ndarray, codec: str) -> np.ndarray:
    scale = scale.astype(np.float32)
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ProtocolError(f"codec {codec}: non-finite or non-positive scale")
    return scale


def finish_decode(device: torch.device | str, scaled: np.ndarray, index: np.ndarray, values: np.ndarray,
                  shift: int) -> tuple[torch.Tensor, float]:
    """The rotated values (the integers times their steps) rotated back, with the outliers (fp16 values times 2**shift) put
    in place; and `peak`, a bound on the result's magnitude (`Codec.decoded`).

    The mirror of `rotated_with_outliers`: the per-value work in numpy on the host, then the rotation
    back and the scatter (`rotation.restored`): on the host in one call of src/link/rotate.c; elsewhere
    after one copy of the validated arrays' bytes (the int64 indices first, so that every part starts
    aligned) to `device`, where they run. Every input is finite and bounded, so the result is finite.
    An orthogonal rotation keeps each position's norm, so no value it gives exceeds the norm of the
    rotated row; twice that covers float32's rounding in the rotation."""
    count, hidden = scaled.shape
    k = index.shape[1]
    if count == 0:
        return torch.zeros(0, hidden, device=device), 0.0
    outliers = values.astype(np.float32) * np.float32(2.0**shift)
    norm = math.sqrt(float(np.einsum("ij,ij->i", scaled, scaled, dtype=np.float64).max()))  # float64: no square overflows
    peak = max(2.0 * norm, float(np.abs(outliers).max()) if k else 0.0)
    if torch.device(device).type == "cpu":
        return rotation.host_restored(scaled, index, outliers), peak
    flat = torch.from_numpy(np.concatenate([part.reshape(-1).view(np.uint8) for part in (index, scaled, outliers)]))
    states = replayed(functools.partial(_restored, count=count, hidden=hidden, k=k), flat, device, count, ("decode", count, hidden, k), fresh=True)
    return states, peak


def _restored(flat: torch.Tensor, count: int, hidden: int, k: int) -> torch.Tensor:
    """`finish_decode`'s device work: from the bytes of (indices, rotated values, outliers), the states."""
    cut = 8 * count * k
    rotated = flat[cut : cut + 4 * count * hidden].view(torch.float32).view(count, hidden)
    outliers = flat[cut + 4 * count * hidden :].view(torch.float32).view(count, k)
    return rotation.restored(rotated, flat[:cut].view(torch.int64).view(count, k), outliers)


class RotatedInt8Codec(Codec):
    """Outlier-aware int8 at a fixed rate: every value is one int8 (`int8-fixed`).

    Per position: the `outliers` largest-magnitude channels go as fp16 values with uint16 indices
    (LLM.int8()-style; they hold the massive activations, up to ~25,000 here). The rest is rotated
    by a fixed orthogonal matrix (`rotation.rotate`), which spreads any remaining heavy tail over all channels so
    that the vector looks Gaussian, and is quantized to int8 with one fp16 absmax scale. Decoding
    rotates back. Bytes per position: hidden + 2 + 4 * outliers (602 at hidden 576), and one byte
    per message, the outliers' power-of-two shift (`outliers_fp16`).
    """

    channel_weighted = True

    def __init__(self, name: str, codec_id: int, outliers: int):
        self.name, self.codec_id, self.outliers = name, codec_id, outliers

    def prepare(self) -> None:
        rotation.library()  # rotate.c, compiled on a first run (a fraction of a second), else loaded from the cache

    def _parts(self, count: int, hidden: int) -> list[tuple[type, tuple[int, ...]]]:
        k = self.outliers
        return [(np.float16, (count, 1)), (np.uint16, (count, k)), (np.float16, (count, k)), (np.int8, (count, hidden))]

    def payload_size(self, count: int, hidden: int, dtype_code: int) -> int:
        return 1 + sum(np.dtype(dtype).itemsize * math.prod(shape) for dtype, shape in self._parts(count, hidden))

    def encode(self, x: torch.Tensor, finite: bool = True) -> tuple[bytes, int]:
        index, values, rotated = rotated_with_outliers(x, self.outliers, self.name)
        if finite:
            finite_on_host(self.name, values, rotated)
        shift, values = outliers_fp16(values, self.name)
        with np.errstate(over="ignore"):
            scale = np.abs(rotated).max(-1, keepdims=True).clip(min=np.float32(1e-30)).astype(np.float16)
        if not np.isfinite(scale).all():  # the receiver would refuse it: say so here
            raise TriadicError(f"codec {self.name}: a state of {np.abs(rotated).max():.3g} is beyond its fp16 scale; use --codec int8")
        scale[scale == 0] = 1.0  # an all-zero row (or fp16 underflow)
        quantized = np.rint(rotated / scale.astype(np.float32) * np.float32(127)).clip(-127, 127).astype(np.int8)
        return b"".join([bytes([shift]), scale.tobytes(), index.astype(np.uint16).tobytes(), values.tobytes(), quantized.tobytes()]), DTYPE_CODES[torch.float32]

    def decoded(self, payload: memoryview, count: int, hidden: int, dtype_code: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
        expect_length(payload, self.payload_size(count, hidden, dtype_code), self.name, count)
        shift = read_shift(payload, self.name)
        (scale, index, values, quantized), _ = read_parts(payload[1:], self._parts(count, hidden))
        scale, index = check_scale(scale, self.name), check_outliers(index, values, hidden, self.name)
        return finish_decode(device, quantized.astype(np.float32) * (scale / np.float32(127)), index, values, shift)


class RiceCodec(Codec):
    """Outlier-aware 8-bit transport, entropy coded: the default `int8`.

    Per position, as `int8-fixed`: the `outliers` largest channels go as fp16 with uint16 indices,
    the rest is rotated by the same fixed orthogonal matrix. The rotated values are then rounded
    on a step of RMS / `steps_per_rms` (sent as bf16) instead of absmax / 127: the Gaussian-looking
    values become integers with a standard deviation of about `steps_per_rms`, which a Rice code
    with `k` low bits (`rice_encode`) stores in about 8 bits each. An absmax int8 step wastes about
    0.6 bit per value on range that only the largest value uses; this spends it on a 1.5x finer step
    for 1% more bytes.

    Payload per message: the outliers' power-of-two shift (one byte, `outliers_fp16`), steps [count]
    bf16, outlier indices [count, outliers] uint16, outlier values [count, outliers] fp16, then the
    Rice code of the count * hidden integers. About
    hidden * 8.03 / 8 + 2 + 4 * outliers bytes per position (604 at hidden 576). The length varies a
    little with the content and is bounded: the step is tied to the RMS, so the unary parts of one
    position add at most (2 * hidden * steps_per_rms + hidden) / 2**k bits.
    """

    channel_weighted = True

    def __init__(self, name: str, codec_id: int, outliers: int, steps_per_rms: float, k: int):
        self.name, self.codec_id, self.outliers, self.steps_per_rms, self.k = name, codec_id, outliers, steps_per_rms, k

    def _parts(self, count: int) -> list[tuple[type, tuple[int, ...]]]:
        return [(np.uint16, (count, 1)), (np.uint16, (count, self.outliers)), (np.float16, (count, self.outliers))]  # bf16 step bits

    def prepare(self) -> None:
        rice.library()  # rice.c and rotate.c, compiled on a first run (a fraction of a second), else loaded from the cache
        rotation.library()

    def encode(self, x: torch.Tensor, finite: bool = True) -> tuple[bytes, int]:
        index, values, rotated = rotated_with_outliers(x, self.outliers, self.name)
        if finite:
            finite_on_host(self.name, values, rotated)
        shift, values = outliers_fp16(values, self.name)
        # bf16: the step needs range, not precision (both sides use the rounded value). The RMS in float64:
        # no square overflows (in float32 a value past 1.8e19 made the step inf), and the step does not
        # depend on the order of a float32 sum, which differs between libraries and devices.
        rms = np.sqrt(np.square(rotated, dtype=np.float64).mean(-1, keepdims=True))
        step = bf16_bits((rms / self.steps_per_rms).astype(np.float32))
        step[step == 0] = 0x3F80  # an all-zero row: a step of 1.0
        code = rice.round_encode(rotated, bf16_bits_to_float32(step), self.k)  # integers, |q| bounded by hidden * steps_per_rms
        return b"".join([bytes([shift]), step.tobytes(), index.astype(np.uint16).tobytes(), values.tobytes(), code]), DTYPE_CODES[torch.float32]

    def max_step(self, shift: int) -> float:
        """The largest step an encoder can send: the values left after the outliers are each at most the
        smallest outlier, so at most FP16_MAX * 2**shift, and so is their RMS (the rotation keeps it); 1% for
        bf16 rounding."""
        return 1.01 * FP16_MAX * 2.0**shift / self.steps_per_rms

    def max_payload_size(self, count: int, hidden: int) -> int:
        """The longest payload an encoder can send: with the step tied to the RMS, a position's unary bits are
        at most (2 * hidden * steps_per_rms + hidden) / 2**k (plus 1% for the bf16 step) and one per value."""
        unary_bits = count * (1.01 * (2 * hidden * self.steps_per_rms + hidden) / 2**self.k + hidden)
        parts = sum(np.dtype(dtype).itemsize * math.prod(shape) for dtype, shape in self._parts(count))
        return 1 + parts + (count * hidden * self.k + 7) // 8 + math.ceil(unary_bits / 8) + 1  # + the shift byte

    def decoded(self, payload: memoryview, count: int, hidden: int, dtype_code: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
        limit = self.max_payload_size(count, hidden)
        if len(payload) > limit:
            raise ProtocolError(f"codec {self.name}: payload of {len(payload)} bytes for {count} positions, at most {limit} can be valid")
        shift = read_shift(payload, self.name)
        payload = payload[1:]
        (step, index, values), offset = read_parts(payload, self._parts(count))
        step, index = check_scale(bf16_bits_to_float32(step), self.name), check_outliers(index, values, hidden, self.name)
        if (step > self.max_step(shift)).any():
            raise ProtocolError(f"codec {self.name}: step {step.max():.3g} is out of range (at most {self.max_step(shift):.4g})")
        return finish_decode(device, rice.decode_scale(payload[offset:], count, hidden, self.k, step, self.name), index, values, shift)


class BlockwiseInt8Codec(Codec):
    """bitsandbytes' blockwise dynamic 8-bit quantization (as Petals/hivemind send activations).

    The message's values are taken as one flat run in blocks of 64, each with a float32 absmax;
    no outlier handling: 612 bytes per position at hidden 576.
    """

    block = 64

    def __init__(self, name: str, codec_id: int):
        self.name, self.codec_id = name, codec_id

    def _blocks(self, count: int, hidden: int) -> int:
        return -(-count * hidden // self.block)

    def payload_size(self, count: int, hidden: int, dtype_code: int) -> int:
        return count * hidden + 4 * self._blocks(count, hidden)

    def encode(self, x: torch.Tensor, finite: bool = True) -> tuple[bytes, int]:
        import bitsandbytes.functional as bnb

        x = x.detach().to("cpu", torch.float32)
        if finite:
            finite_on_host(self.name, x.numpy())
        quantized, state = bnb.quantize_blockwise(x.flatten(), blocksize=self.block)
        return tensor_bytes(state.absmax.float()) + tensor_bytes(quantized), DTYPE_CODES[torch.float32]

    def decoded(self, payload: memoryview, count: int, hidden: int, dtype_code: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
        import bitsandbytes.functional as bnb

        expect_length(payload, self.payload_size(count, hidden, dtype_code), self.name, count)
        blocks = self._blocks(count, hidden)
        absmax = bytes_tensor(payload[: 4 * blocks], torch.float32, (blocks,))
        if not torch.isfinite(absmax).all():
            raise ProtocolError(f"codec {self.name}: non-finite scale")
        quantized = bytes_tensor(payload[4 * blocks :], torch.uint8, (count * hidden,))
        state = bnb.QuantState(absmax=absmax, code=bnb.create_dynamic_map().float(), blocksize=self.block, dtype=torch.float32)
        peak = 1.01 * float(absmax.abs().max())  # each value is a code of magnitude at most 1 times its block's absmax
        return bnb.dequantize_blockwise(quantized, state).view(count, hidden).to(device), peak


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        RawCodec("none", 0, None),
        RawCodec("fp16", 1, torch.float16),
        RawCodec("bf16", 2, torch.bfloat16),
        RotatedInt8Codec("int8-fixed", 3, outliers=6),
        BlockwiseInt8Codec("bnb8", 4),
        RiceCodec("int8", 5, outliers=6, steps_per_rms=60.0, k=6),
    )
}
CODECS_BY_ID: dict[int, Codec] = {codec.codec_id: codec for codec in CODECS.values()}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise TriadicError(f"unknown codec {name!r}; choose from {', '.join(CODECS)}") from None
