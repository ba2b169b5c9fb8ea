"""Cloud throughput with many edges: the server's CPU time per token served, batching on and off.

    python -m bench.cloud_batching [--edges 1 2 4 8 16] [--windows off 2 100] [--new-tokens 32] [--repeats 3] [--replay]
      -> results/cloud_batching.md, results/cloud_batching.png (--replay: results/cloud_batching_replay.md)

One gRPC cloud server on loopback (embedded model, default moving sets, one torch thread) per
batching window ("off": no batching), and N edges as separate processes, each with its own prompt, int8, in
`--dtype` on both sides (float32, the server's default, or bfloat16 -> results/cloud_batching_bfloat16.md).
Every edge loads its model, says it is ready, and all start generating together. On a 2-core
machine the edges' own compute shares the cores with the server, so the server's CPU time (utime +
stime from /proc, over the generation) per token served is the fair measure of what batching saves;
aggregate tokens/s and each edge's time per token are reported as well.

`--replay` takes the edges' compute off the machine: each edge's requests are recorded once (in
process, the same prompts and seeds), and N light clients send them again over gRPC, each the next
request as soon as its reply is in. The server then does the same work without edges sharing its
cores and memory bandwidth; whether that changes its CPU per token tells how much of it the
co-running edges cause.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
from pathlib import Path

from bench.common import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
PROMPTS = [
    "Tell me about Japan.", "Describe a sunset over the sea.", "Plan a one-day trip to Paris.", "What is a prime number?",
    "Write a haiku about rain.", "How do bees make honey?", "Explain photosynthesis simply.", "Name three uses of copper.",
    "Why is the sky blue?", "Give tips for learning to cook.", "What causes tides?", "Describe a busy market.",
    "How does a bicycle stay upright?", "Summarize the water cycle.", "What is a black hole?", "Suggest a name for a cat.",
]

EDGE = """
import json, sys, time, torch
torch.set_num_threads(1)
from src.checkpoint import resolve_model_dir
from src.pipeline import RemoteCloud, SideOptions, build_pipeline
from src.utils import format_prompt
model_dir = resolve_model_dir(None)
side = SideOptions(dtype=getattr(torch, sys.argv[5]))
pipeline = build_pipeline(str(model_dir), set(range(1, 7)), set(range(24, 30)), "int8", seed=int(sys.argv[3]), remote=RemoteCloud(sys.argv[1]),
                          edge_side=side)
prompt = format_prompt(pipeline.tokenizer, sys.argv[2], "chat")
print("ready", flush=True)
sys.stdin.readline()
began = time.time()
result = pipeline.edge.generate(prompt, int(sys.argv[4]))
ended = time.time()
pipeline.edge.link.close()
print(json.dumps(dict(began=began, ended=ended, tokens=len(result.token_ids), step_seconds=sum(result.step_seconds))), flush=True)
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batching_stats(url: str) -> dict:
    """The server's batching counters (Stats): batches run and steps served so far; empty without batching."""
    import grpc

    from src.link.grpc_link import STATS_METHOD

    with grpc.insecure_channel(url.removeprefix("grpc://")) as channel:
        report = json.loads(channel.unary_unary(STATS_METHOD)(b"", timeout=10))
    return report["batching"] or {}


def start_server(window: str, dtype: str = "float32") -> tuple[subprocess.Popen, str]:
    batching = ["--no-batching"] if window == "off" else ["--batch-window-ms", window]
    server = subprocess.Popen(
        [sys.executable, "-m", "src.serve.cloud_server", "--port", "0", "--max-sessions", "16", "--threads", "1",
         "--cloud-dtype", dtype, *batching],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    for line in server.stderr:
        match = re.search(r"listening on (\S+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
            return server, f"grpc://{match.group(1)}"
    raise RuntimeError("the cloud server did not start")


def record_sessions(count: int, new_tokens: int, dtype: str = "float32") -> list[list[bytes]]:
    """The requests each bench edge sends (its prompt, its seed), recorded from an in-process run."""
    import dataclasses

    import torch

    from src.serve.cloud_server import DEFAULT_FIRST, DEFAULT_SECOND
    from src.pipeline import SideOptions, build_pipeline
    from src.utils import format_prompt, parse_layer_set

    torch.set_num_threads(1)
    side = SideOptions(dtype=getattr(torch, dtype))
    first, second = parse_layer_set(DEFAULT_FIRST, "--first"), parse_layer_set(DEFAULT_SECOND, "--second")  # the server's
    pipeline = build_pipeline(None, first, second, "int8", edge_side=side, cloud_side=side)
    edge, send = pipeline.edge, pipeline.edge.link.request
    sessions = []
    for i in range(count):
        edge.schedule = dataclasses.replace(edge.schedule, seed=i)  # the cloud takes the seed from START
        requests: list[bytes] = []
        edge.link.request = lambda data, requests=requests: requests.append(bytes(data)) or send(data)
        edge.generate(format_prompt(pipeline.tokenizer, PROMPTS[i % len(PROMPTS)], "chat"), new_tokens)
        sessions.append(requests)
    edge.link.request = send
    return sessions


def replay_sessions(server: subprocess.Popen, url: str, sessions: list[list[bytes]], new_tokens: int) -> dict:
    """`run_edges` with recorded requests sent by client threads in place of edges: the server's work without the edges'."""
    import time

    from src.link.grpc_link import GrpcLink

    links = [GrpcLink(url) for _ in sessions]
    ready = threading.Barrier(len(sessions) + 1, timeout=120)
    spans: list[tuple[float, float]] = []
    failures: list[BaseException] = []

    def client(link: GrpcLink, requests: list[bytes]) -> None:
        ready.wait()
        began = time.time()
        try:
            for data in requests:
                link.request(data)
        except BaseException as error:  # noqa: BLE001 (raised below, in the bench's thread)
            failures.append(error)
            return
        spans.append((began, time.time()))
        link.end_session()

    threads = [threading.Thread(target=client, args=pair) for pair in zip(links, sessions)]
    for thread in threads:
        thread.start()
    counted = batching_stats(url)
    before = cpu_seconds(server.pid)
    ready.wait()
    for thread in threads:
        thread.join()
    server_cpu = cpu_seconds(server.pid) - before
    now = batching_stats(url)
    for link in links:
        link.close()
    if failures:
        raise RuntimeError(f"{len(failures)} replayed session(s) failed: {failures[0]}")
    return row(len(sessions), new_tokens * len(sessions), server_cpu, max(e for _, e in spans) - min(b for b, _ in spans),
               [1e3 * (e - b) / new_tokens for b, e in spans], counted, now)


def row(edges: int, tokens: int, server_cpu: float, span: float, latencies_ms: list[float], counted: dict, now: dict) -> dict:
    """One measurement: server CPU per token, aggregate tokens/s over `span`, the median edge latency, and how full
    the batches were between the server's stats `counted` (before) and `now`."""
    batches = now.get("batches", 0) - counted.get("batches", 0)
    return dict(edges=edges, tokens=tokens, server_cpu_per_token=server_cpu / tokens, aggregate=tokens / span,
                latency_ms=statistics.median(latencies_ms),
                steps_per_batch=(now["steps"] - counted["steps"]) / batches if batches else None)


def run_edges(server: subprocess.Popen, url: str, count: int, new_tokens: int, dtype: str = "float32") -> dict:
    edges = [subprocess.Popen([sys.executable, "-c", EDGE, url, PROMPTS[i % len(PROMPTS)], str(i), str(new_tokens), dtype],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for i in range(count)]
    try:
        for edge in edges:
            if edge.stdout.readline().strip() != "ready":
                raise RuntimeError("an edge did not start")
        counted = batching_stats(url)
        before = cpu_seconds(server.pid)
        for edge in edges:
            edge.stdin.write("go\n")
            edge.stdin.flush()
        reports = [json.loads(edge.stdout.readline()) for edge in edges]
        server_cpu = cpu_seconds(server.pid) - before
        now = batching_stats(url)
    finally:
        for edge in edges:
            edge.wait(timeout=60)
    return row(count, sum(r["tokens"] for r in reports), server_cpu, max(r["ended"] for r in reports) - min(r["began"] for r in reports),
               [1e3 * r["step_seconds"] / r["tokens"] for r in reports], counted, now)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--windows", nargs="+", default=["off", "2", "100"], help="batching windows in ms, or off (100: the server's default)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the edge counts; each row is the median round")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides' compute dtype")
    parser.add_argument("--replay", action="store_true", help="recorded requests from light clients in place of edges")
    args = parser.parse_args()
    sessions = record_sessions(max(args.edges), args.new_tokens, args.dtype) if args.replay else None
    rows = []
    for window in args.windows:
        server, url = start_server(window, args.dtype)
        try:
            runs: dict[int, list[dict]] = {count: [] for count in args.edges}
            for _ in range(args.repeats):  # rounds over all edge counts, so drift hits every count alike
                for count in args.edges:
                    runs[count].append(replay_sessions(server, url, sessions[:count], args.new_tokens) if args.replay
                                       else run_edges(server, url, count, args.new_tokens, args.dtype))
                    print(json.dumps(runs[count][-1] | {"window_ms": window}), flush=True)
            rows += summarized(runs, window)
        finally:
            server.terminate()
            server.wait(timeout=30)
    write_results(rows, args)


def summarized(runs: dict[int, list[dict]], window: str) -> list[dict]:
    """One row per edge count: its median round by server CPU per token, every round's figure, and each round's ratio to
    one edge alone in the same round (the host's drift between rounds cancels)."""
    rows = []
    for count, rounds in runs.items():
        ordered = sorted(rounds, key=lambda r: r["server_cpu_per_token"])
        ratios = sorted(r["server_cpu_per_token"] / a["server_cpu_per_token"] for r, a in zip(rounds, runs.get(1, [])))
        rows.append(ordered[len(ordered) // 2] | {"window_ms": window, "spread": [r["server_cpu_per_token"] for r in ordered],
                                                  "paired": ratios})
    return rows


def write_results(rows: list[dict], args: argparse.Namespace) -> None:
    """The table (results/cloud_batching*.md) and its plot."""
    suffix = ("" if args.dtype == "float32" else f"_{args.dtype}") + ("_replay" if args.replay else "")
    clients = ("each edge's recorded requests sent again by a client thread of one process (no edge computes)" if args.replay
               else "each edge a separate process")
    lines = [f"# Cloud throughput with many edges\n\nMachine: {machine()}. Embedded model, default moving sets, int8, {args.dtype} "
             f"on both sides, {args.new_tokens} new tokens per edge, {clients} on loopback gRPC; the server has "
             f"one torch thread (`python -m bench.cloud_batching --dtype {args.dtype}{' --replay' if args.replay else ''}`). "
             f"Each row is the median of {args.repeats} rounds over all edge counts; the paired column is the median (and range) of "
             f"each round's ratio to one edge alone in that round; the last column gives every round's server CPU ms per token.\n",
             "| batching window (ms) | edges | tokens | server CPU ms per token | vs one edge alone | paired, per round | aggregate tokens/s "
             "| per-edge ms per token (median) | steps per batch | rounds (server CPU ms per token) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        alone = next((r for r in rows if r["window_ms"] == row["window_ms"] and r["edges"] == 1), row)
        lines.append(f"| {row['window_ms']} | {row['edges']} | {row['tokens']} | {1e3 * row['server_cpu_per_token']:.1f} | "
                     f"{row['server_cpu_per_token'] / alone['server_cpu_per_token']:.2f}x | {paired(row['paired'])} | "
                     f"{row['aggregate']:.1f} | {row['latency_ms']:.0f} | "
                     f"{'-' if row['steps_per_batch'] is None else format(row['steps_per_batch'], '.2f')} | "
                     f"{', '.join(f'{1e3 * x:.1f}' for x in row['spread'])} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"cloud_batching{suffix}.md").write_text("\n".join(lines) + f"\n\n![cloud batching](cloud_batching{suffix}.png)\n")
    plot(rows, RESULTS / f"cloud_batching{suffix}.png")
    print("\n".join(lines))


def paired(ratios: list[float]) -> str:
    """Sorted per-round ratios as 'median (min-max)', '-' without one-edge rounds to pair with."""
    if not ratios:
        return "-"
    return f"{ratios[len(ratios) // 2]:.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for window in dict.fromkeys(r["window_ms"] for r in rows):
        mine = [r for r in rows if r["window_ms"] == window]
        label = "batching off" if window == "off" else f"batching, window {window} ms"
        xs = [r["edges"] for r in mine]
        axes[0].plot(xs, [1e3 * r["server_cpu_per_token"] for r in mine], marker="o", label=label)
        axes[1].plot(xs, [r["aggregate"] for r in mine], marker="o", label=label)
        axes[2].plot(xs, [r["latency_ms"] for r in mine], marker="o", label=label)
    for axis, title in zip(axes, ("server CPU ms per token", "aggregate tokens/s", "per-edge ms per token")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent edges")
        axis.set_title(title)
        axis.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
