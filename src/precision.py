"""Which floating-point dtype a side computes in: `--dtype auto` and its explicit overrides.

bf16 halves the bytes every decode step streams from memory, but only pays off where the hardware
computes in it natively: on a CPU with `avx512_bf16` or `amx_bf16` a bf16 decoder layer runs about
twice as fast as fp32 (../shared/notes/cpu-kernels.md); elsewhere it is emulated and slower. So
`auto` picks bf16 where the CPU (or the GPU) has it and fp32 otherwise, and says why.
"""
from __future__ import annotations

import functools
import logging

import torch

from .utils import TriadicError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def check_device(device: str, flag: str) -> None:
    """One line for a device this process cannot use (a typo, CUDA on a CPU-only build, an index past the last GPU)."""
    try:
        torch.empty(0, device=device)
        if torch.device(device).type == "meta":
            raise ValueError("the meta device holds shapes, not values")
    except (RuntimeError, AssertionError, ValueError) as error:  # torch raises each of these, by device kind
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TriadicError(f"{flag} {device}: not a device this process can use ({reason[:160]})") from None


def native_bf16(device: str) -> bool:
    """Whether `device` computes in bf16 natively (not emulated)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)
    return False


def resolve_dtype(name: str, device: str = "cpu") -> tuple[torch.dtype, str]:
    """The dtype for `name` on `device`, and a short reason ("auto: native bf16" or "explicit")."""
    if name == "auto":
        if native_bf16(device):
            return torch.bfloat16, f"auto: native bf16 on {device}"
        return torch.float32, f"auto: no native bf16 on {device}"
    try:
        return DTYPES[name], "explicit"
    except KeyError:
        raise TriadicError(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
