"""Linear layers over weights stored as column panels: a product over a few rows that reads each weight once.

A batching cloud's products run over the rows of several sessions at once, mostly 2 to 30. On one CPU
thread MKL's fp32 product over 8 such rows costs about twice its product over one row, although both
read the same weights from memory once: its small-row path repacks the weight on every call. Here the
weights are stored packed once, `W.T` cut into panels of 32 columns, each panel contiguous, and a small C
kernel (src/panel_gemm.c) streams every panel past up to 14 rows held in registers. Over SmolLM2's 28
middle layers in turn (7 products each, weights from memory, one thread, a 2-core AMD EPYC), per layer,
against MKL over column-major weights: one row 856 against 1,163 us, 8 rows 765 against 1,870, 16 rows
1,378 against 2,599, 256 rows 16,920 against 21,375, 1,024 rows 68,623 against 81,594 (`python -m
bench.panels`, results/panels.md). The panels hold the weight once (the last panel zero-padded).

Every output of the kernel sums its terms in order, one fused multiply-add each: a row's result does not
depend on which other rows share the call, so a session's step packed with others gives, from the
products, what it gives alone, bit for bit.

With several torch threads the kernel shares the panels out among as many OpenMP threads, each panel
computed whole by one thread, so a product gives the same bits on any number of threads. Over the 28
layers as above on a 2-core AMD EPYC, two threads against two threads of MKL over column-major weights
(median of 15 passes): one row 534 against 1,045 us, 8 rows 418 against 2,273, 16 rows 721 against
2,070, 64 rows 2,222 against 4,137; one thread of the kernel 591, 620, 1,198 and 4,401.

bf16 weights, where the CPU has AVX512_BF16, go into panels of their own layout (`to_panels`) and a kernel
that adds two terms per instruction (VDPBF16PS) to fp32 sums, rounded to bf16 once, as torch's bf16 product
rounds: one row 344 against torch's bf16 1,036 us per layer, 17 rows 743 against 1,648 (one thread).

The kernel is compiled on first use with the system's C compiler into $TRIADIC_CACHE (with OpenMP where
the compiler has it, else for one thread), and used where the CPU has AVX-512. Where that or the compiler
is missing, `use_panels` says why and the layout stays as it was.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch
from torch import nn

from . import native
from .models import CONSTRUCTION
from .precision import cpu_flags

logger = logging.getLogger(__name__)

PANEL = 32  # columns per panel: must match PANEL in panel_gemm.c
SOURCE = Path(__file__).with_name("panel_gemm.c")
FLAGS = ("-O3", "-mavx512f", "-mfma", "-shared", "-fPIC")
BF16_FLAG = "avx512_bf16"  # /proc/cpuinfo's name for the VDPBF16PS the bf16 kernel runs on
OPENMP = "-fopenmp"  # shares a product's panels among torch's threads; a compiler without it builds for one thread

_kernel: ctypes.CDLL | None = None
_kernel_problem: str | None = None


def why_no_kernel() -> str | None:
    """Why the panel kernel cannot run here, or None where it can (compiling it on first call)."""
    global _kernel, _kernel_problem
    if _kernel is not None or _kernel_problem is not None:
        return _kernel_problem
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        _kernel_problem = f"the CPU's vector capability is {capability}, not AVX-512"
        return _kernel_problem
    try:
        _kernel = _compiled()
    except Exception as error:  # noqa: BLE001 (whatever fails, the products stay torch's and the reason is said)
        _kernel_problem = f"the panel kernel could not be built: {error}".splitlines()[0]
        return _kernel_problem
    if not shares_threads():
        logger.warning("the panel kernel was built without OpenMP: its products run on one thread whatever torch runs")
    return None


def shares_threads() -> bool:
    """Whether the loaded kernel shares a product's panels among torch's threads (it was built with OpenMP)."""
    return _kernel is not None and bool(_kernel.panel_gemm_threads())


def _compiled() -> ctypes.CDLL:
    """The kernel's shared library, with OpenMP where the compiler has it (`native.compiled`: cached, checked)."""
    return native.compiled(SOURCE, ((*FLAGS, OPENMP), FLAGS), _prepare, "panel kernel", logger)


def _prepare(library: ctypes.CDLL) -> None:
    """Declare the kernel's symbols and check its products (`_check`)."""
    for name in ("panel_gemm", "panel_gemm_bf16"):  # the second only from a compiler that knows AVX512_BF16
        if hasattr(library, name):
            product = getattr(library, name)
            product.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_int]
            product.restype = None
    library.panel_gemm_threads.restype = ctypes.c_int
    _check(library)


def _check(library: ctypes.CDLL) -> None:
    """Products the kernel must get right before any model uses it (a miscompiled or foreign library is refused):
    last row blocks of 3, 14, 1, 4 and 2 rows, partly filled last panels, a bias, and more rows than one pass takes; on
    torch's threads, where it runs several, the same bits as on one. In bf16 too where the library has it and the
    CPU has AVX512_BF16 (elsewhere it would die of SIGILL)."""
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()  # not more: OpenMP workers started here would outlive the check
    dtypes = [torch.float32] + ([torch.bfloat16] if _has_bf16(library) else [])
    for dtype in dtypes:
        product, tolerance = (library.panel_gemm_bf16, 2e-2) if dtype == torch.bfloat16 else (library.panel_gemm, 1e-5)
        for rows, in_features, out_features, biased in ((17, 37, 100, False), (14, 130, 49, True), (1, 48, 96, False), (300, 5, 1, True)):
            in_features += in_features % 2 if dtype == torch.bfloat16 else 0  # bf16 takes its inputs in pairs
            weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
            x = torch.randn(rows, in_features, generator=generator).to(dtype)
            bias = torch.randn(out_features, generator=generator) if biased else None
            stored = to_panels(weight)  # held: the kernel sees only addresses
            got, shared = torch.empty(rows, out_features, dtype=dtype), torch.empty(rows, out_features, dtype=dtype)
            start = bias.data_ptr() if bias is not None else None
            product(x.data_ptr(), rows, in_features, stored.data_ptr(), out_features, got.data_ptr(), start, 1)
            exact = x.float() @ weight.float().T + (bias if bias is not None else 0)
            if not torch.allclose(got.float(), exact, rtol=tolerance, atol=tolerance):
                raise RuntimeError(f"its {dtype} product differs from torch's ({rows} x {in_features} by {out_features})")
            if threads > 1:
                product(x.data_ptr(), rows, in_features, stored.data_ptr(), out_features, shared.data_ptr(), start, threads)
                if not torch.equal(got, shared):
                    raise RuntimeError(f"its {dtype} product on {threads} threads differs from one thread's ({rows} x {in_features} by {out_features})")


def _has_bf16(library: ctypes.CDLL) -> bool:
    """Whether bf16 products can run: the library has them (a compiler that knows AVX512_BF16) and the CPU the instructions."""
    return hasattr(library, "panel_gemm_bf16") and BF16_FLAG in cpu_flags()


def why_not_paneled(weight: torch.Tensor) -> str | None:
    """Why this linear weight cannot be stored as panels, or None where it can (the kernel is built on first call)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return "the panel kernel computes in float32 or bfloat16 on the CPU"
    if weight.dtype == torch.bfloat16:  # asked before the kernel is built: no build for a layer it could not take
        if BF16_FLAG not in cpu_flags():
            return f"the CPU has no {BF16_FLAG} for bfloat16 panels"
        if weight.shape[1] % 2:
            return "a bfloat16 panel takes its inputs in pairs, and this layer has an odd number"
    reason = why_no_kernel()
    if reason is None and weight.dtype == torch.bfloat16 and not hasattr(_kernel, "panel_gemm_bf16"):
        return "the panel kernel was built without bfloat16 (a compiler that does not know AVX512_BF16)"
    return reason


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] weight -> [panels, in, PANEL]: panel p holds columns PANEL*p ... of W.T, the last zero-padded.

    In bf16, [panels, in / 2, PANEL, 2]: W.T's rows in pairs, each column's two values side by side, as one
    VDPBF16PS takes them. Written panel by panel into one new tensor, so that a weight is never held more than twice."""
    out_features, in_features = weight.shape
    paired = weight.dtype == torch.bfloat16
    stored = weight.new_zeros(-(-out_features // PANEL), *((in_features // 2, PANEL, 2) if paired else (in_features, PANEL)))
    for p, block in enumerate(weight.split(PANEL)):
        columns = block.T  # [in, columns of this panel]
        stored[p, :, : block.shape[0]] = columns.reshape(in_features // 2, 2, -1).transpose(1, 2) if paired else columns
    return stored


class PanelLinear(nn.Module):
    """`nn.Linear`'s product over weights stored as panels (fp32, or bf16 with AVX512_BF16; CPU, no gradients)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        reason = why_not_paneled(linear.weight)
        if reason is not None:
            raise ValueError(reason)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.panels = nn.Parameter(to_panels(linear.weight.detach()), requires_grad=False)
        self.bias = linear.bias
        # The kernel starts its sums at the bias, in fp32: a bf16 layer's output is rounded once, as torch's is.
        self.register_buffer("bias32", None if linear.bias is None else linear.bias.detach().float().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        dtype = self.panels.dtype
        if rows.dtype != dtype:
            raise TypeError(f"PanelLinear computes in {dtype}, not {rows.dtype}")
        rows = rows.contiguous()
        y = torch.empty(rows.shape[0], self.out_features, dtype=dtype)
        assert _kernel is not None  # PanelLinear is made only once the kernel has loaded
        product = _kernel.panel_gemm_bf16 if dtype == torch.bfloat16 else _kernel.panel_gemm
        product(rows.data_ptr(), rows.shape[0], self.in_features, self.panels.data_ptr(), self.out_features, y.data_ptr(),
                None if self.bias32 is None else self.bias32.data_ptr(), torch.get_num_threads())
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, panels={PANEL}"


def use_panels(part: nn.Module) -> str | None:
    """Store the fp32 or bf16 CPU linear layers of a part's decoder layers as panels; why not, or None where done
    (all of them or none: the part is unchanged where one cannot be).

    One weight at a time, each dropped as soon as its panels replace it: the part holds one weight twice at most."""
    names = [name for name, module in part.named_modules() if isinstance(module, nn.Linear) and ".layers." in name]
    for name in names:  # the kernel is built at the first, here, where it will be used
        reason = why_not_paneled(part.get_submodule(name).weight)
        if reason is not None:
            return reason
    with CONSTRUCTION:  # new parameters: not while another thread builds a part on the meta device
        for name in names:
            owner, _, attribute = name.rpartition(".")
            setattr(part.get_submodule(owner), attribute, PanelLinear(part.get_submodule(name)))
    logger.info("%d linear layers stored as panels of %d columns", len(names), PANEL)
    return None
