"""Linear layers over panel-stored weights (src/panels.py): the product nn.Linear gives, a row independent of the others."""
import weakref

import pytest
import torch
from torch import nn

from src import panels
from src.panels import PanelLinear, to_panels, use_panels, why_no_kernel

needs_kernel = pytest.mark.skipif(why_no_kernel() is not None, reason=f"{why_no_kernel()}")


def test_panels_hold_the_weight_once_padded_to_whole_panels():
    weight = torch.arange(100 * 7, dtype=torch.float32).reshape(100, 7)
    stored = to_panels(weight)
    assert stored.shape == (3, 7, 48) and stored.is_contiguous()
    assert torch.equal(stored[1, :, 5], weight[48 + 5])  # panel 1, column 5 is output 53
    assert torch.equal(stored[2, :, 3], weight[99]) and not stored[2, :, 4:].any()  # the last panel: 4 real columns


@needs_kernel
@pytest.mark.parametrize("out_features, in_features, bias", [(100, 37, True), (576, 576, False), (1, 3, False), (192, 1536, True)])
def test_the_product_is_nn_linears_for_every_row_count(out_features, in_features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    paneled = PanelLinear(linear)
    for rows in (0, 1, 2, 7, 8, 9, 17, 256, 257, 600):  # 8 rows at a time, 256 per pass over the weights
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


def test_where_the_kernel_cannot_run_the_layout_stays_and_says_why(tiny_untied, tmp_path, monkeypatch):
    from src.checkpoint import load_config
    from src.pipeline import SideOptions, build_cloud
    from src.schedule import SplitSchedule

    folder, _ = tiny_untied
    config = load_config(folder)
    part = build_cloud(folder, config, SplitSchedule((1,), (3,), config.num_hidden_layers)).part
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert use_panels(part) == "torch runs 2 threads and the panel kernel one"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    bf16 = build_cloud(folder, config, SplitSchedule((1,), (3,), config.num_hidden_layers), side=SideOptions(dtype=torch.bfloat16)).part
    assert use_panels(bf16) == "the panel kernel computes in float32 on the CPU"
    monkeypatch.setattr(panels, "_kernel", None)
    monkeypatch.setattr(panels, "_kernel_problem", None)
    monkeypatch.setenv("TRIADIC_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    reason = use_panels(part)
    assert reason == "the panel kernel could not be built: no C compiler (cc, or $CC) on PATH"
    assert isinstance(part.model.layers[1].mlp.up_proj, nn.Linear)
    monkeypatch.setattr(panels, "_kernel_problem", None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert use_panels(part) == "the CPU's vector capability is AVX2, not AVX-512"


def test_a_library_whose_product_is_wrong_is_refused():
    class Miscompiled:
        @staticmethod
        def panel_gemm(x, rows, k_len, stored, n, y):
            torch.ones(1)  # writes nothing: y keeps whatever it held

    with pytest.raises(RuntimeError, match="differs from torch's"):
        panels._check(Miscompiled())
