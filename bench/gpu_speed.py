"""Speed on a GPU with a random-init LLaMA-7B-shaped model in fp16 (optional; not part of the tests).

    python -m bench.gpu_speed [--new-tokens 128] [--repeats 3] [--more-codecs int8-fixed] [--messages] [--tiny [--layers 32]]
      ->  a markdown table, each side's time per token, and a Python profile per configuration (and $OUT/gpu.md if set)

The weights are random (no 7B checkpoint is reachable offline), so the figures are about speed,
not text. Both sides run on the same GPU in one process, linked by bytes as always. HF `generate`
takes turns with each configuration, so every ratio compares runs made under the same conditions.
At batch 1 a 7B decode step is bound by the host's per-operation cost, not by the GPU, so
`--tiny --layers 32` on a CPU (where time is all per-operation overhead) is a fair stand-in for
trying changes before spending GPU time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from src.pipeline import SideOptions, build_pipeline


def config(tiny: bool, layers: int | None = None) -> LlamaConfig:
    if tiny:  # a smoke test on a CPU machine; with 32 layers its time is the per-step overhead a GPU sees
        return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=layers or 4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def python_profile(label: str, run, args) -> str:
    """cProfile of one short generation: on a GPU this loop is bound by the host, so its own time is the cost."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.rows)
    body = out.getvalue().strip().splitlines()
    return "\n".join([f"#### {label}\n", "```"] + [line[:160] for line in body[-args.rows - 2 :]] + ["```\n"])


def device_profile(label: str, run, tokens: int, rows: int) -> str:
    """torch.profiler over one generation: where a step's host time goes per operation, and what the GPU does meanwhile.

    Per token: the host's time, the GPU's busy time (its kernels), kernel launches, and the time the host sat in
    copies and synchronizations (waiting for the GPU). Attention calls by query length show the chunk calls."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    run()  # warm: a first generation builds what a later one reuses
    with profile(activities=activities, record_shapes=True) as prof:
        began = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - began
    events = prof.key_averages()

    def total(keys: tuple[str, ...]) -> tuple[int, float]:
        """Calls and self host time of the events whose names hold one of `keys`."""
        chosen = [e for e in events if any(k in e.key for k in keys)]
        return sum(e.count for e in chosen), sum(e.self_cpu_time_total for e in chosen)

    launches, launch_us = total(("LaunchKernel",))
    waits, wait_us = total(("Synchronize", "Memcpy"))
    gpu_us = sum(e.self_device_time_total for e in events if getattr(e, "device_type", None) is not None
                 and str(e.device_type).endswith("CUDA"))
    by_query: dict[int, list[float]] = {}  # query length -> [calls, host us, GPU us]
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "aten::scaled_dot_product_attention" and e.input_shapes and len(e.input_shapes[0]) == 4:
            entry = by_query.setdefault(e.input_shapes[0][2], [0, 0.0, 0.0])
            entry[0] += e.count
            entry[1] += e.cpu_time_total
            entry[2] += e.device_time_total
    shapes = ", ".join(f"q {q}: {n / tokens:.2f} calls, {host / n:.0f} us host, {gpu / n:.0f} us GPU"
                       for q, (n, host, gpu) in sorted(by_query.items()))
    table = events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    return "\n".join([
        f"#### {label}\n",
        f"- per token: wall {1e3 * wall / tokens:.2f} ms; GPU busy {gpu_us / tokens / 1e3:.2f} ms; "
        f"{launches / tokens:.0f} kernel launches ({launch_us / tokens / 1e3:.2f} ms host); "
        f"{waits / tokens:.1f} copies and syncs ({wait_us / tokens / 1e3:.2f} ms host)",
        f"- attention by query length, per token: {shapes}", "", "```", table.strip(), "```\n"])


def message_times(hidden: int, device: str, dtype: torch.dtype, n: int = 200) -> str:
    """One message's encode and decode on this host, and the parts of int8's: where a codec's per-token time goes."""
    import numpy as np

    from src.link import rice
    from src.link.codec import get_codec, rotate

    def clock(work) -> float:
        for _ in range(10):
            work()
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(n):
            work()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - began) / n * 1e6

    rows = ["| codec, positions | encode us | decode us |", "|---|---|---|"]
    for name in ("none", "int8-fixed", "int8"):
        codec = get_codec(name)
        for count in (1, 3):
            x = torch.randn(count, hidden, device=device, dtype=dtype) * 4
            payload, code = codec.encode(x)
            view = memoryview(payload)
            rows.append(f"| {name}, {count} | {clock(lambda: codec.encode(x)):.0f} | "
                        f"{clock(lambda: codec.decode(view, count, hidden, code, device)):.0f} |")
    rotated, step = torch.randn(1, hidden).numpy() * 60, np.ones((1, 1), np.float32)  # the int8 codec's integers' spread
    code = rice.rice_encode(np.rint(rotated), 6)
    rest = torch.randn(1, hidden, device=device)
    coder = "C" if rice.library() is not None else f"numpy ({rice._problem})"
    parts = [f"rounding and Rice code in numpy {clock(lambda: rice.rice_encode(np.rint(rotated / step), 6)):.0f} us, in {coder} "
             f"{clock(lambda: rice.round_encode(rotated, step, 6)):.0f} us",
             f"decoding and scaling in numpy {clock(lambda: rice.rice_decode(memoryview(code), hidden, 6, 'int8').astype(np.float32) * step):.0f} us, "
             f"in {coder} {clock(lambda: rice.decode_scale(memoryview(code), 1, hidden, 6, step, 'int8')):.0f} us",
             f"rotate on {device} {clock(lambda: rotate(rest)):.0f} us", f"one empty {device} op {clock(lambda: rest.add_(0)):.0f} us"]
    return "\n".join([f"One message at hidden {hidden} on this host ({dtype} in), `--messages`:\n"] + rows + ["", "int8's parts, one position: " + ", ".join(parts) + "."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, help="layers of the --tiny model (default 4)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile-tokens", type=int, default=16, help="tokens of each profiled generation (0: no profiles)")
    parser.add_argument("--more-codecs", nargs="*", default=[], help="codecs timed besides none and int8 (e.g. int8-fixed)")
    parser.add_argument("--only", nargs="*", default=[], help="time only configurations whose label contains one of these")
    parser.add_argument("--rows", type=int, default=25, help="functions per profile")
    parser.add_argument("--device-profile", type=int, default=0, metavar="TOKENS",
                        help="torch.profiler of one generation of TOKENS per int8 configuration (0: none)")
    parser.add_argument("--messages", action="store_true", help="also time one message's encode and decode, and their parts, on this host")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    cfg = config(args.tiny, args.layers)
    L = cfg.num_hidden_layers
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="llama7b-random-"))
    began = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.save_pretrained(folder)
    # The baseline as users load it: from_pretrained keeps the rotary frequencies in float32, `.to(fp16)` would not.
    del model
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device).eval()
    setup = time.perf_counter() - began
    prompt = list(range(5, 5 + 35))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    cpu_rates: dict[str, list[float]] = {}  # tokens per second of the process's CPU time, beside the wall-clock rates

    def hf(label: str = "HF generate, unsplit") -> float:
        ids = torch.tensor([prompt], device=device)
        sync()
        t, cpu = time.perf_counter(), time.process_time()
        model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        sync()
        cpu_rates.setdefault(label, []).append(args.new_tokens / (time.process_time() - cpu))
        return args.new_tokens / (time.perf_counter() - t)

    rates = {"HF generate, unsplit": [hf() for _ in range(args.repeats + 1)][1:]}
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompt], device=device), max_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    profiles = [python_profile("HF generate, unsplit", lambda: model.generate(
        torch.tensor([prompt], device=device), max_new_tokens=args.profile_tokens, min_new_tokens=args.profile_tokens,
        do_sample=False, pad_token_id=0), args)] if args.profile_tokens > 0 else []

    side = SideOptions(device=device, dtype=dtype)
    w = min(6, L // 2)  # the default sets' width
    configs = [
        ("main_1_split loop (unsplit)", {L}, {L}, "none"),
        (f"three-part fixed (1, {L - 1}), lossless", {1}, {L - 1}, "none"),
        (f"three-part fixed (1, {L - 1}), int8", {1}, {L - 1}, "int8"),
        (f"three-part random {{1..{w}}},{{{L - w}..{L - 1}}}, lossless", set(range(1, w + 1)), set(range(L - w, L)), "none"),
        (f"three-part random {{1..{w}}},{{{L - w}..{L - 1}}}, int8", set(range(1, w + 1)), set(range(L - w, L)), "int8"),
    ]
    for codec in args.more_codecs:
        configs += [
            (f"three-part fixed (1, {L - 1}), {codec}", {1}, {L - 1}, codec),
            (f"three-part random {{1..{w}}},{{{L - w}..{L - 1}}}, {codec}", set(range(1, w + 1)), set(range(L - w, L)), codec),
        ]
    if args.only:
        configs = [c for c in configs if any(part in c[0] for part in args.only)]
    same, split, hf_rates = {}, {}, {}
    device_profiles: list[str] = []
    for label, first, second, codec in configs:
        pipeline = build_pipeline(str(folder), first, second, codec, edge_side=side, cloud_side=side, with_tokenizer=False)
        # HF and this configuration take turns, so that both see the same state of a shared host.
        runs, baseline = [], []
        for round_ in range(args.repeats + 1):
            for party in (pipeline.edge, pipeline.cloud):
                if party is not None:
                    party.seconds.clear()
            sync()
            t, cpu = time.perf_counter(), time.process_time()
            result = pipeline.edge.generate(prompt, args.new_tokens)
            sync()
            runs.append(len(result.token_ids) / (time.perf_counter() - t))
            cpu_rates.setdefault(label, []).append(len(result.token_ids) / (time.process_time() - cpu))
            baseline.append(hf(f"HF beside {label}"))
        rates[label], hf_rates[label] = runs[1:], baseline[1:]
        # Where the last run's time went, per token: each side's compute (layers, head), encode, decode.
        parts = {f"edge {k}": v for k, v in pipeline.edge.seconds.items()}
        if pipeline.cloud is not None:
            parts.update({f"cloud {k}": v for k, v in pipeline.cloud.seconds.items()})
        split[label] = ", ".join(f"{k} {1e3 * v / len(result.token_ids):.2f}" for k, v in sorted(parts.items()))
        same[label] = pipeline.edge.generate(prompt, 32).token_ids == reference
        if args.profile_tokens > 0 and (label.endswith(", int8") or "unsplit" in label):
            profiles.append(python_profile(label, lambda edge=pipeline.edge: edge.generate(prompt, args.profile_tokens), args))
        if args.device_profile > 0 and (label.endswith(", int8") or "unsplit" in label):
            device_profiles.append(device_profile(
                label, lambda edge=pipeline.edge: edge.generate(prompt, args.device_profile), args.device_profile, args.rows))
        del pipeline
        if device == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines = [
        f"Random-init LLaMA-7B-shaped model ({L} layers, hidden {cfg.hidden_size}), {dtype}, on {name}, torch {torch.__version__}; "
        f"both sides on the one GPU; {args.new_tokens} new tokens; each configuration and HF generate take turns, "
        f"{args.repeats} rounds after a warm-up round, medians; set-up {setup:.0f} s (`python -m bench.gpu_speed`).\n",
        "Paired ratios pair each run with the HF run right after it, so that a shared host's drift between rounds cancels; "
        "the CPU-time ratio counts the process's CPU seconds instead of the clock's, so that time the host gave to others does not count.\n",
        "| configuration | tokens/s | HF generate in the same rounds, tokens/s | vs HF generate | median of per-round ratios (min-max) "
        "| the same by CPU time | first 32 tokens equal HF's |",
        "|---|---|---|---|---|---|---|",
        f"| HF generate, unsplit, before the rest | {statistics.median(rates['HF generate, unsplit']):.1f} | - | 1.00x | - | - | - |",
    ]

    def paired(mine: list[float], theirs: list[float]) -> str:
        ratios = [a / b for a, b in zip(mine, theirs)]
        return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"

    for label, values in hf_rates.items():
        rate, hf_rate = statistics.median(rates[label]), statistics.median(values)
        lines.append(f"| {label} | {rate:.1f} | {hf_rate:.1f} | {rate / hf_rate:.2f}x | {paired(rates[label], values)} "
                     f"| {paired(cpu_rates[label][1:], cpu_rates[f'HF beside {label}'][1:])} | {same[label]} |")
    lines += ["", "Milliseconds per token of the last timed run, by side and kind (`Party.seconds`):\n"]
    lines += [f"- {label}: {text}" for label, text in split.items()]
    if args.messages:
        lines += ["", message_times(cfg.hidden_size, device, dtype)]
    if profiles:
        lines += ["", f"### Python profile of {args.profile_tokens} tokens (prefill included), top functions by own time\n"] + profiles
    if device_profiles:
        lines += ["", f"### torch.profiler of {args.device_profile} tokens (prefill included), top operations by host time\n"]
        lines += device_profiles
    text = "\n".join(lines) + "\n"
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.md").write_text(text)


if __name__ == "__main__":
    main()
