"""--dtype auto: bf16 exactly where the device computes it natively, fp32 elsewhere; explicit names win."""
import pytest
import torch

from src import precision
from src.utils import TriadicError


@pytest.mark.parametrize("flags,expected", [
    ({"avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"amx_bf16", "amx_tile"}, torch.bfloat16),
    ({"avx2", "avx512f", "avx512bw"}, torch.float32),  # bf16 only emulated: slower than fp32
    (set(), torch.float32),  # no /proc/cpuinfo
])
def test_auto_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    dtype, reason = precision.resolve_dtype("auto", "cpu")
    assert dtype == expected
    assert reason == ("auto: native bf16 on cpu" if expected == torch.bfloat16 else "auto: no native bf16 on cpu")


def test_explicit_names_and_errors():
    assert precision.resolve_dtype("float32") == (torch.float32, "explicit")
    assert precision.resolve_dtype("bfloat16", "cpu") == (torch.bfloat16, "explicit")
    with pytest.raises(TriadicError, match="unknown dtype 'half'; choose from auto, float32"):
        precision.resolve_dtype("half")
    assert precision.dtype_name(torch.bfloat16) == "bfloat16"
