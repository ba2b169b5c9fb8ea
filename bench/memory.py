"""Each side loads only its weights: peak resident memory of one side built alone, in a fresh process.

    python -m bench.memory [--base-model gemma3-270m] [--first 1-4 --second 14-17]
        -> results/memory_<model>.md

RSS after importing torch and transformers is the baseline; the figure is the peak above it,
against the parameter bytes the side holds (every weight page touched, so nothing is left lazy).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import machine, parse_sets

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
ROLES = ("edge", "cloud", "full model")

PROBE = """
import json, sys, torch, transformers
from src.pipeline import build_cloud, build_edge
from src.checkpoint import load_config, resolve_model_dir
from src.schedule import SplitSchedule
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
base = rss()
role, base_model, first, second = json.loads(sys.argv[1])
model_dir = resolve_model_dir(base_model); config = load_config(model_dir)
schedule = SplitSchedule(tuple(first), tuple(second), config.num_hidden_layers)
# As build_pipeline builds a lossy run's sides, and a batching server its part: the layers' fp32 weights column-major.
if role == "edge":
    parts = build_edge(model_dir, config, schedule, "int8", link=object(), column_major=True).parts  # the link is never called
elif role == "cloud":
    parts = build_cloud(model_dir, config, schedule, column_major=True).parts
else:
    parts = [transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)]
seen = set(); nbytes = 0; embedding = 0
for part in parts:
    for name, t in part.named_parameters():
        if id(t) not in seen:
            seen.add(id(t)); nbytes += t.numel() * t.element_size(); float(t.float().sum())  # touch every page
            embedding += t.numel() * t.element_size() if "embed_tokens" in name else 0
# VmHWM, not ru_maxrss: the latter survives exec, so a probe started by a large process would report that process's size.
peak = next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM:'))
print(json.dumps(dict(role=role, base=base, peak=peak, param_bytes=nbytes, embedding_bytes=embedding)))
"""


def memory_probe(role: str, base_model: str | None = None, first=range(1, 7), second=range(24, 30)) -> dict:
    """Build one side (or the full HF model) alone in a fresh process; its RSS baseline, peak and parameter bytes."""
    arguments = json.dumps([role, base_model, sorted(first), sorted(second)])
    out = subprocess.run([sys.executable, "-c", PROBE, arguments], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(base_model: str | None, first, second) -> list[str]:
    lines = [
        "| side | RSS after imports (MB) | peak RSS (MB) | grown (MB) | parameters held (MB) | of which embedding (MB) | grown / parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for role in ROLES:
        m = memory_probe(role, base_model, first, second)
        grown = m["peak"] - m["base"]
        lines.append(
            f"| {role} | {m['base'] / 1e6:.0f} | {m['peak'] / 1e6:.0f} | {grown / 1e6:.0f} | {m['param_bytes'] / 1e6:.0f} | "
            f"{m['embedding_bytes'] / 1e6:.0f} | {grown / m['param_bytes']:.2f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="gemma3-270m")
    parser.add_argument("--first", default="1-4")
    parser.add_argument("--second", default="14-17")
    args = parser.parse_args()
    first, second = parse_sets(parser, args)
    lines = [
        f"# Memory per side: {args.base_model}, first {sorted(first)}, second {sorted(second)}, fp32\n",
        f"Machine: {machine()}. Each row is a fresh process (`python -m bench.memory --base-model {args.base_model} "
        f"--first {args.first} --second {args.second}`).\n",
        *table(args.base_model, first, second),
    ]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"memory_{Path(args.base_model).stem}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
