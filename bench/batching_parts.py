"""Where a batching cloud's CPU goes: the bench's sessions replayed in one process, timed part by part.

    python -m bench.batching_parts [--sessions 1 8] [--new-tokens 32] [--repeats 2] -> results/batching_parts.md

The requests of `bench.cloud_batching`'s edges (their prompts and seeds, default moving sets, int8, fp32)
are recorded once, then replayed into Cloud sessions that share one Batcher, each session from its own
thread as the server's compute threads run them, but without gRPC, the event loop or edges beside them.
The cloud is built as a batching server builds it (column-major weights, then panels where the kernel
runs; one torch thread). The process's CPU time per token compares with the server's
(`bench.cloud_batching --replay`). The parts are thread CPU time (`time.thread_time`, so a wait costs
nothing) inside timing wrappers put around: the linear layers' products, the packed cache appends and the
attention function, the decoder layer calls, the batcher's runs, and `Cloud.handle` in the sessions'
threads (the message path: decode, checks, encode; its wait for the batch is not CPU). Parts nest: the
products and the attention are inside the layer calls, which are inside the batcher's runs.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from bench.common import machine

RESULTS = Path(__file__).resolve().parent.parent / "results"
PARTS = ("message path", "batcher runs", "layer calls", "products", "attention", "cache appends")

_spent: defaultdict[str, float] = defaultdict(float)
_spent_lock = threading.Lock()
_layer_rows: list[int] = []


def timed(part: str, function: Callable) -> Callable:
    """`function`, with the calling thread's CPU time inside it added to `part`."""
    def wrapper(*args, **kwargs):
        began = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            with _spent_lock:
                _spent[part] += time.thread_time() - began
    return wrapper


def instrument(part_module) -> None:
    """Wrap the parts named in PARTS where they are looked up at call time."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from src.cloud import Cloud
    from src.models import SplitLlamaModel
    from src.serve import batching

    def run_layer(self, index, states, chunk, cache):
        _layer_rows.append(states.shape[1])
        return layer_call(self, index, states, chunk, cache)

    layer_call = timed("layer calls", SplitLlamaModel.run_layer)
    SplitLlamaModel.run_layer = run_layer  # type: ignore[method-assign]
    Cloud.handle = timed("message path", Cloud.handle)  # type: ignore[method-assign]
    batching.run_layers_together = timed("batcher runs", batching.run_layers_together)
    batching.PackedCache.update = timed("cache appends", batching.PackedCache.update)  # type: ignore[method-assign]
    ALL_ATTENTION_FUNCTIONS.register(batching.PACKED_ATTENTION, timed("attention", batching.packed_attention))
    for linear in {type(m) for m in part_module.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")}:
        linear.forward = timed("products", linear.forward)


def replay(part, schedule, sessions: list[list[bytes]], new_tokens: int) -> dict:
    """The sessions at once, each from its own thread, over one Batcher: CPU per token, by part."""
    from src.cloud import Cloud
    from src.serve.batching import Batcher
    from src.utils import adopt_torch_threads

    batcher = Batcher(0.1)  # the server's default window
    clouds = [Cloud(schedule, part) for _ in sessions]
    start = threading.Barrier(len(sessions) + 1)

    def session(cloud: Cloud, requests: list[bytes]) -> None:
        adopt_torch_threads()  # as the server's compute threads do
        cloud.batcher = batcher
        start.wait()
        for request in requests:
            cloud.handle(request)
        batcher.forget(cloud)

    threads = [threading.Thread(target=session, args=pair) for pair in zip(clouds, sessions)]
    for thread in threads:
        thread.start()
    _spent.clear()
    _layer_rows.clear()
    began = time.process_time()
    start.wait()
    for thread in threads:
        thread.join()
    tokens = len(sessions) * new_tokens
    return dict(sessions=len(sessions), cpu=(time.process_time() - began) / tokens,
                parts={part: _spent[part] / tokens for part in PARTS}, batches=batcher.batches,
                layer_calls=len(_layer_rows), rows=statistics.mean(_layer_rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the session counts")
    args = parser.parse_args()

    import torch

    from bench.cloud_batching import record_sessions
    from src.checkpoint import load_config, resolve_model_dir
    from src.pipeline import build_cloud
    from src.schedule import SplitSchedule
    from src.serve.batching import enable_packing
    from src.serve.cloud_server import DEFAULT_FIRST, DEFAULT_SECOND
    from src.panels import use_panels
    from src.utils import parse_layer_set

    torch.set_num_threads(1)  # the bench's server runs one torch thread
    sessions = record_sessions(max(args.sessions), args.new_tokens)
    model_dir = resolve_model_dir(None)
    config = load_config(model_dir)
    first, second = parse_layer_set(DEFAULT_FIRST, "--first"), parse_layer_set(DEFAULT_SECOND, "--second")
    schedule = SplitSchedule(tuple(first), tuple(second), config.num_hidden_layers)
    cloud = build_cloud(model_dir, config, schedule, column_major=True)
    enable_packing(cloud.part)
    panels = use_panels(cloud.part)
    instrument(cloud.part)
    runs = []
    for _ in range(args.repeats):
        for count in args.sessions:
            runs.append(replay(cloud.part, schedule, sessions[:count], args.new_tokens))
            print(runs[-1], flush=True)

    lines = [f"# Where a batching cloud's CPU goes\n\nMachine: {machine()}. The requests of `bench.cloud_batching`'s edges "
             f"(embedded model, default moving sets, int8, fp32, {args.new_tokens} new tokens each) replayed in one process into "
             f"Cloud sessions sharing one Batcher, one thread per session (`python -m bench.batching_parts`); products "
             f"{'in the panel kernel' if panels is None else 'torch: ' + panels}. Thread CPU ms per token served; parts nest "
             "(products and attention within the layer calls, within the batcher's runs).\n",
             "| round | sessions | CPU ms per token | vs one session | " + " | ".join(PARTS) + " | batches | layer calls per batch | rows per layer call (mean) |",
             "|---" * (7 + len(PARTS)) + "|"]
    for index, run in enumerate(runs):
        alone = next(r for r in runs[index - index % len(args.sessions):] if r["sessions"] == min(args.sessions))
        lines.append(f"| {index // len(args.sessions) + 1} | {run['sessions']} | {1e3 * run['cpu']:.2f} | {run['cpu'] / alone['cpu']:.3f}x | "
                     + " | ".join(f"{1e3 * run['parts'][part]:.2f}" for part in PARTS)
                     + f" | {run['batches']} | {run['layer_calls'] / run['batches']:.1f} | {run['rows']:.1f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batching_parts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
