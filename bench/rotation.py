"""The int8 codecs' structured rotation against a dense random orthogonal one: what each costs, how each codes.

    python -m bench.rotation [--models smollm2-135m gemma3-270m] -> results/rotation.md

On each embedded model's own hidden states (6 random-token texts of 48, every third layer), the rest of
each position after its 6 outliers is rotated both ways, rounded on the `int8` codec's step (RMS / 60)
and Rice coded: the rounding error (its energy over the rest's) and the bits per value. Then the time of
one position's selection and rotation, warm and cold (`bench.codec_time.warm_and_cold`): the dense matrix
product as the codec made it before, torch's structured path and src/link/rotate.c's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.codec_time import warm_and_cold
from bench.common import machine
from src.checkpoint import EMBEDDED_MODELS, resolve_model_dir
from src.link import rice, rotation

OUT = Path(__file__).resolve().parent.parent / "results" / "rotation.md"
OUTLIERS, STEPS_PER_RMS, RICE_K = 6, 60.0, 6


def coded(rest: torch.Tensor, rotated: torch.Tensor) -> tuple[float, float]:
    """(rounding error energy / the rest's energy, Rice bits per value) of `rotated` on the int8 codec's step."""
    values = rotated.numpy().astype(np.float32)
    step = (np.sqrt(np.square(values, dtype=np.float64).mean(-1, keepdims=True)) / STEPS_PER_RMS).astype(np.float32)
    q = np.rint(values / step)
    error = float(((q * step - values) ** 2).sum() / (rest.numpy() ** 2).sum())
    return error, 8 * len(rice.rice_encode(q, RICE_K)) / q.size


def model_rows(name: str) -> list[str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(name), dtype=torch.float32)
    texts = torch.randint(200, 20000, (6, 48), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        states = model(texts, output_hidden_states=True).hidden_states
    hidden = states[0].shape[-1]
    dense = rotation.random_orthogonal(hidden, 9).float()
    rows = []
    for layer in range(1, len(states) - 1, 3):
        x = states[layer].reshape(-1, hidden)
        top = rotation.outliers_and_rest(x, OUTLIERS)[0]
        rest = x.scatter(-1, top, 0.0)
        (e_dense, b_dense), (e_structured, b_structured) = coded(rest, rest @ dense), coded(rest, rotation.rotate(rest))
        rows.append(f"| {name} | {hidden} = {' x '.join(map(str, rotation.blocks(hidden)))} | {layer} | {e_dense:.3e} | "
                    f"{e_structured:.3e} | {b_dense:.3f} | {b_structured:.3f} |")
        print(rows[-1], flush=True)
    return rows


def time_rows(hidden: int) -> list[str]:
    """At up to 1024 channels the dense product as the codec made it before too (above, it used a Kronecker product)."""
    x = torch.randn(1, hidden) * 3
    paths = [("structured (torch)", lambda: rotation.outliers_and_rest(x, OUTLIERS))]
    if hidden <= 1024:
        dense = rotation.random_orthogonal(hidden, 9).float()

        def dense_path() -> None:  # topk, gather, scatter and one matrix product
            top = x.abs().topk(OUTLIERS, dim=-1).indices
            x.gather(-1, top), x.scatter(-1, top, 0.0).reshape(1, 1, hidden) @ dense

        paths.insert(0, ("dense matrix (torch, before)", dense_path))
    if rotation.library() is not None:
        paths.append(("structured (rotate.c)", lambda: rotation.host_outliers_and_rest(x, OUTLIERS)))
    rows = []
    for label, work in paths:
        warm, cold = warm_and_cold(work)
        rows.append(f"| {hidden} | {label} | {1e6 * warm:.0f} | {1e6 * cold:.0f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(EMBEDDED_MODELS), choices=list(EMBEDDED_MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [f"The int8 codecs' rotation, structured against dense (`python -m bench.rotation`). Machine: {machine()}.", "",
             "Rounding on the int8 codec's step and Rice coding of each position's rest (after its 6 outliers), on the "
             "model's own states (6 texts of 48 random tokens):", "",
             "| model | hidden = m x a | layer | error, dense | error, structured | bits per value, dense | bits per value, structured |",
             "|---|---|---|---|---|---|---|"]
    for name in args.models:
        lines += model_rows(name)
    lines += ["", "One position's outlier selection and rotation, us, median of 60, warm and after 64 MB streamed (cold):", "",
              "| hidden | path | warm | cold |", "|---|---|---|---|"]
    for hidden in (576, 4096):
        lines += time_rows(hidden)
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
