"""Linear layers over panel-stored weights (src/panels.py): the product nn.Linear gives, a row independent of the others."""
import ctypes
import time
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from src import native, panels
from src.panels import PanelLinear, to_panels, use_panels, why_no_kernel

needs_kernel = pytest.mark.skipif(why_no_kernel() is not None, reason=f"{why_no_kernel()}")
needs_bf16_kernel = pytest.mark.skipif(why_no_kernel() is not None or panels.BF16_FLAG not in panels.cpu_flags(),
                                       reason="no panel kernel, or no avx512_bf16")


def test_panels_hold_the_weight_once_padded_to_whole_panels():
    weight = torch.arange(100 * 7, dtype=torch.float32).reshape(100, 7)
    stored = to_panels(weight)
    assert stored.shape == (4, 7, 32) and stored.is_contiguous()
    assert torch.equal(stored[1, :, 5], weight[32 + 5])  # panel 1, column 5 is output 37
    assert torch.equal(stored[3, :, 3], weight[99]) and not stored[3, :, 4:].any()  # the last panel: 4 real columns


@needs_kernel
@pytest.mark.parametrize("out_features, in_features, bias", [(100, 37, True), (576, 576, False), (1, 3, False), (192, 1536, True)])
def test_the_product_is_nn_linears_for_every_row_count(out_features, in_features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    paneled = PanelLinear(linear)
    for rows in (0, 1, 2, 7, 13, 14, 15, 29, 256, 257, 600):  # 14 rows at a time, 256 per pass over the weights
        x = torch.randn(1, rows, in_features)
        got = paneled(x)
        assert got.shape == (1, rows, out_features)
        torch.testing.assert_close(got, linear(x), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """What a session's step gives packed with other rows is what it gives alone, bit for bit."""
    torch.manual_seed(1)
    paneled = PanelLinear(nn.Linear(576, 1536))
    rows = torch.randn(300, 576)  # more than one pass of 256
    together = paneled(rows)
    for i in (0, 5, 8, 255, 256, 299):
        assert torch.equal(together[i], paneled(rows[i : i + 1])[0]), i
    assert torch.equal(paneled(rows[3:11]), together[3:11])  # a non-contiguous block of the same rows


@needs_bf16_kernel
@pytest.mark.parametrize("out_features, in_features, bias", [(100, 38, True), (576, 576, False), (1, 2, False), (192, 1536, True)])
def test_the_bf16_product_is_nn_linears_within_bf16s_rounding_and_a_row_alone_is_the_same(out_features, in_features, bias):
    """bf16 panels (VDPBF16PS, fp32 sums rounded to bf16 once): nn.Linear's bf16 product to bf16's precision for every
    row count, and a row's result the same bits whatever rows share the call."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    paneled = PanelLinear(linear)
    assert paneled.panels.dtype == torch.bfloat16
    for rows in (1, 2, 7, 14, 15, 29, 257):
        x = torch.randn(1, rows, in_features).to(torch.bfloat16)
        got = paneled(x)
        assert got.shape == (1, rows, out_features) and got.dtype == torch.bfloat16
        exact = x.float() @ linear.weight.float().T + (linear.bias.float() if bias else 0)
        torch.testing.assert_close(got.float(), exact, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(linear(x).float(), exact, rtol=2e-2, atol=2e-2)  # torch's own bf16 product: the same bound
        for i in (0, rows - 1):
            assert torch.equal(got[0, i], paneled(x[:, i : i + 1])[0, 0]), (rows, i)


@needs_kernel
def test_a_product_gives_the_same_bits_on_any_number_of_threads():
    """The panels are shared out among torch's threads, each panel computed whole by one: a side's results do not
    depend on how many threads it runs."""
    assert panels.shares_threads()  # built with OpenMP here: otherwise this test could not fail
    torch.manual_seed(2)
    dtypes = [torch.float32] + ([torch.bfloat16] if panels.BF16_FLAG in panels.cpu_flags() else [])
    threads = torch.get_num_threads()
    try:
        for dtype in dtypes:
            paneled = PanelLinear(nn.Linear(576, 1000).to(dtype))  # 21 panels, the last partly filled: uneven shares
            for rows in (1, 3, 9, 300):
                x = torch.randn(rows, 576).to(dtype)
                torch.set_num_threads(1)
                alone = paneled(x)
                for count in (2, 3, 5):
                    torch.set_num_threads(count)
                    assert torch.equal(paneled(x), alone), (dtype, rows, count)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_use_panels_replaces_only_the_decoder_layers_linears(tiny_untied, monkeypatch):
    from src.checkpoint import load_config
    from src.pipeline import build_cloud
    from src.schedule import SplitSchedule

    folder, _ = tiny_untied
    config = load_config(folder)
    part = build_cloud(folder, config, SplitSchedule((1,), (3,), config.num_hidden_layers), column_major=True).part
    x = torch.randn(1, 3, config.hidden_size)
    before = part.model.layers[1].mlp(x)
    held = [weakref.ref(m.weight) for name, m in part.named_modules() if isinstance(m, nn.Linear) and ".layers." in name]
    alive = []  # at each rewrite, how many of the old weights are still held
    real = panels.to_panels
    monkeypatch.setattr(panels, "to_panels", lambda w: alive.append(sum(r() is not None for r in held)) or real(w))
    assert use_panels(part) is None
    assert alive == list(range(len(held), 0, -1))  # each old weight is dropped as soon as its panels replace it
    mlp = part.model.layers[1].mlp
    assert all(isinstance(getattr(mlp, name), PanelLinear) for name in ("gate_proj", "up_proj", "down_proj"))
    assert not any(isinstance(m, nn.Linear) for name, m in part.named_modules() if ".layers." in name)
    torch.testing.assert_close(mlp(x), before, rtol=1e-5, atol=1e-6)


def forget_kernel(monkeypatch, cache, compiler: str | None = None) -> None:
    """This process as a new one: no kernel loaded or refused yet, this cache and $CC (None: the default cc)."""
    monkeypatch.setattr(panels, "_kernel", None)
    monkeypatch.setattr(panels, "_kernel_problem", None)
    monkeypatch.setenv("TRIADIC_CACHE", str(cache))
    if compiler is None:
        monkeypatch.delenv("CC", raising=False)
    else:
        monkeypatch.setenv("CC", compiler)


def test_where_the_kernel_cannot_run_the_layout_stays_and_says_why(tiny_untied, tmp_path, monkeypatch):
    from src.checkpoint import load_config
    from src.pipeline import SideOptions, build_cloud
    from src.schedule import SplitSchedule

    folder, _ = tiny_untied
    config = load_config(folder)
    part = build_cloud(folder, config, SplitSchedule((1,), (3,), config.num_hidden_layers)).part
    fp16 = build_cloud(folder, config, SplitSchedule((1,), (3,), config.num_hidden_layers), side=SideOptions(dtype=torch.float16)).part
    assert use_panels(fp16) == "the panel kernel computes in float32 or bfloat16 on the CPU"
    bf16 = build_cloud(folder, config, SplitSchedule((1,), (3,), config.num_hidden_layers), side=SideOptions(dtype=torch.bfloat16)).part
    monkeypatch.setattr(panels, "cpu_flags", lambda: frozenset({"avx512f"}))
    assert use_panels(bf16) == "the CPU has no avx512_bf16 for bfloat16 panels"
    forget_kernel(monkeypatch, tmp_path, "no-such-compiler")  # nothing built there yet: use_panels builds it
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    reason = use_panels(part)
    assert reason == "the panel kernel could not be built: no C compiler: 'no-such-compiler' is not on PATH"
    assert isinstance(part.model.layers[1].mlp.up_proj, nn.Linear)
    forget_kernel(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert use_panels(part) == "the CPU's vector capability is AVX2, not AVX-512"


def test_a_library_whose_product_is_wrong_is_refused_and_bf16_is_never_run_on_a_cpu_without_it(monkeypatch):
    class Miscompiled:
        @staticmethod
        def panel_gemm(x, rows, k_len, stored, n, y, bias, threads):
            torch.ones(1)  # writes nothing: y keeps whatever it held

    with pytest.raises(RuntimeError, match="differs from torch's"):
        panels._check(Miscompiled())
    assert why_no_kernel() is None or pytest.skip(why_no_kernel())
    real = panels._kernel
    calls = []

    class WrongOnThreads:  # right on one thread, wrong on more; bf16 only records that it ran
        @staticmethod
        def panel_gemm(x, rows, k_len, stored, n, y, bias, threads):
            real.panel_gemm(x, rows, k_len, stored, n, y, bias, 1)
            if threads > 1:
                torch.frombuffer((ctypes.c_float * 1).from_address(y), dtype=torch.float32)[0] += 1.0

        @staticmethod
        def panel_gemm_bf16(*args):
            calls.append(args)

    monkeypatch.setattr(panels, "cpu_flags", lambda: frozenset({"avx512f"}))  # a CPU without AVX512_BF16
    panels._check(WrongOnThreads())  # one torch thread (conftest): only the one-thread products are checked
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with pytest.raises(RuntimeError, match="on 2 threads differs from one thread's"):
        panels._check(WrongOnThreads())
    assert calls == []


@needs_kernel
def test_a_layer_the_kernel_cannot_take_is_refused_by_name():
    for linear, reason in ((nn.Linear(8, 4).half(), "computes in float32 or bfloat16 on the CPU"),
                           (nn.Linear(8, 4).double(), "computes in float32 or bfloat16 on the CPU")):
        with pytest.raises(ValueError, match=reason):
            PanelLinear(linear)
    odd = nn.Linear(7, 4).to(torch.bfloat16)
    expected = "takes its inputs in pairs" if panels.BF16_FLAG in panels.cpu_flags() else "no avx512_bf16"
    with pytest.raises(ValueError, match=expected):
        PanelLinear(odd)


def fresh_kernel(monkeypatch, cache, compiler: str | None = None) -> str | None:
    """why_no_kernel() as a new process would answer it, with this cache and $CC."""
    forget_kernel(monkeypatch, cache, compiler)
    return why_no_kernel()


@needs_kernel
def test_a_damaged_or_foreign_library_in_the_cache_is_built_again_and_a_wrong_one_never_enters(tmp_path, monkeypatch):
    """dlopen of a truncated library dies of SIGBUS, so a cached library is loaded only where its recorded sha256
    matches; a compiler's output that lacks the kernel or computes wrongly gives a reason and is not cached."""
    assert fresh_kernel(monkeypatch, tmp_path, "cc -O2") is None  # $CC may carry arguments
    (library,) = (tmp_path / "kernels").glob("panel_gemm-*.so")
    size = library.stat().st_size
    # Truncated in place, as a careless user might: loading it killed a process with SIGBUS, and so did, at
    # exit, a process that had loaded the file itself (this one has a private copy: pytest must exit 0).
    library.write_bytes(library.read_bytes()[:14000])
    assert fresh_kernel(monkeypatch, tmp_path) is None and library.stat().st_size == size
    library.write_bytes(b"")
    assert fresh_kernel(monkeypatch, tmp_path) is None and library.stat().st_size == size

    empty = tmp_path / "empty.c"
    empty.write_text("int nothing_here;\n")
    no_symbol = tmp_path / "nosym.sh"  # "compiles" a library without the kernel
    no_symbol.write_text(f'#!/bin/sh\nout=""; while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
                         f'exec cc -shared -fPIC -o "$out" {empty}\n')
    no_symbol.chmod(0o755)
    other = tmp_path / "other"
    reason = fresh_kernel(monkeypatch, other, str(no_symbol))
    assert reason is not None and "panel_gemm" in reason  # undefined symbol: a reason, not an AttributeError
    assert not list((other / "kernels").glob("panel_gemm-*"))
    failing = tmp_path / "failing.sh"
    failing.write_text("#!/bin/sh\necho 'fake compiler: internal error XYZ' >&2\nexit 3\n")
    failing.chmod(0o755)
    assert fresh_kernel(monkeypatch, other, str(failing)).endswith("exited with 3: fake compiler: internal error XYZ")


@needs_kernel
def test_the_product_is_float32_whatever_the_default_dtype():
    """A part's build changes the process's default dtype for a moment; the kernel's output must not follow it."""
    torch.manual_seed(2)
    linear = nn.Linear(64, 100)
    paneled = PanelLinear(linear)
    x = torch.randn(5, 64)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = paneled(x)
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, linear(x), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_compiler_without_openmp_builds_the_kernel_for_one_thread_and_says_so(tmp_path, monkeypatch, caplog):
    without = tmp_path / "cc-without-openmp.sh"
    without.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "unsupported option -fopenmp" >&2; exit 1; }; done\nexec cc "$@"\n')
    without.chmod(0o755)
    with caplog.at_level("WARNING", logger="src.panels"):
        assert fresh_kernel(monkeypatch, tmp_path, str(without)) is None
    assert not panels.shares_threads()
    assert "does not build with -fopenmp (unsupported option -fopenmp)" in caplog.text and "run on one thread" in caplog.text
    linear, x = nn.Linear(64, 100), torch.randn(3, 64)
    torch.testing.assert_close(PanelLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


def test_a_compiler_that_hangs_is_killed_with_what_it_started(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(native, "COMPILE_SECONDS", 1.0)
    marker = tmp_path / "child.pid"
    hanging = tmp_path / "hang.sh"
    hanging.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {marker}\nwait\n")
    hanging.chmod(0o755)
    began = time.monotonic()
    assert fresh_kernel(monkeypatch, tmp_path, str(hanging)).endswith("ran past 1 s")
    assert time.monotonic() - began < 10
    child = int(marker.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


@needs_kernel
def test_a_lossy_pipeline_computes_its_layers_on_panels_on_any_number_of_threads_and_a_lossless_one_never(tiny_untied):
    """Moving cuts run chunks of 2-3 positions, which MKL's product serves at up to 1.4x a row's cost and the
    panels at about one row's (src/pipeline.py: use_panels_where_they_run). Lossless sides keep transformers'
    layout: they must compute what HF computes, bit for bit."""
    from src.pipeline import SideOptions, build_pipeline

    folder, _ = tiny_untied
    threads = torch.get_num_threads()
    try:
        dtypes = [torch.float32] + ([torch.bfloat16] if panels.BF16_FLAG in panels.cpu_flags() else [])
        for count, dtype in ((1, torch.float32), (2, torch.float32), (1, dtypes[-1])):
            torch.set_num_threads(count)
            side = SideOptions(dtype=dtype)
            for codec, paneled in (("int8", True), ("none", False)):
                pipeline = build_pipeline(str(folder), {1, 2}, {2, 3}, codec, with_tokenizer=False, edge_side=side, cloud_side=side)
                parts = pipeline.edge.parts + pipeline.cloud.parts
                layers = [m for part in parts for name, m in part.named_modules()
                          if ".layers." in name and isinstance(m, (nn.Linear, PanelLinear))]
                assert layers and all(isinstance(m, PanelLinear) is paneled for m in layers), (codec, count, dtype)
                assert len(pipeline.edge.generate([1, 5, 9, 33], 6).token_ids) == 6
    finally:
        torch.set_num_threads(threads)
