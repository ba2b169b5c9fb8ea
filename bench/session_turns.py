"""What a session saves: each turn of a chat through `edge.session()` against a fresh request per turn.

    python -m bench.session_turns [--codec int8] [--new-tokens 32]   ->  results/session_turns.md

The embedded SmolLM2 under the default random sets; three user turns rendered with the chat template.
Per turn: positions run, layer evaluations (edge + cloud), bytes on the link and seconds, for the
session (only the new positions run) and for a fresh `generate` on the whole conversation (what one
process per turn, as before, had to do). The tokens must be the same both ways.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import machine
from src.cli import eos_token_ids
from src.pipeline import build_pipeline
from src.utils import conversation_ids

TURNS = ["Tell me about Japan.", "What is its capital?", "Name three dishes from there."]
OUT = Path(__file__).resolve().parent.parent / "results" / "session_turns.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    session_side = build_pipeline(None, set(range(1, 7)), set(range(24, 30)), args.codec)
    fresh_side = build_pipeline(None, set(range(1, 7)), set(range(24, 30)), args.codec, with_tokenizer=False)
    tokenizer, eos = session_side.tokenizer, eos_token_ids(session_side.tokenizer, session_side.config)
    rows, messages = [], []
    with session_side.edge.session() as chat:
        for k, user in enumerate(TURNS, 1):
            messages.append({"role": "user", "content": user})
            ids = conversation_ids(tokenizer, messages, "auto")
            runs = {}
            for name, call in (("session", lambda: chat.generate(ids, args.new_tokens, eos)),
                               ("fresh", lambda: fresh_side.edge.generate(ids, args.new_tokens, eos))):
                began = time.perf_counter()
                result = call()
                runs[name] = (result, time.perf_counter() - began)
            session, fresh = runs["session"][0], runs["fresh"][0]
            assert session.token_ids == fresh.token_ids, k
            for name, (result, seconds) in runs.items():
                positions = len(ids) - result.cached_positions + len(result.token_ids) - 1
                rows.append(f"| {k} | {len(ids)} | {name} | {result.cached_positions} | {positions} | "
                            f"{sum(result.layer_evals.values())} | {result.bytes_up + result.bytes_down:,} | {seconds:.2f} |")
                print(rows[-1], flush=True)
            messages.append({"role": "assistant", "content": tokenizer.decode(session.token_ids, skip_special_tokens=True)})
    OUT.write_text(
        f"Three chat turns on the embedded SmolLM2-135M-Instruct, random sets {{1..6}}/{{24..29}}, codec {args.codec}, "
        f"{args.new_tokens} new tokens at most; `python -m bench.session_turns`. {machine()}. Same tokens both ways.\n\n"
        "| turn | conversation tokens | run | cached positions reused | positions run | layer evaluations | bytes on the link | seconds |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
