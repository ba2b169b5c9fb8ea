"""What encoding and decoding cost, as a share of the split step: int8 against int8-fixed.

    python -m bench.codec_time -> results/codec_time.md

Greedy decoding of 64 tokens after a 40-token prompt, one torch thread, each configuration twice
(the second run counts). Times come from the sides' own per-session timers (`Party.timed`):
encode and decode on both sides, per position carried per hop, against the mean step time of the
same run.

Then one message of one position, warm (in a loop) and cold (after streaming 64 MB through the caches, as a
side's layers do between two messages): what a message costs in a step is mostly its operations starting cold.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import machine
from src.checkpoint import load_config, resolve_model_dir
from src.link import protocol
from src.link.codec import get_codec
from src.pipeline import build_pipeline

OUT = Path(__file__).resolve().parent.parent / "results" / "codec_time.md"
SETTINGS = [("(1,29)", {1}, {29}), ("{1..6},{24..29}", set(range(1, 7)), set(range(24, 30)))]


def warm_and_cold(work: Callable[[], object], repeats: int = 60) -> tuple[float, float]:
    """Median seconds of `work`: in a loop, and each time after 64 MB streamed through the caches."""
    flood = torch.empty(16 * 1024 * 1024)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(10):
        work()
    for cold in (False, True):
        for _ in range(repeats):
            if cold:
                flood.add_(1.0)
            began = time.perf_counter()
            work()
            times[cold].append(time.perf_counter() - began)
    return statistics.median(times[False]), statistics.median(times[True])


def message_lines(hidden: int) -> list[str]:
    """A table row per codec: one position's message encoded and decoded, warm and cold."""
    lines = ["", f"One message of one position at hidden {hidden}, median of 60, warm and after 64 MB streamed (cold):", "",
             "| codec | encode warm (us) | encode cold (us) | decode warm (us) | decode cold (us) |", "|---|---|---|---|---|"]
    states = torch.randn(1, hidden) * 3
    for name in ("int8-fixed", "int8"):
        codec = get_codec(name)
        codec.prepare()
        message = protocol.encode_hidden(0, 0, states, codec)
        encode = warm_and_cold(lambda: protocol.encode_hidden(0, 0, states, codec))
        decode = warm_and_cold(lambda: protocol.decode(message, hidden))
        lines.append(f"| {name} | " + " | ".join(f"{1e6 * t:.0f}" for t in (*encode, *decode)) + " |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    # No options: --help says what the run does and writes, before it starts; anything else is refused.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(1)
    model_dir = str(resolve_model_dir(None))
    prompt = list(range(100, 140))
    lines = [
        f"Encode + decode against the step time, 64 greedy tokens (`python -m bench.codec_time`). Machine: {machine()}.",
        "",
        "| split | codec | mean step (ms) | encode+decode per position per hop (ms) | share of the step | per step, both hops (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for label, first, second in SETTINGS:
        for codec in ("int8-fixed", "int8"):
            pipeline = build_pipeline(model_dir, first, second, codec, seed=0, with_tokenizer=False)
            for _ in range(2):  # the first run warms up; timers reset with each session
                result = pipeline.edge.generate(prompt, 64)
            edge, cloud = pipeline.edge.seconds, pipeline.cloud.seconds
            codec_seconds = edge["encode"] + edge["decode"] + cloud["encode"] + cloud["decode"]
            step = sum(result.step_seconds) / len(result.step_seconds)
            per_position = codec_seconds / (result.positions_up + result.positions_down)
            per_step = codec_seconds / len(result.step_seconds)
            lines.append(f"| {label} | {codec} | {1e3 * step:.1f} | {1e3 * per_position:.3f} | {100 * per_position / step:.2f}% | {1e3 * per_step:.2f} |")
            print(lines[-1], flush=True)
    lines += message_lines(load_config(model_dir).hidden_size)
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
