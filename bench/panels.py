"""The decoder layers' matrix products by row count: transformers' layout, column-major, panels.

    python -m bench.panels -> results/panels.md

One torch thread, the embedded model's layer shapes (q, k, v, o, gate, up, down), random fp32 weights for
as many layers as the cloud runs between the default moving cuts (28), every layer's 7 products in turn
so that the weights come from memory as in a decode step, the median of 5 passes per row count, in us per
layer. Rows 1-3 are a session's own steps (catch-up chunks), 4-32 batches of several sessions, 64 and more
a burst of prefills. The last column says whether a row's panel product is the same bit for bit as the
first row's product computed alone (src/panels.py: each output sums its terms in order).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import machine
from src.checkpoint import load_config, resolve_model_dir
from src.panels import PanelLinear, why_no_kernel

OUT = Path(__file__).resolve().parent.parent / "results" / "panels.md"
ROWS = (1, 2, 3, 4, 8, 12, 16, 32, 64, 256, 1024)
LAYERS = 28


def per_layer_us(products, rows: dict[int, torch.Tensor], passes: int = 5) -> float:
    """Median over passes of one pass through every layer's products, per layer."""
    def one_pass() -> float:
        start = time.perf_counter()
        for product, in_features in products:
            product(rows[in_features])
        return time.perf_counter() - start
    one_pass()
    return 1e6 * statistics.median(one_pass() for _ in range(passes)) / LAYERS


def linear_of(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    return linear


def main() -> None:
    # No options: --help says what the run does and writes, before it starts; anything else is refused.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(1)
    problem = why_no_kernel()
    if problem is not None:
        print(f"bench.panels: {problem}", file=sys.stderr)
        raise SystemExit(2)
    config = load_config(resolve_model_dir(None))
    hidden, inner = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inner, hidden), (inner, hidden), (hidden, inner)]
    generator = torch.Generator().manual_seed(0)
    row_major = [torch.randn(out, into, generator=generator) / into**0.5 for _ in range(LAYERS) for out, into in shapes]
    column_major = [w.T.contiguous().T for w in row_major]
    panels = [PanelLinear(linear_of(w)) for w in row_major]
    lines = [
        f"Products of the decoder layers by row count, us per layer (`python -m bench.panels`). Machine: {machine()}.",
        f"Shapes of the embedded model's layers (hidden {hidden}, intermediate {inner}), {LAYERS} layers, fp32, one thread.",
        "",
        "| rows | transformers' layout (MKL) | column-major (MKL) | panels | panels vs column-major | a row as alone, bit for bit |",
        "|---|---|---|---|---|---|",
    ]
    for count in ROWS:
        rows = {n: torch.randn(count, n, generator=generator) for n in (hidden, inner)}
        plain = per_layer_us([(lambda x, w=w: F.linear(x, w), w.shape[1]) for w in row_major], rows)
        transposed = per_layer_us([(lambda x, w=w: F.linear(x, w), w.shape[1]) for w in column_major], rows)
        paneled = per_layer_us([(p, p.in_features) for p in panels], rows)
        same = all(torch.equal(p(rows[p.in_features])[:1], p(rows[p.in_features][:1])) for p in panels[:7])
        lines.append(f"| {count} | {plain:,.0f} | {transposed:,.0f} | {paneled:,.0f} | {paneled / transposed:.2f}x | {'yes' if same else 'no'} |")
        print(lines[-1], flush=True)
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
