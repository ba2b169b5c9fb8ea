"""What the HTTP layer costs: the edge server's tokens/s against the same Edge called in this process.

    python -m bench.edge_server [--tokens 128] [--runs 3]  ->  results/edge_server.md

Starts `python -m src.serve.edge_server` (embedded model, main_3_split.py's sets, int8, cloud in its
process, one torch thread) on a free loopback port and builds the same pipeline here. Alternates, per
run: `Edge.generate` here; a non-streaming request; a streaming request (time to the first token's
chunk, and to [DONE]). Medians of the runs after one warm-up each.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

from bench.common import machine
from src.cli import eos_token_ids
from src.pipeline import build_pipeline

ROOT = Path(__file__).resolve().parent.parent
FIRST, SECOND = set(range(1, 7)), set(range(24, 30))
MESSAGES = [{"role": "user", "content": "Tell me about Japan."}]


def start_server() -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "src.serve.edge_server", "--port", "0", "--threads", "1", "--no-unsplit"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    for line in server.stderr:
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # drain its log
            return server, match.group(1)
    raise SystemExit(f"edge server exited with {server.wait()}")


def request(url: str, tokens: int, stream: bool) -> tuple[float, float, int]:
    """(seconds to the first token's chunk, seconds in all, tokens generated)."""
    body = {"messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    call = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    began = time.perf_counter()
    first = None
    with urllib.request.urlopen(call, timeout=600) as response:
        if not stream:
            reply = json.load(response)
            return float("nan"), time.perf_counter() - began, reply["usage"]["completion_tokens"]
        generated = 0
        for line in response:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("split_trace", {}).get("tokens") and first is None:
                    first = time.perf_counter() - began
                if chunk.get("usage"):
                    generated = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - began, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pipeline = build_pipeline(None, FIRST, SECOND, "int8")
    ids = list(pipeline.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    eos = eos_token_ids(pipeline.tokenizer, pipeline.config)
    server, url = start_server()
    rows: dict[str, list[tuple[float, float, int]]] = {"in process": [], "server": [], "server, streaming": []}
    try:
        for run in range(args.runs + 1):
            began = time.perf_counter()
            result = pipeline.edge.generate(ids, args.tokens, eos)
            direct = (result.step_seconds[0], time.perf_counter() - began, len(result.token_ids))
            whole = request(url, args.tokens, stream=False)
            streamed = request(url, args.tokens, stream=True)
            if run > 0:  # the first run warms up
                rows["in process"].append(direct)
                rows["server"].append(whole)
                rows["server, streaming"].append(streamed)
    finally:
        server.terminate()
        server.wait(30)
    base = statistics.median(n / seconds for _, seconds, n in rows["in process"])
    lines = [
        "# Edge server overhead", "",
        f"`python -m bench.edge_server --tokens {args.tokens} --runs {args.runs}`: {machine()}; embedded SmolLM2-135M-Instruct,",
        "sets {1..6}/{24..29}, int8, cloud in the same process, greedy, one torch thread per process.",
        "Both processes share the machine (alternated runs); medians over the runs.", "",
        "| path | first token (s) | tokens | tokens/s (wall) | vs in process |", "|---|---|---|---|---|",
    ]
    for name, values in rows.items():
        rate = statistics.median(n / seconds for _, seconds, n in values)
        first = statistics.median(f for f, _, _ in values)
        first_text = "-" if first != first else f"{first:.3f}"  # NaN: a non-streaming reply has no first token
        lines.append(f"| {name} | {first_text} | {values[0][2]} | {rate:.1f} | {rate / base:.2f}x |")
    text = "\n".join(lines) + "\n"
    (ROOT / "results" / "edge_server.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
