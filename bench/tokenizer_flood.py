"""An honest request beside clients that post megabyte messages: how long it waits for its first token.

    python -m bench.tokenizer_flood [--flooders 0 3 8] [--tokens 24] [--runs 3]  ->  results/tokenizer_flood.md

The edge server tokenizes a request's messages before admitting it, so anyone may make it tokenize: a
flooder posts 1 MiB of text in a loop (about 0.5 s to tokenize here, then refused as too long, 400). For
each number of flooders, an honest streaming request ("Tell me about Japan.", greedy) is sent `--runs`
times once they are under way: its time to the first token's chunk, and the median gap between its
tokens. Encodings run one at a time, the shortest waiting one next but every other turn to one that waited
a second (`src/serve/app.py: ShortestFirst`), so the honest request waits for the encoding under way and at most
one more, not for every flooder's.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

from bench.common import machine
from bench.edge_server import ROOT, start_server

HONEST = {"messages": [{"role": "user", "content": "Tell me about Japan."}], "temperature": 0, "stream": True}
FLOOD = json.dumps({"messages": [{"role": "user", "content": "hello world " * 85_000}], "max_tokens": 1}).encode()


def post(url: str, body: bytes) -> http.client.HTTPResponse:
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    return connection.getresponse()


def honest(url: str, tokens: int) -> tuple[float, float]:
    """(seconds to the first token's chunk, median seconds between tokens) of one streaming request."""
    began = time.perf_counter()
    arrivals = []
    with post(url, json.dumps({**HONEST, "max_tokens": tokens}).encode()) as response:
        for line in response:
            if line.startswith(b"data: {") and b'"content"' in line:
                arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return arrivals[0] - began, statistics.median(gaps)


def flood(url: str, stop: threading.Event, answers: list[int]) -> None:
    while not stop.is_set():
        with post(url, FLOOD) as response:
            response.read()
            answers.append(response.status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flooders", type=int, nargs="+", default=[0, 3, 8])
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    server, url = start_server()
    rows = []
    try:
        honest(url, args.tokens)  # warm-up
        for count in args.flooders:
            stop, answers = threading.Event(), []
            threads = [threading.Thread(target=flood, args=(url, stop, answers)) for _ in range(count)]
            for thread in threads:
                thread.start()
            time.sleep(2.0 if count else 0.0)  # the flooders' encodings under way
            runs = [honest(url, args.tokens) for _ in range(args.runs)]
            stop.set()
            for thread in threads:
                thread.join(60)
            refused = sum(status == 400 for status in answers)
            rows.append((count, [first for first, _ in runs], statistics.median(gap for _, gap in runs), refused, len(answers)))
    finally:
        server.terminate()
        server.wait(30)
    lines = [
        "# An honest request beside clients flooding the tokenizer", "",
        f"`python -m bench.tokenizer_flood --flooders {' '.join(map(str, args.flooders))} --tokens {args.tokens} --runs {args.runs}`:"
        f" {machine()}; the edge server on the embedded model (main_3_split.py's sets, int8, cloud in its process, one torch",
        "thread); each flooder posts 1 MiB of text in a loop (refused as too long after tokenizing). Times of the honest",
        "streaming request, sent once the flooders are under way.", "",
        "| flooders | first token (s), median | each run (s) | token gap (ms), median | flooders' requests (400 of all) |",
        "|---|---|---|---|---|",
    ]
    for count, firsts, gap, refused, total in rows:
        lines.append(f"| {count} | {statistics.median(firsts):.2f} | {', '.join(f'{f:.2f}' for f in firsts)} | {1e3 * gap:.0f} |"
                     f" {refused} of {total} |")
    text = "\n".join(lines) + "\n"
    (ROOT / "results" / "tokenizer_flood.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
