"""The command line, `python -m bench.privacy`: loads the embedded model, fits the attacks on the
training texts, runs the experiments and writes the report and plots."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench import privacy
from bench.common import parse_sets
from bench.privacy.attacks import LayerClassifier, Matcher, TokenProbe, clean_states, text_ids
from bench.privacy.experiments import SWEEP_LAYERS, Context, mitigation, outputs, random_splits, sweep
from bench.privacy.report import write_plots, write_report

TRAIN_TEXTS = ("train_kitchen_science.txt", "train_travel_letters.txt")
TEST_TEXT = "heldout_lighthouse.txt"
SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.privacy", description=privacy.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-tokens", type=int, default=384, help="held-out tokens for the fixed-cut sweep and the mitigation curve")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens of the random-split run (then --forced steps)")
    parser.add_argument("--forced", type=int, default=160, help="teacher-forced steps of the random-split run")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy new tokens of the output-recovery runs")
    parser.add_argument("--candidates", type=int, default=8, help="matcher candidates per position (ridge top-K)")
    parser.add_argument("--sweep-codecs", default="none,int8,fp16,bf16,bnb8", help="codecs of the sweep (the matcher runs on none and int8)")
    parser.add_argument("--first", default="1-6")
    parser.add_argument("--second", default="24-29")
    parser.add_argument("--codec", default="int8", help="codec of the random-split and mitigation runs")
    parser.add_argument("--mitigation-layer", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine, 2 threads were up to 40x slower)")
    args = parser.parse_args(argv)
    first, second = parse_sets(parser, args)
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM

    from bench.common import machine
    from src.checkpoint import load_config, load_tokenizer, resolve_model_dir
    from src.pipeline import build_pipeline
    from src.utils import log

    model_dir = resolve_model_dir(None)
    config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)

    def build(first_set, second_set, codec_name):
        return build_pipeline(str(model_dir), set(first_set), set(second_set), codec_name, seed=args.seed, with_tokenizer=False)

    train_ids = [t for name in TRAIN_TEXTS for t in text_ids(tokenizer, name)]
    test_ids = text_ids(tokenizer, TEST_TEXT)
    needed = set(SWEEP_LAYERS) | first | {args.mitigation_layer}
    log(f"clean training states: {len(train_ids)} tokens, layers {sorted(needed)}")
    train_states, train_tokens = clean_states(model, train_ids, needed)
    embeddings = model.model.embed_tokens.weight.detach().float()
    ctx = Context(model_dir, config, model, embeddings, train_states, train_tokens, test_ids, candidates=args.candidates)
    ctx.matcher = Matcher(model)
    for k in sorted(needed):
        ctx.probes[k] = TokenProbe.fit(embeddings, train_states[k], train_tokens)
    lambdas = {k: p.ridge.lam for k, p in ctx.probes.items()}
    log(f"probes fitted ({time.perf_counter() - began:.0f} s); lambdas {lambdas}")
    classifier = LayerClassifier(sorted(first), train_states)

    codecs = tuple(args.sweep_codecs.split(","))
    log("1. fixed-cut sweep")
    sweep_rows = sweep(ctx, build, args.sweep_tokens, codecs, log)
    log("2. random cuts")
    random_row = random_splits(ctx, build, first, second, args.codec, args.prompt, args.forced, classifier, log)
    random_row["n_forced"] = args.forced
    log("3. output recovery")
    L = config.num_hidden_layers
    configs = [({1}, {L - 1}, args.codec), ({max(first)}, {min(second)}, args.codec), (first, second, args.codec), (first, second, "none")]
    output_rows = outputs(ctx, build, configs, args.prompt, args.new_tokens, log)
    for row in output_rows:
        row["prompt"] = args.prompt
    log("4. uplink noise")
    mitigation_rows = mitigation(ctx, build, args.mitigation_layer, args.codec, SIGMAS, args.sweep_tokens, log)
    for row in mitigation_rows:
        row["tokens"] = args.sweep_tokens - 1

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plots(out_dir, sweep_rows, random_row, first, mitigation_rows, args.mitigation_layer)
    runtime = time.perf_counter() - began
    command = "python -m bench.privacy" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    write_report(
        out_dir / "privacy.md", machine=machine(), command=command.strip(), runtime=runtime, n_train=len(train_tokens),
        n_sweep=args.sweep_tokens, sweep_rows=sweep_rows, codecs=codecs, lambdas=lambdas, random_row=random_row, first=first,
        second=second, codec=args.codec, output_rows=output_rows, mitigation_rows=mitigation_rows, mit_layer=args.mitigation_layer,
        mit_codec=args.codec, candidates=args.candidates, num_layers=config.num_hidden_layers,
    )
    log(f"wrote {out_dir / 'privacy.md'} and the plots in {runtime:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
