"""Redo the original prototype's table of responses (its splits scaled from 32 layers to this model's).

    python -m tools.seed_table [--base-model gemma3-270m] [--max-new-tokens 128]
        ->  results/seed_table.md (the default model), results/seed_table_<model>.md (another)

The prototype gave garbage for {0},{32} and "I am" for {1},{31}; here every row must match the baseline.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.checkpoint import DEFAULT_MODEL, default_prompt_format, load_config, load_tokenizer, resolve_model_dir
from src.pipeline import build_pipeline
from src.utils import format_prompt

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt", default="Tell me about Japan.")
    parser.add_argument("--base-model", default=None, help="an embedded model's name, a .gguf file or a model folder")
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.base_model)
    L = load_config(model_dir).num_hidden_layers
    tokenizer = load_tokenizer(model_dir)
    prompt_format = default_prompt_format(model_dir) or "auto"
    prompt_ids = format_prompt(tokenizer, args.prompt, prompt_format)
    eos = [tokenizer.eos_token_id]
    name = args.base_model if args.base_model not in (None, DEFAULT_MODEL) else None
    out = RESULTS / (f"seed_table_{Path(name).stem}.md" if name else "seed_table.md")

    rows, reference = [], None
    for parts, script, first, second in ORIGINAL_ROWS:
        a, b = scale(first, L), scale(second, L)
        two_part = parts == 2
        if two_part:
            b = L  # the two-part split runs the cloud to the end; the original's "second" was unused there
        pipeline = build_pipeline(str(model_dir), {a}, {b}, "none", two_part=two_part, with_tokenizer=False)
        tokens = pipeline.edge.generate(prompt_ids, args.max_new_tokens, eos).token_ids
        reference = reference if reference is not None else tokens  # the first row is the unsplit baseline
        text = tokenizer.decode(tokens, skip_special_tokens=True).replace("\n", " ").replace("|", "\\|")
        match = "yes" if tokens == reference else "**no**"
        rows.append(f"| {parts} | {script} | {{{first}}} | {{{second}}} | {{{a}}} | {{{b}}} | {match} | {text} |")
        print(rows[-1], flush=True)

    regenerate_args = f' ARGS="--base-model {args.base_model}"' if name else ""
    header = (
        f"Responses to `{args.prompt}` ({prompt_format} prompt, greedy, {args.max_new_tokens} new tokens max, `--codec none`) on "
        f"{model_dir.name} ({L} layers). The original table's splits for a 32-layer model are scaled by {L}/32 and rounded; "
        f"in the two-part rows the cloud runs to the last layer. Regenerate with `make seed-table{regenerate_args}`.\n\n"
        "| Parts | File | First (orig.) | Second (orig.) | First | Second | Same tokens as unsplit | Response |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    out.parent.mkdir(exist_ok=True)
    out.write_text(header + "\n".join(rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
