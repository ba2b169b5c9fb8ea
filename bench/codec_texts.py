"""How a codec's fidelity varies from text to text, at fixed splits: a fast check across six texts.

    python -m bench.codec_texts [--codecs bf16,int8-fixed,int8,bnb8] -> results/codec_texts.md

At a fixed split, teacher forcing is one prefill: the unsplit model runs each text once, and
forward pre-hooks on layers a and b pass the hidden states through the codec's real bytes
(`protocol.encode_hidden` / `protocol.decode`) on the way. This is not the Edge/Cloud pipeline
(`bench/fidelity.py` is), but it computes the same thing up to the order of float additions, in a
minute per codec instead of ten, so it can cover more text: the four shipped texts under
bench/data/ and two excerpts of Python's own documentation (`pydoc_data.topics`, in every
Python). Top-1 agreement is against the same model with the hooks off.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from pydoc_data.topics import topics

from bench.common import machine
from src import protocol
from src.checkpoint import load_tokenizer, resolve_model_dir
from src.codec import get_codec

RESULTS = Path(__file__).resolve().parent.parent / "results"
DATA = Path(__file__).resolve().parent / "data"
SPLITS = [(1, 29), (4, 26), (8, 22), (15, 16)]
MAX_TOKENS = 1200


def texts() -> dict[str, str]:
    keys = sorted(topics)
    found = {path.stem: path.read_text() for path in sorted(DATA.glob("*.txt"))}
    found["pydoc_topics_a"] = " ".join(topics[k] for k in keys[:6])
    found["pydoc_topics_b"] = " ".join(topics[k] for k in keys[30:36])
    return found


def run_with_codec(model, token_ids: torch.Tensor, cuts: tuple[int, ...], codec_name: str | None) -> torch.Tensor:
    """Logits of one prefill; at each cut the states entering that layer go through the codec's bytes."""
    codec = get_codec(codec_name) if codec_name else None
    hidden_size = model.config.hidden_size

    def through_link(module, args, kwargs):
        states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        message = protocol.decode(protocol.encode_hidden(0, 0, states[0], codec), hidden_size)
        received = message.hidden.to(states.dtype).unsqueeze(0)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": received}
        return (received, *args[1:]), kwargs

    layers = model.model.layers
    handles = []
    if codec is not None:
        for cut in cuts:
            target = layers[cut] if cut < len(layers) else model.model.norm
            handles.append(target.register_forward_pre_hook(through_link, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(token_ids).logits[0].float()
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", default="bf16,int8-fixed,int8,bnb8")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = resolve_model_dir(None)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    codecs = args.codecs.split(",")
    corpus = {name: torch.tensor([tokenizer(text)["input_ids"][:MAX_TOKENS]]) for name, text in texts().items()}
    reference = {name: run_with_codec(model, ids, (), None) for name, ids in corpus.items()}

    lines = [
        f"Teacher-forced prefill of each text (at most {MAX_TOKENS} tokens) with the codec at both cuts, "
        f"against the same model without it (`python -m bench.codec_texts`). Machine: {machine()}.",
        "",
        "Top-1 agreement per text, and the worst of them: the figure a target must hold on.",
        "",
        "| split | codec | worst text | " + " | ".join(corpus) + " | all | mean KL (nats) |",
        "|---|---|---|" + "---|" * len(corpus) + "---|---|",
    ]
    for a, b in SPLITS:
        for codec in codecs:
            agree, kl, total = {}, 0.0, 0
            for name, ids in corpus.items():
                logits = run_with_codec(model, ids, (a, b), codec)
                ref = reference[name]
                agree[name] = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
                logp, ref_logp = logits.log_softmax(-1), ref.log_softmax(-1)
                kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
                total += ids.shape[1]
            overall = sum(agree[n] * corpus[n].shape[1] for n in corpus) / total
            worst = min(agree.values())
            cells = " | ".join(f"{100 * agree[n]:.2f}%" for n in corpus)
            lines.append(f"| ({a},{b}) | {codec} | {100 * worst:.2f}% | {cells} | {100 * overall:.2f}% | {kl / total:.1e} |")
            print(lines[-1], flush=True)
    sizes = ", ".join(f"{name} {ids.shape[1]}" for name, ids in corpus.items())
    lines += ["", f"Tokens per text: {sizes}. At 99.5% a text of 1,200 tokens may differ in 6 tokens."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "codec_texts.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
