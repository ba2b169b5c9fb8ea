"""Write torchinfo summaries of the three parts to torchinfo_summary_log/ (first {1}, second {L-1} by default).

    python -m tools.summaries [--base-model gemma3-270m|PATH] [--first 1] [--second 29]

Files are named `<part>_<a>_<b>.txt` for the default model and `<model>_<part>_<a>_<b>.txt` for another.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchinfo import summary

from src.checkpoint import DEFAULT_MODEL, load_config, resolve_model_dir
from src.models import FirstLlamaForCausalLM, SecondLlamaForCausalLM, ThirdLlamaForCausalLM

OUT = Path(__file__).resolve().parent.parent / "torchinfo_summary_log"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-model", default=None, help="an embedded model's name, a .gguf file or a model folder")
    parser.add_argument("--first", type=int, default=1)
    parser.add_argument("--second", type=int, default=None)
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.base_model)
    config = load_config(model_dir)
    L = config.num_hidden_layers
    a, b = args.first, args.second if args.second is not None else L - 1
    first = FirstLlamaForCausalLM.from_checkpoint(model_dir, config, range(0, a))
    second = SecondLlamaForCausalLM.from_checkpoint(model_dir, config, range(a, b))
    tied = {"lm_head.weight": first.model.embed_tokens.weight} if config.tie_word_embeddings else None
    third = ThirdLlamaForCausalLM.from_checkpoint(model_dir, config, range(b, L), shared=tied)

    seq = 8
    ids = torch.arange(1, seq + 1).unsqueeze(0)
    hidden = torch.zeros(1, seq, config.hidden_size)
    shared = [first.model.embed_tokens.weight] if tied else []
    counts = {"first": first.parameter_count(), "second": second.parameter_count(), "third": third.parameter_count(exclude=shared)}
    total = sum(counts.values())
    OUT.mkdir(exist_ok=True)
    for name, part, data, where in [
        ("first", first, ids, "edge"), ("second", second, hidden, "cloud"), ("third", third, hidden, "edge"),
    ]:
        stats = summary(part, input_data=[data], depth=4, verbose=0, col_names=["input_size", "output_size", "num_params"])
        note = " (the LM head is the first part's tied embedding: counted there)" if name == "third" and tied else ""
        text = (
            f"# {name} part ({where}) of {model_dir.name}, first split {a}, second split {b}, {L} layers\n"
            f"# parameters held by this part: {counts[name]:,}{note}\n"
            f"# first + second + third = {total:,} = full model ({'tied embeddings counted once' if tied else 'untied'})\n\n"
            f"{part!r}\n\n{stats}\n"
        )
        prefix = "" if args.base_model in (None, DEFAULT_MODEL) else f"{Path(args.base_model).stem}_"
        path = OUT / f"{prefix}{name}_{a}_{b}.txt"
        path.write_text(text)
        print(f"wrote {path} ({counts[name]:,} parameters)")


if __name__ == "__main__":
    main()
