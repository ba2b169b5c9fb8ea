"""Where a step's time goes at LLaMA-7B's width: a 4-layer hidden-4096 random-init model on the CPU.

    python -m bench.profile_wide [--dtype float32 bfloat16] [--new-tokens 32] [--repeats 3]
      -> results/profile_wide.md

At hidden 4096 a decode step is a few large matrix-vector products, so any per-step overhead of the
split (Python work per layer, masks, stores, codec work) shows against HF `generate` more than on
the 135M model. The model: hidden 4096, intermediate 11008, 32 heads, 4 layers, vocabulary 49,152,
untied head, random init (saved once in bf16, so both dtypes load the same values).

Every configuration runs in the same process, interleaved round by round (round 0 is a warm-up),
and the split pipelines share the HF model's weight tensors, so that one copy of the weights is in
memory and all configurations read the same pages. Reported: median tokens/s, the medians of the
per-round ratios to HF `generate` (robust to load drifting between rounds) in wall time, in this
process's CPU time (not counting time the scheduler gives to other processes on a shared machine)
and in CPU time of the decode steps alone (no prefill), the codec's share of the step (the
pipeline's own timers), and a `torch.profiler` table of the top operations per configuration.
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
from src.checkpoint import is_column_major
from src.pipeline import SideOptions, build_pipeline, parse_dtype

RESULTS = Path(__file__).resolve().parent.parent / "results"
L = 4
PROMPT = list(range(5, 5 + 35))


def wide_config(tiny: bool = False) -> LlamaConfig:
    """LLaMA-7B's width with 4 layers; `tiny`: the same shape scaled down, a smoke test of this script."""
    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=L, num_attention_heads=4,
                           num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaConfig(vocab_size=49152, hidden_size=4096, intermediate_size=11008, num_hidden_layers=L,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def wide_checkpoint(tiny: bool = False) -> Path:
    """The random-init model, saved once (bf16) in the temp folder and reused by later runs."""
    folder = Path(tempfile.gettempdir()) / ("triadic-wide-tiny" if tiny else "triadic-wide-4x4096")
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    model = LlamaForCausalLM(wide_config(tiny)).to(torch.bfloat16)
    staging = Path(tempfile.mkdtemp(prefix="triadic-wide-", dir=tempfile.gettempdir()))
    model.save_pretrained(staging)
    staging.rename(folder)
    return folder


class Clock:
    """Wall and CPU time of one generation, in all and from its first token on (the decode steps).

    CPU time (this process's, one torch thread) is the fairer measure on a machine other processes
    share: it does not count the time the scheduler gives to them. Serves as an Edge `on_token` hook
    and as an HF `generate` streamer (whose first `put` is the prompt, the second the first token).
    """

    def __init__(self, skip: int) -> None:
        self.skip, self.calls = skip, 0
        self.began = self.first = (time.perf_counter(), time.process_time())

    def __call__(self, token) -> None:
        self.calls += 1
        if self.calls == self.skip:
            self.first = (time.perf_counter(), time.process_time())

    put = __call__

    def end(self) -> None:
        pass

    def stop(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall, self.cpu = wall - self.began[0], cpu - self.began[1]
        self.decode_wall, self.decode_cpu = wall - self.first[0], cpu - self.first[1]


def share_weights(parts, reference: dict[str, torch.Tensor]) -> None:
    """Point every parameter of the split parts at the HF model's tensor of the same name (same values), except
    the weights a lossy run's parts store transposed in memory or as panels (read from the same file: same values too)."""
    for part in parts:
        state = {name: reference[name] for name, param in part.named_parameters() if name in reference and not is_column_major(param)}
        part.load_state_dict(state, strict=False, assign=True)


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

    side = SideOptions(dtype=dtype)
    pipelines = {}
    for label, first, second, codec in configurations():
        pipeline = build_pipeline(str(folder), first, second, codec, edge_side=side, cloud_side=side, with_tokenizer=False)
        share_weights(pipeline.edge.parts + (pipeline.cloud.parts if pipeline.cloud else []), reference)
        pipelines[label] = pipeline

    def runner(label: str):
        """One generation of `args.new_tokens`, timed by a Clock; returns (tokens, clock)."""
        def run():
            clock = Clock(skip=2 if label == "HF generate" else 1)
            with torch.no_grad():
                if label == "HF generate":
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                         min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, streamer=clock)
                    tokens = out[0, len(PROMPT):].tolist()
                else:
                    tokens = pipelines[label].edge.generate(PROMPT, args.new_tokens, on_token=clock).token_ids
            clock.stop()
            return tokens, clock
        return run

    labels = ["HF generate"] + list(pipelines)
    clocks: dict[str, list[Clock]] = {label: [] for label in labels}
    tokens: dict[str, list[int]] = {}
    for round_ in range(args.repeats + 1):
        for label in labels:
            tokens[label], clock = runner(label)()
            if round_ > 0:
                clocks[label].append(clock)

    # Where the pipeline's own timers put the time (one more run, each configuration).
    shares = {}
    for label, pipeline in pipelines.items():
        result = pipeline.edge.generate(PROMPT, args.new_tokens)
        total = sum(result.step_seconds)
        cloud = pipeline.cloud.seconds if pipeline.cloud else {}
        codec = sum(pipeline.edge.seconds[k] for k in ("encode", "decode")) + sum(cloud.get(k, 0.0) for k in ("encode", "decode"))
        shares[label] = (codec / total, sum(result.layer_evals.values()))

    def ratio(label: str, measure: str) -> float:
        """Median over rounds of HF's time / this configuration's time (same number of tokens)."""
        return statistics.median(getattr(h, measure) / getattr(c, measure) for c, h in zip(clocks[label], clocks["HF generate"]))

    lines = [f"## {str(dtype).removeprefix('torch.')}\n",
             "| configuration | tokens/s, wall (median) | vs HF generate, wall | vs HF, CPU time | vs HF, CPU time of decode steps | CPU ms per decode step | encode+decode share of the step | layer evaluations per position | tokens equal HF's |",
             "|---|---|---|---|---|---|---|---|---|"]
    positions = len(PROMPT) + args.new_tokens - 1
    for label in labels:
        rate = statistics.median(args.new_tokens / c.wall for c in clocks[label])
        step_ms = statistics.median(1e3 * c.decode_cpu / (args.new_tokens - 1) for c in clocks[label])
        codec, evals = shares.get(label, (0.0, L * positions))
        same = "-" if label == "HF generate" else ("yes" if tokens[label] == tokens["HF generate"] else "no")
        lines.append(f"| {label} | {rate:.2f} | {ratio(label, 'wall'):.2f}x | {ratio(label, 'cpu'):.2f}x | {ratio(label, 'decode_cpu'):.2f}x "
                     f"| {step_ms:.1f} | {codec:.2%} | {evals / positions:.2f} | {same} |")
    lines.append("\nPer-round wall rates (tokens/s): " + "; ".join(
        f"{label}: {', '.join(f'{args.new_tokens / c.wall:.2f}' for c in values)}" for label, values in clocks.items()) + "\n")
    if args.profile_tokens > 0:
        lines += profile_tables(pipelines, model, args)
    return lines


class DecodeProfiler:
    """Starts the profiler once the first token exists, so that the table shows decode steps, not the prefill.

    Serves as an Edge `on_token` hook and as an HF `generate` streamer (whose first `put` is the prompt).
    With `cuda`, GPU kernels are recorded too and the table is sorted by their time.
    """

    def __init__(self, skip: int, cuda: bool = False) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
        self.skip, self.calls, self.cuda = skip, 0, cuda

    def __call__(self, token) -> None:
        self.calls += 1
        if self.calls == self.skip:
            self.profiler.start()

    put = __call__

    def end(self) -> None:
        pass

    def table(self, rows: int) -> str:
        self.profiler.stop()
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        return self.profiler.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48)


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
        hook = DecodeProfiler(skip=2 if label == "HF generate" else 1)
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
    parser.add_argument("--tiny", action="store_true", help="a hidden-64 model of the same shape: a smoke test of this script")
    parser.add_argument("--output", default=str(RESULTS / "profile_wide.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = wide_checkpoint(args.tiny)
    title = "tiny smoke test (hidden 64)" if args.tiny else "hidden 4096: 4 layers, vocabulary 49,152, untied head, random init"
    lines = [f"# Profile at {title}\n\n"
             f"Machine: {machine()}. Prompt: 35 token ids, {args.new_tokens} new tokens (EOS ignored), "
             f"{args.repeats} interleaved rounds after a warm-up round, one process "
             f"(`python -m bench.profile_wide --dtype {' '.join(args.dtype)} --new-tokens {args.new_tokens} --repeats {args.repeats}`).\n"]
    for name in args.dtype:
        lines += run_dtype(folder, parse_dtype(name), args)
        Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
