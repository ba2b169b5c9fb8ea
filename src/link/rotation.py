"""The int8 codecs' rotation: a randomized Walsh-Hadamard transform, the same bits in torch and in C.

The int8 codecs send a position's six largest channels as they are and rotate the rest by a fixed
orthogonal matrix, which spreads any heavy tail over all channels so that the values look Gaussian
before they are rounded. The matrix here is structured, as QuaRot and QuIP# rotate: with hidden = m * a,
a the largest power of two dividing it (576 = 9 x 64, 640 = 5 x 128, 4096 = 1 x 4096),

    R = (Q_m / sqrt(a)) (x) H_a . diag(s)

random signs s, a Walsh-Hadamard transform H_a of each block of a channels, and a seeded random
orthogonal Q_m mixing the m blocks. It mixes every channel into every other, costs hidden * (log2 a + m)
operations per position instead of hidden**2, and has no matrix to read: a dense 576 x 576 one is 1.3 MB,
which a message found cold in memory after the layers had streamed their weights. One position's outlier
selection and rotation at 576, warm / cold: the dense product 42 / 174 us, this in C 15 / 74 (in torch
182 / 329: many small operations). On SmolLM2's and Gemma 3's states it gives the dense rotation's rounding
error and Rice size (2.25-2.39e-5 and 8.03 bits per value at every layer measured, both;
`python -m bench.rotation`, results/rotation.md).

Each step is a product, a sum or a difference of two values, in a fixed order (the blocks are mixed as
a running sum, not a matrix product, whose order of addition is the library's), so torch on any device
and src/link/rotate.c give the same bits. On the host the codecs run rotate.c: the outlier selection, the
zeroing and the rotation (and, decoding, the inverse and the outliers' scatter) in one call instead of
some ten torch operations, each of which starts cold in a step. torch is the path on a GPU (one CUDA graph
replay, `codec.replayed`) and wherever no C compiler is.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
import threading
from pathlib import Path

import numpy as np
import torch

from .. import native

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rotate.c")
FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")  # portable, no fused multiply-adds: torch's bits


def blocks(hidden: int) -> tuple[int, int]:
    """(m, a): hidden = m * a with a the largest power of two dividing hidden (a Walsh-Hadamard block)."""
    a = hidden & -hidden
    return hidden // a, a


@functools.lru_cache(maxsize=16)
def random_orthogonal(size: int, salt: int = 0) -> torch.Tensor:
    """A fixed random orthogonal matrix, the same on both sides: computed in float64 from a seeded Gaussian."""
    generator = torch.Generator().manual_seed(0x7121AD1C + size + (salt << 20))
    gaussian = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))


@functools.lru_cache(maxsize=16)
def parameters(hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs [hidden], mix [m, m]) in float32 on the host: the seeded signs, and Q_m / sqrt(a)."""
    m, a = blocks(hidden)
    generator = torch.Generator().manual_seed(0x51635 + hidden)
    signs = 1.0 - 2.0 * torch.randint(0, 2, (hidden,), generator=generator).to(torch.float32)
    mix = (random_orthogonal(m, 3) / math.sqrt(a)).to(torch.float32).contiguous()  # QR's Q is column-major: C reads rows
    return signs, mix


_on_device: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
_on_device_lock = threading.Lock()


def _parameters_on(hidden: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`parameters(hidden)` where the states live: copied once per device, not at every message; made once even when a
    burst of sessions asks at once (a server's first clients, each in its own thread)."""
    key = (hidden, device)
    held = _on_device.get(key)
    if held is None:
        with _on_device_lock:
            held = _on_device.get(key)
            if held is None:
                signs, mix = parameters(hidden)
                held = _on_device[key] = (signs.to(device), mix.to(device))
    return held


def _walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """The unnormalized Walsh-Hadamard transform along the last dimension (a power of two), butterfly by butterfly."""
    *lead, a = x.shape
    width = 1
    while width < a:
        pairs = x.reshape(*lead, a // (2 * width), 2, width)
        u, w = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.cat([u + w, u - w], dim=-1).reshape(*lead, a)
        width *= 2
    return x


def _mixed(x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """[count, m, a] blocks -> block i = mix[i, 0] * block 0 + mix[i, 1] * block 1 + ..., a product and a sum at a time."""
    out = mix[:, :1] * x[:, :1]
    for j in range(1, x.shape[1]):
        out = out + mix[:, j : j + 1] * x[:, j : j + 1]
    return out


def rotate(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """[count, hidden] float32 states times the codec's rotation R (or its transpose), where they live."""
    count, hidden = x.shape
    m, a = blocks(hidden)
    signs, mix = _parameters_on(hidden, str(x.device))
    if inverse:
        return (_walsh_hadamard(_mixed(x.reshape(count, m, a), mix.T)).reshape(count, hidden)) * signs
    return _mixed(_walsh_hadamard((x * signs).reshape(count, m, a)), mix).reshape(count, hidden)


def outliers_and_rest(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position, the k channels of largest magnitude (largest first; among equal ones the earlier), their values,
    and the rest (those zeroed) rotated: where x lives. NaN counts as largest, so the values show it."""
    x = x.detach().to(torch.float32)
    hidden = x.shape[-1]
    # One key per channel, all distinct: the magnitude's bits (non-negative floats order as their bits; NaN's above
    # Inf's), then the earlier channel. So `topk` has one answer on every device, and a CUDA graph can hold it (a
    # stable sort may not be captured).
    earlier = hidden - 1 - torch.arange(hidden, device=x.device)
    top = ((x.abs().view(torch.int32).to(torch.int64) << 32) | earlier).topk(k, dim=-1).indices
    return top, x.gather(-1, top), rotate(x.scatter(-1, top, 0.0))


def restored(rotated: torch.Tensor, index: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
    """`outliers_and_rest` undone: the rest rotated back, the outliers put in place."""
    return rotate(rotated, inverse=True).scatter(-1, index, outliers)


# The host's path: rotate.c, built on first use (native.compiled), else torch's.

def library() -> ctypes.CDLL | None:
    """rotate.c's library, built on first use; None where it cannot be (the reason is logged once, torch serves)."""
    return _kernel.get()


def _prepare(lib: ctypes.CDLL) -> None:
    """Declare the two functions and check them against torch's definition, bit for bit (`_check`)."""
    pointer, long = ctypes.c_void_p, ctypes.c_long
    lib.outliers_rotate.argtypes = [pointer, long, long, long, ctypes.c_int, pointer, pointer, pointer, pointer, pointer]
    lib.outliers_rotate.restype = ctypes.c_int
    lib.restore.argtypes = [pointer, long, long, long, ctypes.c_int, pointer, pointer, pointer, pointer, pointer]
    lib.restore.restype = ctypes.c_int
    _check(lib)


def _check(lib: ctypes.CDLL) -> None:
    """torch's bits, before any message uses the library (a miscompiled one is refused): block shapes with one block,
    several and blocks of one channel, equal magnitudes (the earlier channel first), zeros of both signs, and values
    far apart in scale."""
    generator = torch.Generator().manual_seed(0)
    for hidden in (576, 640, 64, 7, 12):
        x = torch.randn(3, hidden, generator=generator) * torch.exp(2 * torch.randn(hidden, generator=generator))
        x[0, :5] = torch.tensor([2.0, -2.0, 2.0, 0.0, -0.0])[: min(5, hidden)]  # ties, and signed zeros
        x[1] = x[1].round()  # many equal magnitudes
        x[2, 1:] = 0.0
        k = min(6, hidden)
        expected = [t.numpy() for t in outliers_and_rest(x, k)]
        got = _outliers_rotated(lib, x.numpy(), k)
        if got is None or not all(_same_bits(g, e) for g, e in zip(got, expected)):
            raise RuntimeError(f"its outliers and rotation at hidden {hidden} differ from torch's")
        back = restored(*(torch.from_numpy(t) for t in (expected[2], expected[0], expected[1]))).numpy()
        again = _restored(lib, expected[2], expected[0], expected[1])
        if again is None or not _same_bits(again, back):
            raise RuntimeError(f"its inverse rotation at hidden {hidden} differs from torch's")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _outliers_rotated(lib: ctypes.CDLL, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    count, hidden = x.shape
    m, a = blocks(hidden)
    signs, mix = (t.numpy() for t in parameters(hidden))
    x = np.ascontiguousarray(x, np.float32)
    index, values, rotated = np.empty((count, k), np.int64), np.empty((count, k), np.float32), np.empty((count, hidden), np.float32)
    status = lib.outliers_rotate(x.ctypes.data, count, m, a, k, signs.ctypes.data, mix.ctypes.data, index.ctypes.data,
                                 values.ctypes.data, rotated.ctypes.data)
    return (index, values, rotated) if status == 0 else None


def _restored(lib: ctypes.CDLL, rotated: np.ndarray, index: np.ndarray, values: np.ndarray) -> np.ndarray | None:
    count, hidden = rotated.shape
    m, a = blocks(hidden)
    signs, mix = (t.numpy() for t in parameters(hidden))
    rotated, index, values = (np.ascontiguousarray(t) for t in (rotated, index, values))
    out = np.empty((count, hidden), np.float32)
    status = lib.restore(rotated.ctypes.data, count, m, a, index.shape[1], signs.ctypes.data, mix.ctypes.data,
                         index.ctypes.data, values.ctypes.data, out.ctypes.data)
    return out if status == 0 else None


def host_outliers_and_rest(x: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`outliers_and_rest` of host states, as host arrays (int64 indices, float32 values, float32 rotated): in one C call
    where the library runs and the values are finite, else in torch (which also shows what is not finite)."""
    lib = library()
    if lib is not None:
        got = _outliers_rotated(lib, x.detach().to(torch.float32).numpy(), k)
        if got is not None:
            return got
    index, values, rotated = (t.numpy() for t in outliers_and_rest(x, k))
    return index, values, rotated


def host_restored(rotated: np.ndarray, index: np.ndarray, values: np.ndarray) -> torch.Tensor:
    """`restored` of validated host arrays, as a host tensor: in one C call where the library runs, else in torch."""
    lib = library()
    out = _restored(lib, rotated, index, values) if lib is not None else None
    if out is None:
        return restored(torch.from_numpy(rotated), torch.from_numpy(index), torch.from_numpy(values))
    return torch.from_numpy(out)


_kernel = native.OptionalLibrary(SOURCE, FLAGS, _prepare, "C rotation", "torch rotates the int8 messages", logger)
