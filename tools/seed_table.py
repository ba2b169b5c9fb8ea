"""Redo the original prototype's table of responses (its splits scaled from 32 layers to this model's).

    python -m tools.seed_table [--base-model gemma3-270m] [--max-new-tokens 128]
        ->  results/seed_table.md (the default model), results/seed_table_<model>.md (another)

A use of tools.compare (one prompt, codec none, the original rows as settings): every row is compared
with unsplit HF generate. The prototype gave garbage for {0},{32} and "I am" for {1},{31}; here every
row must match the baseline.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.checkpoint import DEFAULT_MODEL, default_prompt_format, load_config, resolve_model_dir
from tools.compare import CompareConfig, Setting, compare

# (number of parts, script, first, second) as in the original README, for a 32-layer LLaMA-7B.
ORIGINAL_ROWS = [
    (1, "main_1_split.py", 32, 32), (1, "main_1_split.py", 0, 0), (3, "main_3_split.py", 0, 32),
    (2, "main_2_split.py", 8, 8), (2, "main_2_split.py", 16, 16), (2, "main_2_split.py", 24, 24),
    (3, "main_3_split.py", 1, 31), (3, "main_3_split.py", 4, 28), (3, "main_3_split.py", 8, 24),
    (3, "main_3_split.py", 12, 20), (3, "main_3_split.py", 16, 20), (3, "main_3_split.py", 24, 28),
]
RESULTS = Path(__file__).resolve().parent.parent / "results"


def scale(index: int, num_layers: int) -> int:
    return round(index * num_layers / 32)


def settings(num_layers: int) -> list[Setting]:
    """The original rows as compare settings; the two-part rows run the cloud to the end (the original's "second" was unused there)."""
    rows = []
    for parts, _, first, second in ORIGINAL_ROWS:
        a, b = scale(first, num_layers), scale(second, num_layers)
        if parts == 2:
            rows.append(Setting(f"two:{a}", (a,), (num_layers,), two_part=True))
        else:
            rows.append(Setting(f"{a}/{b}", (a,), (b,)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt", default="Tell me about Japan.")
    parser.add_argument("--base-model", default=None, help="an embedded model's name, a .gguf file or a model folder")
    parser.add_argument("--out", type=Path, default=None, help="default: results/seed_table.md, or seed_table_<model>.md for another model")
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.base_model)
    L = load_config(model_dir).num_hidden_layers
    other = args.base_model not in (None, DEFAULT_MODEL)
    out = args.out or RESULTS / (f"seed_table_{Path(args.base_model).stem}.md" if other else "seed_table.md")
    prompt_format = default_prompt_format(model_dir) or "auto"
    rows = settings(L)
    config = CompareConfig(str(model_dir), (args.prompt,), tuple(rows), ("none",), max_new_tokens=args.max_new_tokens, prompt_format=prompt_format)
    runs = {run.setting: run for run in compare(config)}

    lines = []
    for (parts, script, first, second), setting in zip(ORIGINAL_ROWS, rows):
        run = runs[setting.label]
        text = run.text.replace("\n", " ").replace("|", "\\|")
        match = "yes" if run.same else "**no**"
        lines.append(f"| {parts} | {script} | {{{first}}} | {{{second}}} | {{{setting.first[0]}}} | {{{setting.second[0]}}} | {match} | {text} |")
        print(lines[-1], flush=True)
    regenerate_args = f' ARGS="--base-model {args.base_model}"' if other else ""
    header = (
        f"Responses to `{args.prompt}` ({prompt_format} prompt, greedy, {args.max_new_tokens} new tokens max, `--codec none`) on "
        f"{model_dir.name} ({L} layers), each compared with unsplit HF `generate` by `tools.compare`. The original table's "
        f"splits for a 32-layer model are scaled by {L}/32 and rounded; in the two-part rows the cloud runs to the last "
        f"layer. Regenerate with `make seed-table{regenerate_args}`.\n\n"
        "| Parts | File | First (orig.) | Second (orig.) | First | Second | Same tokens as unsplit | Response |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    out.parent.mkdir(exist_ok=True)
    out.write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
