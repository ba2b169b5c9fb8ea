"""How a block of hidden states [count, hidden] becomes bytes and back.

Each codec has a one-byte id carried in the message header. Decoding validates the payload length
and returns float values; the protocol layer rejects non-finite results.
"""
from __future__ import annotations

import functools
import math

import torch

from .utils import ProtocolError, TriadicError

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def tensor_bytes(x: torch.Tensor) -> bytes:
    return x.contiguous().view(torch.uint8).numpy().tobytes()


def bytes_tensor(payload: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(shape)


class Codec:
    name: str
    codec_id: int

    def encode(self, x: torch.Tensor) -> tuple[bytes, int]:
        """Payload bytes and the dtype code for the header."""
        raise NotImplementedError

    def payload_size(self, count: int, hidden: int, dtype_code: int) -> int:
        raise NotImplementedError

    def decode(self, payload: memoryview, count: int, hidden: int, dtype_code: int) -> torch.Tensor:
        raise NotImplementedError


class RawCodec(Codec):
    """Lossless in the sender's compute dtype (`none`), or a plain cast (`fp16`, `bf16`)."""

    def __init__(self, name: str, codec_id: int, dtype: torch.dtype | None):
        self.name, self.codec_id, self.dtype = name, codec_id, dtype

    def encode(self, x: torch.Tensor) -> tuple[bytes, int]:
        x = x.detach().to("cpu")
        if self.dtype is not None:
            if self.dtype == torch.float16 and x.abs().max() > torch.finfo(torch.float16).max:
                raise TriadicError("codec fp16: a hidden state exceeds the fp16 range; use bf16 or int8")
            x = x.to(self.dtype)
        return tensor_bytes(x), DTYPE_CODES[x.dtype]

    def payload_size(self, count: int, hidden: int, dtype_code: int) -> int:
        dtype = CODE_DTYPES[dtype_code]
        if self.dtype is not None and dtype != self.dtype:
            raise ProtocolError(f"codec {self.name}: dtype code {dtype_code} does not match the codec")
        return count * hidden * dtype.itemsize

    def decode(self, payload: memoryview, count: int, hidden: int, dtype_code: int) -> torch.Tensor:
        return bytes_tensor(payload, CODE_DTYPES[dtype_code], (count, hidden))


FP16_MAX = torch.finfo(torch.float16).max


def _rotation_block(hidden: int) -> int:
    """Rotate in blocks: the whole vector up to 1024 channels, else the largest divisor <= 1024 (4096 -> 1024)."""
    return max(b for b in range(1, min(hidden, 1024) + 1) if hidden % b == 0)


@functools.lru_cache(maxsize=8)
def rotation(block: int) -> torch.Tensor:
    """A fixed random orthogonal matrix, the same on both sides: computed in float64 from a seeded Gaussian."""
    generator = torch.Generator().manual_seed(0x7121AD1C + block)
    gaussian = torch.randn(block, block, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


class RotatedInt8Codec(Codec):
    """Outlier-aware int8, the default lossy codec.

    Per position: the `outliers` largest-magnitude channels go as fp16 values with uint16 indices
    (LLM.int8()-style; they hold the massive activations, up to ~25,000 here). The rest is rotated
    by a fixed random orthogonal matrix, which spreads any remaining heavy tail over all channels so
    that the vector looks Gaussian, and is quantized to int8 with one fp16 absmax scale. Decoding
    rotates back. Bytes per position: hidden + 2 + 4 * outliers (602 at hidden 576).
    """

    def __init__(self, name: str, codec_id: int, outliers: int):
        self.name, self.codec_id, self.outliers = name, codec_id, outliers

    def _parts(self, count: int, hidden: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        k = self.outliers
        return [(torch.float16, (count, 1)), (torch.int16, (count, k)), (torch.float16, (count, k)), (torch.int8, (count, hidden))]

    def payload_size(self, count: int, hidden: int, dtype_code: int) -> int:
        return sum(dtype.itemsize * math.prod(shape) for dtype, shape in self._parts(count, hidden))

    def encode(self, x: torch.Tensor) -> tuple[bytes, int]:
        x = x.detach().to("cpu", torch.float32)
        count, hidden = x.shape
        index = x.abs().topk(self.outliers, dim=-1).indices
        values = x.gather(-1, index)
        if values.abs().max() > FP16_MAX:
            raise TriadicError("codec int8: an outlier exceeds the fp16 range; use --codec bf16 or none")
        rest = x.scatter(-1, index, 0.0)
        block = _rotation_block(hidden)
        rotated = (rest.view(count, hidden // block, block) @ rotation(block)).view(count, hidden)
        scale = rotated.abs().amax(-1, keepdim=True).clamp_min(1e-30).to(torch.float16).to(torch.float32)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row (or fp16 underflow)
        quantized = (rotated / scale * 127).round().clamp(-127, 127).to(torch.int8)
        pieces = [scale.to(torch.float16), index.to(torch.int16), values.to(torch.float16), quantized]
        return b"".join(tensor_bytes(p) for p in pieces), DTYPE_CODES[torch.float32]

    def decode(self, payload: memoryview, count: int, hidden: int, dtype_code: int) -> torch.Tensor:
        pieces, offset = [], 0
        for dtype, shape in self._parts(count, hidden):
            size = dtype.itemsize * math.prod(shape)
            pieces.append(bytes_tensor(payload[offset : offset + size], dtype, shape))
            offset += size
        scale, index, values, quantized = pieces
        scale, values, index = scale.float(), values.float(), index.long() & 0xFFFF
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ProtocolError("codec int8: non-finite or non-positive scale")
        if not torch.isfinite(values).all():
            raise ProtocolError("codec int8: non-finite outlier value")
        if (index >= hidden).any():
            raise ProtocolError(f"codec int8: outlier index beyond hidden size {hidden}")
        block = _rotation_block(hidden)
        rotated = quantized.float() * (scale / 127)
        rest = (rotated.view(count, hidden // block, block) @ rotation(block).T).view(count, hidden)
        return rest.scatter(-1, index, values)


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

    def encode(self, x: torch.Tensor) -> tuple[bytes, int]:
        import bitsandbytes.functional as bnb

        x = x.detach().to("cpu", torch.float32)
        quantized, state = bnb.quantize_blockwise(x.flatten(), blocksize=self.block)
        return tensor_bytes(state.absmax.float()) + tensor_bytes(quantized), DTYPE_CODES[torch.float32]

    def decode(self, payload: memoryview, count: int, hidden: int, dtype_code: int) -> torch.Tensor:
        import bitsandbytes.functional as bnb

        blocks = self._blocks(count, hidden)
        absmax = bytes_tensor(payload[: 4 * blocks], torch.float32, (blocks,))
        if not torch.isfinite(absmax).all():
            raise ProtocolError(f"codec {self.name}: non-finite scale")
        quantized = bytes_tensor(payload[4 * blocks :], torch.uint8, (count * hidden,))
        state = bnb.QuantState(absmax=absmax, code=bnb.create_dynamic_map().float(), blocksize=self.block, dtype=torch.float32)
        return bnb.dequantize_blockwise(quantized, state).view(count, hidden)


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        RawCodec("none", 0, None),
        RawCodec("fp16", 1, torch.float16),
        RawCodec("bf16", 2, torch.bfloat16),
        RotatedInt8Codec("int8", 3, outliers=6),
        BlockwiseInt8Codec("bnb8", 4),
    )
}
CODECS_BY_ID: dict[int, Codec] = {codec.codec_id: codec for codec in CODECS.values()}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise TriadicError(f"unknown codec {name!r}; choose from {', '.join(CODECS)}") from None
