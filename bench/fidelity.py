"""Fidelity of a link codec: the split pipeline teacher-forced over a text, against lossless transport.

    python -m bench.fidelity --text-file bench/data/fidelity_river_town.txt --codec int8 --first 1 --second 29 --json

Prints top1_agreement (argmax of the edge's logits equal to the lossless run's), kl (mean
KL(lossless || codec), nats per token), ppl and ppl_lossless, and bytes_per_position (message bytes
per hidden-state position, per hop, headers included). Both runs go through the real Edge/Cloud
pair and their byte messages; the text is cut into chunks that fit the model's context.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from bench.common import parse_sets
from src.checkpoint import load_config, load_tokenizer, resolve_model_dir
from src.link.codec import get_codec
from src.pipeline import build_pipeline


class Stats:
    def __init__(self) -> None:
        self.tokens = 0
        self.agree = 0
        self.kl = 0.0
        self.nll = 0.0
        self.nll_lossless = 0.0
        self.bytes = 0
        self.positions = 0

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "top1_agreement": self.agree / self.tokens,
            "kl": self.kl / self.tokens,
            "ppl": math.exp(self.nll / self.tokens),
            "ppl_lossless": math.exp(self.nll_lossless / self.tokens),
            "bytes_per_position": self.bytes / max(1, self.positions),
        }


def teacher_force(pipeline, chunk: list[int], prefix: int, on_step) -> object:
    """Run the chunk through the pipeline: `prefix` tokens as prompt, the rest forced one per step."""
    return pipeline.edge.generate(chunk[:prefix], len(chunk) - prefix, forced_tokens=chunk[prefix:], on_logits=on_step)


def measure(model_dir, token_ids, first, second, codecs: list[str], seed, context, prefix=8) -> dict[str, dict]:
    """Teacher-forced lossless run, then one run per codec over the same chunks, compared step by step."""
    stats = {codec: Stats() for codec in codecs}
    lossless = build_pipeline(str(model_dir), first, second, "none", seed, with_tokenizer=False)
    lossy = {codec: build_pipeline(str(model_dir), first, second, codec, seed, with_tokenizer=False) for codec in codecs}
    for begin in range(0, len(token_ids) - prefix - 1, context):
        chunk = token_ids[begin : begin + context]
        reference: list[torch.Tensor] = []
        teacher_force(lossless, chunk, prefix, lambda step, logits: reference.append(logits.float().log_softmax(-1)))
        for codec, pipeline in lossy.items():
            result = teacher_force(pipeline, chunk, prefix, comparer(stats[codec], chunk, prefix, reference))
            stats[codec].bytes += result.bytes_up + result.bytes_down
            stats[codec].positions += result.positions_up + result.positions_down
    return {codec: s.as_dict() for codec, s in stats.items()}


def comparer(stats: Stats, chunk: list[int], prefix: int, reference: list[torch.Tensor]):
    def compare(step: int, logits: torch.Tensor) -> None:
        if prefix + step >= len(chunk):
            return  # the last step predicts past the chunk
        logp, ref = logits.float().log_softmax(-1), reference[step]
        target = chunk[prefix + step]
        stats.tokens += 1
        stats.agree += int(logp.argmax() == ref.argmax())
        stats.kl += float((ref.exp() * (ref - logp)).sum())
        stats.nll += -float(logp[target])
        stats.nll_lossless += -float(ref[target])

    return compare


def load_text_ids(model_dir, path: str) -> list[int]:
    return load_tokenizer(model_dir)(Path(path).read_text())["input_ids"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-file", required=True)
    parser.add_argument("--codec", default="int8", help="a codec, or a comma list (one lossless run serves all)")
    parser.add_argument("--first", default="1", help="comma list or range, e.g. 1-6")
    parser.add_argument("--second", default="29")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--context", type=int, default=None, help="chunk length (default: the model's context)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = resolve_model_dir(args.base_model)
    token_ids = load_text_ids(model_dir, args.text_file)
    context = args.context or load_config(model_dir).max_position_embeddings
    first, second = parse_sets(parser, args)
    codecs = args.codec.split(",")
    for codec in codecs:
        get_codec(codec)
    results = measure(model_dir, token_ids, first, second, codecs, args.seed, context)
    for codec, report in results.items():
        report.update(codec=codec, first=sorted(first), second=sorted(second), seed=args.seed, text=Path(args.text_file).name)
        if args.json:
            print(json.dumps(report))
        else:
            print(" ".join(f"{key}={value}" for key, value in report.items()))


if __name__ == "__main__":
    sys.exit(main())
