"""Speed, memory and bytes on the link: split against unsplit, in one run so that ratios are fair.

    python -m bench.speed [--new-tokens 128] [--repeats 3] [--long 1024]
      -> results/bench.md, results/step_time.png

All in-process figures come from one process on the same machine: a warm-up, then the median of
`--repeats` runs. Generation ignores EOS so that every run produces the same number of tokens.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.common import machine
from bench.memory import memory_probe
from src.checkpoint import load_tokenizer, resolve_model_dir
from src.link.codec import get_codec
from src.pipeline import build_pipeline
from src.link.protocol import HEADER_SIZE
from src.utils import format_prompt

RESULTS = Path(__file__).resolve().parent.parent / "results"
DEFAULT_FIRST, DEFAULT_SECOND = set(range(1, 7)), set(range(24, 30))
L = 30


def hf_tokens_per_second(model, prompt_ids, new_tokens, use_cache=True) -> float:
    ids = torch.tensor([prompt_ids])
    began = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, use_cache=use_cache, pad_token_id=2)
    return new_tokens / (time.perf_counter() - began)


def pipeline_run(pipeline, prompt_ids, new_tokens):
    began = time.perf_counter()
    result = pipeline.edge.generate(prompt_ids, new_tokens)
    result.wall = time.perf_counter() - began
    return result


def median_rate(run, repeats: int) -> float:
    run()  # warm-up
    return statistics.median(run() for _ in range(repeats))


def configurations(model_dir):
    """(label, first, second, codec, two_part) of every in-process configuration measured."""
    return [
        ("main_1_split loop (unsplit)", {L}, {L}, "none", False),
        ("two-part split (15), int8", {15}, {L}, "int8", True),
        ("three-part fixed (1, 29), lossless", {1}, {29}, "none", False),
        ("three-part fixed (1, 29), int8", {1}, {29}, "int8", False),
        ("three-part fixed (6, 24), int8", {6}, {24}, "int8", False),
        ("three-part random {1..6},{24..29}, lossless", DEFAULT_FIRST, DEFAULT_SECOND, "none", False),
        ("three-part random {1..6},{24..29}, int8", DEFAULT_FIRST, DEFAULT_SECOND, "int8", False),
    ]


def interleaved_rows(model_dir, prompt_ids, new_tokens: int, repeats: int, dtype: torch.dtype) -> list[str]:
    """HF generate and the split in one dtype, interleaved round by round (round 0 warms up).

    The ratio columns are medians of per-round ratios, so that load drifting between rounds (other
    processes on the machine) cancels, in wall time and in this process's CPU time (which does not
    count time given to other processes); lossless rows also check the tokens against HF's.
    """
    from transformers import AutoModelForCausalLM

    from src.pipeline import SideOptions

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.tensor([prompt_ids])

    def hf() -> list[int]:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=2)
        return out[0, len(prompt_ids):].tolist()

    side = SideOptions(dtype=dtype)
    runners = {"HF generate, unsplit": hf}
    for label, first, second, codec in [
        ("main_1_split loop (unsplit)", {L}, {L}, "none"),
        ("three-part fixed (1, 29), lossless", {1}, {29}, "none"),
        ("three-part fixed (1, 29), int8", {1}, {29}, "int8"),
        ("three-part random {1..6},{24..29}, lossless", DEFAULT_FIRST, DEFAULT_SECOND, "none"),
        ("three-part random {1..6},{24..29}, int8", DEFAULT_FIRST, DEFAULT_SECOND, "int8"),
    ]:
        pipeline = build_pipeline(str(model_dir), first, second, codec, edge_side=side, cloud_side=side, with_tokenizer=False)
        runners[label] = (lambda p: lambda: p.edge.generate(prompt_ids, new_tokens).token_ids)(pipeline)
    rates: dict[str, list[float]] = {label: [] for label in runners}
    cpu_rates: dict[str, list[float]] = {label: [] for label in runners}  # tokens per CPU second of this process
    tokens: dict[str, list[int]] = {}
    for round_ in range(repeats + 1):
        for label, run in runners.items():
            began, began_cpu = time.perf_counter(), time.process_time()
            tokens[label] = run()
            if round_ > 0:
                rates[label].append(len(tokens[label]) / (time.perf_counter() - began))
                cpu_rates[label].append(len(tokens[label]) / (time.process_time() - began_cpu))
    name = str(dtype).removeprefix("torch.")
    hf_label = "HF generate, unsplit"
    lines = [f"### {name}\n", f"| configuration | tokens/s | vs HF generate in {name}, wall | vs HF, CPU time | lossless tokens equal HF's |",
             "|---|---|---|---|---|"]
    for label, values in rates.items():
        ratio = statistics.median(v / h for v, h in zip(values, rates[hf_label]))
        cpu_ratio = statistics.median(v / h for v, h in zip(cpu_rates[label], cpu_rates[hf_label]))
        same = "yes" if tokens[label] == tokens[hf_label] else "no"
        same = same if ("lossless" in label or "unsplit" in label) and label != hf_label else "-"
        lines.append(f"| {label} | {statistics.median(values):.1f} | {ratio:.2f}x | {cpu_ratio:.2f}x | {same} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long", type=int, default=1024, help="tokens of the step-time-against-position runs")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: two threads thrash on a busy 2-core machine)")
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], help="dtypes of the interleaved same-dtype comparison")
    parser.add_argument("--dtypes-only", action="store_true", help="only the interleaved same-dtype comparison -> results/bench_dtypes.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(None)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = format_prompt(tokenizer, "Tell me about Japan.", "chat")
    lines = [f"# Benchmarks\n\nMachine: {machine()}. Prompt: `Tell me about Japan.` ({len(prompt_ids)} tokens), "
             f"{args.new_tokens} new tokens, EOS ignored, median of {args.repeats} after a warm-up, all in one process "
             "(`make bench`).\n"]

    if args.dtypes_only:
        lines = [lines[0].replace("(`make bench`)", f"(`python -m bench.speed --dtypes-only --new-tokens {args.new_tokens}`)")]
        for name in args.dtypes:
            lines += interleaved_rows(model_dir, prompt_ids, args.new_tokens, args.repeats, getattr(torch, name))
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "bench_dtypes.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return

    # Memory first (fresh processes, before this one loads anything), each side alone in a fresh process.
    if not args.no_memory:
        lines.append("## Peak resident memory, each built alone in a fresh process (default sets)\n\n"
                     "| process | RSS after imports (MB) | peak RSS (MB) | peak - imports (MB) | parameter bytes (MB) | ratio |\n|---|---|---|---|---|---|")
        for role in ("edge", "cloud", "full"):
            m = memory_probe(role)
            grown = m["peak"] - m["base"]
            lines.append(f"| {role} | {m['base'] / 1e6:.0f} | {m['peak'] / 1e6:.0f} | {grown / 1e6:.0f} | {m['param_bytes'] / 1e6:.0f} | {grown / m['param_bytes']:.2f} |")

    # 0. Same dtype on both sides of the comparison, interleaved.
    if args.dtypes:
        from src.precision import native_bf16

        lines.append(f"## Split against HF generate in the same dtype, interleaved rounds ({args.repeats} after a warm-up)\n\n"
                     f"This CPU {'has' if native_bf16('cpu') else 'lacks'} native bf16, so `--dtype auto` (the default) "
                     f"computes in {'bfloat16' if native_bf16('cpu') else 'float32'} here.\n")
        for name in args.dtypes:
            lines += interleaved_rows(model_dir, prompt_ids, args.new_tokens, args.repeats, getattr(torch, name))

    # 1. Tokens per second (float32).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rates = {"HF generate, unsplit": median_rate(lambda: hf_tokens_per_second(model, prompt_ids, args.new_tokens), args.repeats)}
    short = 64
    rates[f"HF generate(use_cache=False), unsplit ({short} tokens; what the prototype did)"] = hf_tokens_per_second(model, prompt_ids, short, use_cache=False)
    pipelines, breakdown, evals = {}, {}, {}
    for label, first, second, codec, two_part in configurations(model_dir):
        pipeline = build_pipeline(str(model_dir), first, second, codec, seed=0, two_part=two_part, with_tokenizer=False)
        pipelines[label] = pipeline
        runs = []

        def run():
            result = pipeline_run(pipeline, prompt_ids, args.new_tokens)
            runs.append(result)
            return len(result.token_ids) / result.wall

        rates[label] = median_rate(run, args.repeats)
        last = runs[-1]
        evals[label] = sum(last.layer_evals.values())
        cloud_seconds = pipeline.cloud.seconds if pipeline.cloud else {}
        edge = pipeline.edge.seconds
        handled = sum(cloud_seconds.values())  # both sides' timers cover the last run (they reset per session)
        breakdown[label] = {
            "edge compute": edge["compute"],
            "cloud compute": cloud_seconds.get("compute", 0.0),
            "encode+decode": edge["encode"] + edge["decode"] + cloud_seconds.get("encode", 0.0) + cloud_seconds.get("decode", 0.0),
            "message handling": max(0.0, last.link_seconds - handled),
            "total": last.wall,
            "bytes_up": last.bytes_up, "bytes_down": last.bytes_down, "tokens": len(last.token_ids),
        }
    hf = rates["HF generate, unsplit"]
    lines.append("## Tokens per second (float32)\n\n| configuration | tokens/s | vs HF generate | layer evaluations per token |\n|---|---|---|---|")
    for label, rate in rates.items():
        per_token = f"{evals[label] / (len(prompt_ids) + args.new_tokens - 1):.1f}" if label in evals else f"{L}"
        lines.append(f"| {label} | {rate:.1f} | {rate / hf:.2f}x | {per_token} |")
    fixed, random_ = "three-part fixed (1, 29), int8", "three-part random {1..6},{24..29}, int8"
    fixed_time, random_time = 1 / rates[fixed], 1 / rates[random_]
    eval_ratio = evals[random_] / evals[fixed]
    lines.append(
        f"\nRandom split against fixed split: time per token {random_time / fixed_time:.2f}x, layer evaluations "
        f"{eval_ratio:.2f}x, so {random_time / (fixed_time * eval_ratio):.2f}x of what the extra layer work explains.\n"
    )

    # 2. Where a step's time goes.
    lines.append("## Time per step, split by where it goes (ms per generated token)\n\n| configuration | edge compute | cloud compute | encode+decode | message handling | total |\n|---|---|---|---|---|---|")
    for label, b in breakdown.items():
        n = b["tokens"]
        lines.append(f"| {label} | {1e3 * b['edge compute'] / n:.2f} | {1e3 * b['cloud compute'] / n:.2f} | {1e3 * b['encode+decode'] / n:.3f} | {1e3 * b['message handling'] / n:.3f} | {1e3 * b['total'] / n:.2f} |")

    # 3. Step time against position.
    long_runs = {}
    for label in ("main_1_split loop (unsplit)", random_):
        result = pipeline_run(pipelines[label], prompt_ids, args.long)
        long_runs[label] = result.step_seconds
    lines.append(f"\n## Step time against position ({args.long} new tokens)\n\n| configuration | tokens 16-48 (ms) | 480-512 | {args.long - 32}-{args.long} | ratio last/early |\n|---|---|---|---|---|")
    for label, steps in long_runs.items():
        early = statistics.mean(steps[16:48])
        mid = statistics.mean(steps[480:512]) if len(steps) >= 512 else float("nan")
        late = statistics.mean(steps[-32:])
        lines.append(f"| {label} | {1e3 * early:.2f} | {1e3 * mid:.2f} | {1e3 * late:.2f} | {late / early:.2f}x |")
    plot_steps(long_runs)
    lines.append("\n![step time](step_time.png)\n")

    # 4. Bytes on the link.
    lines.append("## Bytes on the link per generated token (default random sets, decode steps)\n\n"
                 "| codec | up | down | at hidden 4096 (LLaMA-7B), up+down | est. tokens/s over 20 Mbit/s, 30 ms RTT (7B-sized messages, this machine's compute) |\n|---|---|---|---|---|")
    compute_per_token = 1 / rates[random_]
    for codec in ("none", "fp16", "int8", "bnb8"):
        pipeline = build_pipeline(str(model_dir), DEFAULT_FIRST, DEFAULT_SECOND, codec, seed=0, with_tokenizer=False)
        result = pipeline.edge.generate(prompt_ids, args.new_tokens)
        n = len(result.token_ids)
        up, down = result.bytes_up / n, result.bytes_down / n
        positions = (result.positions_up + result.positions_down) / n
        messages = (result.messages_up + result.messages_down) / n
        sample = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))  # size only: int8's varies a little
        per_position_7b = len(get_codec(codec).encode(sample)[0]) / 64
        bytes_7b = messages * HEADER_SIZE + positions * per_position_7b
        link = 30e-3 + bytes_7b * 8 / 20e6
        lines.append(f"| {codec} | {up:.0f} | {down:.0f} | {bytes_7b:.0f} | {1 / (compute_per_token + link):.1f} |")
    lines.append("\nPer message: a 24-byte header. Per position: `none` 4 x hidden (fp32), `fp16` 2 x hidden, "
                 "`int8` about hidden x 8.03 / 8 + 26 (about 604 at 576, 4,138 at 4096), `bnb8` hidden + hidden/16 (612 at 576, 4352 at 4096).\n")

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_steps(runs: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 3.5))
    for label, steps in runs.items():
        window = 16
        smooth = [1e3 * statistics.mean(steps[max(1, i - window) : i + 1]) for i in range(1, len(steps))]
        axis.plot(range(1, len(steps)), smooth, label=label, linewidth=1)
    axis.set_xlabel("generated token")
    axis.set_ylabel("step time (ms, 16-step mean)")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "step_time.png", dpi=110)


if __name__ == "__main__":
    main()
