"""Free-running check of a lossy codec: greedy tokens that match lossless before the first divergence.

    python -m bench.free_running [--codecs int8-fixed,int8] [--new-tokens 64]  ->  results/free_running.md

20 prompts x 4 split settings; the lossless reference is unsplit HF generate(do_sample=False),
which the tests show equal to lossless split decoding.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bench.common import machine
from src.checkpoint import load_tokenizer, resolve_model_dir
from src.pipeline import build_pipeline
from src.utils import format_prompt

PROMPTS = [
    "Tell me about Japan.", "Write a haiku about autumn rain.", "Explain photosynthesis to a child.",
    "What are the main causes of inflation?", "Give me three tips for a job interview.",
    "Summarize the plot of a heist movie you invent.", "How does a bicycle stay upright?",
    "Write a short email declining a meeting.", "What is the difference between weather and climate?",
    "List five uses of vinegar at home.", "Describe the water cycle.", "Why is the sky blue?",
    "Write a limerick about a cat who codes.", "How do vaccines work?", "Plan a one-day trip to Paris.",
    "Explain what a hash table is.", "What should I pack for a camping trip?", "Describe a sunset over the sea.",
    "How can I improve my sleep?", "Explain the rules of chess in brief.",
]
SETTINGS = [({1}, {29}), ({4}, {26}), ({8}, {22}), (set(range(1, 7)), set(range(24, 30)))]
OUT = Path(__file__).resolve().parent.parent / "results" / "free_running.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", default="int8-fixed,int8", help="comma list")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # no timings here; one thread never thrashes on a shared machine
    model_dir = resolve_model_dir(None)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [format_prompt(tokenizer, p, "chat") for p in PROMPTS]
    references = []
    for ids in prompts:
        tensor = torch.tensor([ids])  # all-ones mask: else generate masks the prompt's <|im_end|> (= pad id)
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=2)
        references.append(out[0, len(ids):].tolist())
    rows = []
    for first, second in SETTINGS:
        for codec in args.codecs.split(","):
            pipeline = build_pipeline(str(model_dir), first, second, codec, seed=0, with_tokenizer=False)
            matched = []
            for ids, reference in zip(prompts, references):
                tokens = pipeline.edge.generate(ids, args.new_tokens).token_ids
                prefix = next((i for i, (x, y) in enumerate(zip(tokens, reference)) if x != y), len(reference))
                matched.append(prefix)
            name = "{1..6},{24..29}" if len(first) > 1 else f"({min(first)},{min(second)})"
            full = sum(m == args.new_tokens for m in matched)
            rows.append(f"| {name} | {codec} | {full}/20 | {sum(matched) / len(matched):.1f} | {min(matched)} | {' '.join(map(str, matched))} |")
            print(rows[-1], flush=True)
    OUT.write_text(
        "Greedy tokens of each codec that match lossless before the first divergence, "
        f"{args.new_tokens} new tokens, 20 chat prompts (`python -m bench.free_running`). Machine: {machine()}.\n\n"
        "| split | codec | identical to the end | mean matched | min | per prompt |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    main()
