"""The codec table for the README: every codec at the acceptance splits, on the shipped text.

    python -m bench.fidelity_table [--text-file ...] [--codecs fp16,bf16,int8-fixed,int8,bnb8]
      -> results/fidelity.jsonl, results/fidelity.md, results/fidelity.png
    python -m bench.fidelity_table --base-model gemma3-270m --codecs int8 --out fidelity_gemma

The splits are SmolLM2's (30 layers) scaled to the model's layers: (1,29) is (1,17) on Gemma 3 270M.

Rows of codecs not measured in this run are kept from the existing results/<out>.jsonl (same
text), so one codec can be re-measured without re-running the others (about 9 minutes per codec).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.common import machine
from bench.fidelity import load_text_ids, measure
from src.checkpoint import load_config, resolve_model_dir

RESULTS = Path(__file__).resolve().parent.parent / "results"
CODECS = ["fp16", "bf16", "int8-fixed", "int8", "bnb8"]
SPLITS_30 = [("1", "29"), ("4", "26"), ("8", "22"), ("15", "16"), ("1,2,3,4,5,6", "24,25,26,27,28,29")]


def scaled_splits(num_layers: int) -> list[tuple[str, str]]:
    """The acceptance splits, given for 30 layers, scaled to `num_layers` and rounded."""
    def scale(values: str) -> str:
        return ",".join(str(v) for v in sorted({round(int(x) * num_layers / 30) for x in values.split(",")}))

    return [(scale(first), scale(second)) for first, second in SPLITS_30]


def label(first: str, second: str) -> str:
    if "," not in first:
        return f"({first},{second})"
    a, b = first.split(","), second.split(",")
    return f"{{{a[0]}..{a[-1]}}},{{{b[0]}..{b[-1]}}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-file", default=str(Path(__file__).parent / "data" / "fidelity_river_town.txt"))
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--out", default="fidelity")
    parser.add_argument("--base-model", default=None, help="an embedded model's name, a .gguf file or a model folder")
    args = parser.parse_args()
    torch.set_num_threads(1)  # no timings here; one thread never thrashes on a shared machine
    model_dir = resolve_model_dir(args.base_model)
    token_ids = load_text_ids(model_dir, args.text_file)
    config = load_config(model_dir)
    context = min(config.max_position_embeddings, 8192)
    splits = scaled_splits(config.num_hidden_layers)
    codecs = args.codecs.split(",")
    text = Path(args.text_file).name
    rows = [r for r in read_rows(RESULTS / f"{args.out}.jsonl") if r["codec"] not in codecs and r["text"] == text]
    with open(RESULTS / f"{args.out}.jsonl", "w") as jsonl:
        for report in rows:
            jsonl.write(json.dumps(report) + "\n")
        jsonl.flush()  # an interrupted run keeps the rows it did not measure
        for first, second in splits:
            results = measure(model_dir, token_ids, {int(x) for x in first.split(",")}, {int(x) for x in second.split(",")}, codecs, 0, context)
            for codec, report in results.items():
                report.update(codec=codec, split=label(first, second), text=text)
                jsonl.write(json.dumps(report) + "\n")
                jsonl.flush()
                rows.append(report)
                print(json.dumps(report), flush=True)
    order = {split: i for i, split in enumerate(label(f, s) for f, s in splits)}
    rows.sort(key=lambda r: (order.get(r["split"], len(order)), CODECS.index(r["codec"]) if r["codec"] in CODECS else len(CODECS)))
    write_table(rows, args.out, text, len(token_ids), model_dir.name)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_table(rows: list[dict], out: str, text: str, tokens: int, model: str) -> None:
    lines = [
        f"{model}, teacher-forced over `{text}` ({tokens} tokens), split pipeline with each codec against lossless transport "
        f"(`python -m bench.fidelity_table`). Machine: {machine()}.",
        "",
        "| split | codec | top-1 agreement | mean KL (nats) | ppl / ppl lossless - 1 | bytes per position per hop |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['split']} | {r['codec']} | {100 * r['top1_agreement']:.2f}% | {r['kl']:.2e} | "
            f"{100 * (r['ppl'] / r['ppl_lossless'] - 1):+.3f}% | {r['bytes_per_position']:.1f} |"
        )
    pooled = [r for r in rows if r["codec"] == "int8"]
    if pooled:  # every split's tokens together
        agree = sum(r["top1_agreement"] * r["tokens"] for r in pooled) / sum(r["tokens"] for r in pooled)
        lines += ["", f"int8 pooled over the {len(pooled)} settings: top-1 agreement {100 * agree:.2f}%, "
                      f"worst mean KL {max(r['kl'] for r in pooled):.2e}, largest bytes per position per hop "
                      f"{max(r['bytes_per_position'] for r in pooled):.1f}."]
    (RESULTS / f"{out}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(r["split"] for r in rows))
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(codecs)
    for i, codec in enumerate(codecs):
        values = [next(r for r in rows if r["split"] == s and r["codec"] == codec) for s in splits]
        xs = [j + i * width for j in range(len(splits))]
        left.bar(xs, [100 * v["top1_agreement"] for v in values], width, label=codec)
        right.bar(xs, [v["bytes_per_position"] for v in values], width, label=codec)
    for axis, title in ((left, "top-1 agreement with lossless (%)"), (right, "bytes per position per hop")):
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(splits))], splits, rotation=20, fontsize=8)
        axis.set_title(title)
    left.set_ylim(98.5, 100.05)
    left.axhline(99.5, color="gray", linestyle="--", linewidth=0.8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out}.png", dpi=110)


if __name__ == "__main__":
    main()
