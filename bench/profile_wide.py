"""Where a step's time goes at LLaMA-7B's width: a 4-layer hidden-4096 random-init model on the CPU.

    python -m bench.profile_wide [--dtype float32 bfloat16] [--new-tokens 32] [--repeats 3]
      -> results/profile_wide.md

At hidden 4096 a decode step is a few large matrix-vector products, so any per-step overhead of the
split (Python work per layer, masks, stores, codec work) shows against HF `generate` more than on
the 135M model. The model: hidden 4096, intermediate 11008, 32 heads, 4 layers, vocabulary 49,152,
untied head, random init (saved once in bf16, so both dtypes load the same values).

Every configuration runs in the same process, interleaved round by round (round 0 is a warm-up),
and the split pipelines share the HF model's weight tensors, so that one copy of the weights is in
memory and all configurations read the same pages. Reported: median tokens/s, the median of the
per-round ratios to HF `generate` (robust to load drifting between rounds), where the pipeline's
time goes (its own timers), and a `torch.profiler` table of the top operations per configuration.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import machine
from src.pipeline import SideOptions, build_pipeline, parse_dtype

RESULTS = Path(__file__).resolve().parent.parent / "results"
L = 4
PROMPT = list(range(5, 5 + 35))


def wide_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=4096, intermediate_size=11008, num_hidden_layers=L,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def wide_checkpoint() -> Path:
    """The random-init model, saved once (bf16) in the temp folder and reused by later runs."""
    folder = Path(tempfile.gettempdir()) / "triadic-wide-4x4096"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    model = LlamaForCausalLM(wide_config()).to(torch.bfloat16)
    staging = Path(tempfile.mkdtemp(prefix="triadic-wide-", dir=tempfile.gettempdir()))
    model.save_pretrained(staging)
    staging.rename(folder)
    return folder


def share_weights(parts, reference: dict[str, torch.Tensor]) -> None:
    """Point every parameter of the split parts at the HF model's tensor of the same name (same values)."""
    for part in parts:
        names = [name for name, _ in part.named_parameters()]
        part.load_state_dict({name: reference[name] for name in names}, strict=False, assign=True)


def configurations() -> list[tuple[str, set[int], set[int], str]]:
    return [
        ("main_1_split loop (unsplit)", {L}, {L}, "none"),
        ("fixed (1, 3), lossless", {1}, {3}, "none"),
        ("fixed (1, 3), int8", {1}, {3}, "int8"),
        ("moving {1,2}/{2,3}, lossless", {1, 2}, {2, 3}, "none"),
        ("moving {1,2}/{2,3}, int8", {1, 2}, {2, 3}, "int8"),
    ]


def run_dtype(folder: Path, dtype: torch.dtype, args) -> list[str]:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
    reference = dict(model.named_parameters())
    ids = torch.tensor([PROMPT])

    def hf(new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[0, len(PROMPT):].tolist()

    side = SideOptions(dtype=dtype)
    pipelines = {}
    for label, first, second, codec in configurations():
        pipeline = build_pipeline(str(folder), first, second, codec, edge_side=side, cloud_side=side, with_tokenizer=False)
        share_weights(pipeline.edge.parts + (pipeline.cloud.parts if pipeline.cloud else []), reference)
        pipelines[label] = pipeline

    runners = {"HF generate": lambda: hf(args.new_tokens)}
    for label, pipeline in pipelines.items():
        runners[label] = (lambda p: lambda: p.edge.generate(PROMPT, args.new_tokens).token_ids)(pipeline)
    rates: dict[str, list[float]] = {label: [] for label in runners}
    tokens: dict[str, list[int]] = {}
    for round_ in range(args.repeats + 1):
        for label, run in runners.items():
            began = time.perf_counter()
            tokens[label] = run()
            rate = len(tokens[label]) / (time.perf_counter() - began)
            if round_ > 0:
                rates[label].append(rate)

    # Where the pipeline's own timers put the time (one more run, each configuration).
    shares = {}
    for label, pipeline in pipelines.items():
        result = pipeline.edge.generate(PROMPT, args.new_tokens)
        total = sum(result.step_seconds)
        cloud = pipeline.cloud.seconds if pipeline.cloud else {}
        codec = sum(pipeline.edge.seconds[k] for k in ("encode", "decode")) + sum(cloud.get(k, 0.0) for k in ("encode", "decode"))
        compute = pipeline.edge.seconds["compute"] + cloud.get("compute", 0.0)
        shares[label] = (1e3 * total / len(result.token_ids), compute / total, codec / total, sum(result.layer_evals.values()))

    hf_rates = rates["HF generate"]
    lines = [f"## {str(dtype).removeprefix('torch.')}\n",
             "| configuration | tokens/s (median) | vs HF generate (median of per-round ratios) | ms per token | compute share | encode+decode share | layer evaluations per position | tokens equal HF's |",
             "|---|---|---|---|---|---|---|---|"]
    positions = len(PROMPT) + args.new_tokens - 1
    for label, values in rates.items():
        ratio = statistics.median(v / h for v, h in zip(values, hf_rates))
        ms, compute, codec, evals = shares.get(label, (1e3 / statistics.median(values), float("nan"), 0.0, L * positions))
        same = "-" if label == "HF generate" else ("yes" if tokens[label] == tokens["HF generate"] else "no")
        lines.append(f"| {label} | {statistics.median(values):.2f} | {ratio:.2f}x | {ms:.1f} | {compute:.1%} | {codec:.2%} | {evals / positions:.2f} | {same} |")

    lines.append(f"\nPer-round rates (tokens/s): " + "; ".join(f"{label}: {', '.join(f'{v:.2f}' for v in values)}" for label, values in rates.items()) + "\n")
    if args.profile_tokens > 0:
        lines += profile_tables(pipelines, model, args)
    return lines


class _DecodeProfiler:
    """Starts the profiler once the first token exists, so that the table shows decode steps, not the prefill.

    Serves as an Edge `on_token` hook and as an HF `generate` streamer (whose first `put` is the prompt).
    """

    def __init__(self, skip: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CPU])
        self.skip, self.calls = skip, 0

    def __call__(self, token) -> None:
        self.calls += 1
        if self.calls == self.skip:
            self.profiler.start()

    put = __call__

    def end(self) -> None:
        pass

    def table(self, rows: int) -> str:
        self.profiler.stop()
        return self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def profile_tables(pipelines, model, args) -> list[str]:
    """A torch.profiler table of the top operations (by self CPU time) of each configuration's decode steps."""
    lines = [f"### Top operations by self CPU time, decode steps only ({args.profile_tokens} new tokens, the prefill and first token excluded)\n"]
    ids = torch.tensor([PROMPT])
    for label in ["HF generate"] + list(pipelines):
        def run(hook=None):
            if label == "HF generate":
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.profile_tokens + 1,
                               min_new_tokens=args.profile_tokens + 1, do_sample=False, pad_token_id=0, streamer=hook)
            else:
                pipelines[label].edge.generate(PROMPT, args.profile_tokens + 1, on_token=hook)

        run()
        hook = _DecodeProfiler(skip=2 if label == "HF generate" else 1)
        with torch.no_grad():
            run(hook)
        lines += [f"#### {label}\n", "```", hook.table(args.rows).strip(), "```\n"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile-tokens", type=int, default=8, help="new tokens of each profiled run (0: no profile)")
    parser.add_argument("--rows", type=int, default=14, help="operations per profile table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(RESULTS / "profile_wide.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = wide_checkpoint()
    lines = [f"# Profile at hidden 4096: 4 layers, vocabulary 49,152, untied head, random init\n\n"
             f"Machine: {machine()}. Prompt: 35 token ids, {args.new_tokens} new tokens (EOS ignored), "
             f"{args.repeats} interleaved rounds after a warm-up round, one process "
             f"(`python -m bench.profile_wide --dtype {' '.join(args.dtype)} --new-tokens {args.new_tokens} --repeats {args.repeats}`).\n"]
    for name in args.dtype:
        lines += run_dtype(folder, parse_dtype(name), args)
        Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
