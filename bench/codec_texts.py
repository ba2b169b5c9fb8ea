"""How a codec's fidelity varies from text to text, at fixed splits: a fast check across six texts.

    python -m bench.codec_texts [--codecs bf16,int8-fixed,int8,bnb8] -> results/codec_texts.md
    python -m bench.codec_texts --rates 45,60,85,120                 -> results/codec_rate.md

The second form sweeps the rate of the `int8` codec (its steps per RMS; 60 is the default) to show
what more bytes buy. The tokens that flip are near ties, so their number falls only in proportion
to the step (the square root of the squared error, and of the KL): halving it costs one bit per value.

At a fixed split, teacher forcing is one prefill: the unsplit model runs each text once, and
forward pre-hooks on layers a and b pass the hidden states through the codec's real bytes
(`Codec.encode` / `Codec.decode`; sizes add the 24-byte message header) on the way. This is not
the Edge/Cloud pipeline (`bench/fidelity.py` is), but it computes the same thing up to the order
of float additions, in a minute per codec instead of ten, so it can cover more text: the four
shipped texts under bench/data/ and two excerpts of Python's own documentation
(`pydoc_data.topics`, in every Python). Top-1 agreement is against the same model with the hooks off.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from pydoc_data.topics import topics

from bench.common import machine
from src.checkpoint import load_tokenizer, resolve_model_dir
from src.link.codec import Codec, RiceCodec, get_codec
from src.link.protocol import HEADER_SIZE

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


def run_with_codec(model, token_ids: torch.Tensor, cuts: tuple[int, ...], codec: Codec | None, sizes: list[int] | None = None) -> torch.Tensor:
    """Logits of one prefill; at each cut the states entering that layer go through the codec's bytes.

    `sizes` collects the message size of each position sent alone (a decode step's message).
    """
    hidden_size = model.config.hidden_size

    def through_link(module, args, kwargs):
        states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        payload, dtype_code = codec.encode(states[0])
        decoded = codec.decode(memoryview(payload), states.shape[1], hidden_size, dtype_code)
        if sizes is not None:
            sizes.extend(HEADER_SIZE + len(codec.encode(states[0, s : s + 1])[0]) for s in range(states.shape[1]))
        received = decoded.to(states.dtype).unsqueeze(0)
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


def measure(model, corpus: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], cuts: tuple[int, int], codec: Codec, sizes: list[int] | None = None) -> tuple[dict[str, int], float]:
    """Tokens whose top-1 differs from the reference, per text, and the mean KL(reference || codec) per token."""
    flips, kl = {}, 0.0
    for name, ids in corpus.items():
        logits = run_with_codec(model, ids, cuts, codec, sizes)
        ref = reference[name]
        flips[name] = int((logits.argmax(-1) != ref.argmax(-1)).sum())
        logp, ref_logp = logits.log_softmax(-1), ref.log_softmax(-1)
        kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
    return flips, kl / tokens(corpus)


def tokens(corpus: dict[str, torch.Tensor]) -> int:
    return sum(ids.shape[1] for ids in corpus.values())


def below_threshold_chance(flip_rate: float, tokens: int = 1200, threshold: float = 0.995) -> float:
    """Chance that a text of `tokens` tokens falls below `threshold` if tokens flip independently (Poisson)."""
    mean, allowed = flip_rate * tokens, int(tokens * (1 - threshold) + 1e-9)
    return 1 - sum(math.exp(-mean) * mean**k / math.factorial(k) for k in range(allowed + 1))


def codec_table(model, corpus, reference, codecs: list[str]) -> list[str]:
    lines = [
        "Top-1 agreement per text, and the worst of them: the figure a target must hold on.",
        "",
        "| split | codec | worst text | " + " | ".join(corpus) + " | all | mean KL (nats) |",
        "|---|---|---|" + "---|" * len(corpus) + "---|---|",
    ]
    for a, b in SPLITS:
        for codec in codecs:
            flips, kl = measure(model, corpus, reference, (a, b), get_codec(codec))
            agree = {n: 1 - flips[n] / ids.shape[1] for n, ids in corpus.items()}
            cells = " | ".join(f"{100 * agree[n]:.2f}%" for n in corpus)
            overall = 1 - sum(flips.values()) / tokens(corpus)
            lines.append(f"| ({a},{b}) | {codec} | {100 * min(agree.values()):.2f}% | {cells} | {100 * overall:.2f}% | {kl:.1e} |")
            print(lines[-1], flush=True)
    return lines


def rate_table(model, corpus, reference, rates: list[float]) -> list[str]:
    default = get_codec("int8")
    lines = [
        f"The `int8` codec at other rates (steps per RMS; the default is {default.steps_per_rms:g}), all four splits "
        "and all six texts pooled. Bytes: mean message size of one position sent alone (header included).",
        "",
        "| steps per RMS | bytes/position | x hidden | worst text-split pair | all | flipped tokens | "
        "chance a 1,200-token text < 99.5% | mean KL (nats) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    hidden = model.config.hidden_size
    for rate in rates:
        k = round(math.log2(1.1 * rate))  # the Rice parameter for zigzagged Gaussian integers of this spread: 6 at 60
        codec = RiceCodec("int8", default.codec_id, default.outliers, rate, k)
        worst, flips, kls, sizes = 1.0, 0, [], []
        for cuts in SPLITS:
            per_text, kl = measure(model, corpus, reference, cuts, codec, sizes)
            worst = min(worst, *(1 - per_text[n] / ids.shape[1] for n, ids in corpus.items()))
            flips, kls = flips + sum(per_text.values()), kls + [kl]
        agreement = 1 - flips / (len(SPLITS) * tokens(corpus))
        size = sum(sizes) / len(sizes)
        lines.append(
            f"| {rate:g} | {size:.1f} | {size / hidden:.3f} | {100 * worst:.2f}% | {100 * agreement:.2f}% | {flips} | "
            f"{100 * below_threshold_chance(1 - agreement):.1f}% | {sum(kls) / len(kls):.1e} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", default="bf16,int8-fixed,int8,bnb8")
    parser.add_argument("--rates", default=None, help="comma-separated steps per RMS for the int8 codec: writes codec_rate.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = resolve_model_dir(None)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    corpus = {name: torch.tensor([tokenizer(text)["input_ids"][:MAX_TOKENS]]) for name, text in texts().items()}
    reference = {name: run_with_codec(model, ids, (), None) for name, ids in corpus.items()}
    command = "python -m bench.codec_texts" + (f" --rates {args.rates}" if args.rates else "")
    lines = [
        f"Teacher-forced prefill of each text (at most {MAX_TOKENS} tokens) with the codec at both cuts, "
        f"against the same model without it (`{command}`). Machine: {machine()}.",
        "",
    ]
    if args.rates:
        lines += rate_table(model, corpus, reference, [float(r) for r in args.rates.split(",")])
    else:
        lines += codec_table(model, corpus, reference, args.codecs.split(","))
    sizes = ", ".join(f"{name} {ids.shape[1]}" for name, ids in corpus.items())
    lines += ["", f"Tokens per text: {sizes}. At 99.5% a text of 1,200 tokens may differ in 6 tokens."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("codec_rate.md" if args.rates else "codec_texts.md")).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
