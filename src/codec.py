"""How a block of hidden states [count, hidden] becomes bytes and back.

Each codec has a one-byte id carried in the message header. Decoding validates the payload length
and returns float values; the protocol layer rejects non-finite results.
"""
from __future__ import annotations

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


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        RawCodec("none", 0, None),
        RawCodec("fp16", 1, torch.float16),
        RawCodec("bf16", 2, torch.bfloat16),
    )
}
CODECS_BY_ID: dict[int, Codec] = {codec.codec_id: codec for codec in CODECS.values()}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise TriadicError(f"unknown codec {name!r}; choose from {', '.join(CODECS)}") from None
