"""The gRPC link under load: tokens/s over loopback against in-process, and a soak of many sessions.

    python -m bench.grpc_soak [--sequential 200] [--concurrent 50]  ->  results/grpc.md

Starts `python -m src.serve.cloud_server` on a free loopback port (embedded model, default sets), then:
1. the default settings (int8, random sets) over loopback and in-process, alternated, median of 3;
2. sequential sessions, then concurrent sessions in batches of 4, reading the server's resident
   memory (Stats) after the first 10 sessions and at the end.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import machine
from src.checkpoint import load_tokenizer, resolve_model_dir
from src.link.grpc_link import GrpcLink
from src.pipeline import RemoteCloud, build_pipeline
from src.utils import format_prompt

ROOT = Path(__file__).resolve().parent.parent
FIRST, SECOND = set(range(1, 7)), set(range(24, 30))


def start_server() -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "src.serve.cloud_server", "--port", "0", "--max-sessions", "8", "--threads", "1"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    for line in server.stderr:
        match = re.search(r"listening on (\S+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # drain its log
            return server, f"grpc://{match.group(1)}"
    raise RuntimeError("the cloud server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--soak-tokens", type=int, default=8)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the server has its own thread; two per process thrash on 2 cores
    model_dir = resolve_model_dir(None)
    prompt = format_prompt(load_tokenizer(model_dir), "Tell me about Japan.", "chat")
    server, url = start_server()
    try:
        local = build_pipeline(str(model_dir), FIRST, SECOND, "int8", with_tokenizer=False)
        remote = build_pipeline(str(model_dir), FIRST, SECOND, "int8", with_tokenizer=False, remote=RemoteCloud(url))
        rates = {"in-process": [], "loopback gRPC": []}
        for name, pipeline in [("in-process", local), ("loopback gRPC", remote)] * 4:
            result = pipeline.edge.generate(prompt, args.new_tokens)
            rates[name].append(result.tokens_per_second)
        same = local.edge.generate(prompt, args.new_tokens).token_ids == remote.edge.generate(prompt, args.new_tokens).token_ids
        remote.edge.link.close()
        median = {name: statistics.median(values[1:]) for name, values in rates.items()}  # the first run warms up

        probe = GrpcLink(url)
        rss = []

        def session(seed: int) -> None:
            pipeline = build_pipeline(str(model_dir), FIRST, SECOND, "int8", seed=seed, with_tokenizer=False, remote=RemoteCloud(url))
            try:
                pipeline.edge.generate(prompt, args.soak_tokens)
            finally:
                pipeline.edge.link.close()

        began = time.perf_counter()
        for i in range(args.sequential):
            session(i)
            if i == 9:
                rss.append(probe.stats()["rss_bytes"])
        for batch in range(0, args.concurrent, 4):
            threads = [threading.Thread(target=session, args=(1000 + batch + j,)) for j in range(min(4, args.concurrent - batch))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        stats = probe.stats()
        rss.append(stats["rss_bytes"])
        soak_seconds = time.perf_counter() - began
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = [
        f"# gRPC link\n\nMachine: {machine()}. `python -m bench.grpc_soak`; server and edge on one machine, loopback, "
        f"embedded model, default sets, int8.\n",
        "| link | tokens/s (median of 3 after a warm-up) |\n|---|---|",
        *(f"| {name} | {value:.1f} |" for name, value in median.items()),
        f"\nLoopback / in-process: {median['loopback gRPC'] / median['in-process']:.2f}x; same tokens: {same}.\n",
        f"Soak: {args.sequential} sequential sessions then {args.concurrent} concurrent in batches of 4, "
        f"{args.soak_tokens} tokens each, {soak_seconds:.0f} s. Server RSS after the first 10 sessions "
        f"{rss[0] / 1e6:.0f} MB, at the end {rss[-1] / 1e6:.0f} MB ({100 * (rss[-1] / rss[0] - 1):+.1f}%); "
        f"open sessions at the end: {stats['sessions']}, sessions served: {stats['sessions_total']}.\n",
    ]
    (ROOT / "results" / "grpc.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
