"""The cloud server's resident memory after a burst of large sessions, against its steady state.

    python -m bench.grpc_memory [--module cloud_server]

Starts `python -m src.<module>` on a free loopback port (embedded model, default sets,
--max-sessions 4, one thread), then reads its RSS (Stats):
1. steady state: after 12 small sessions (31-token prompts, 4 tokens), 4 at a time;
2. the peak during a burst of 4 concurrent sessions with 2,048-token prompts;
3. 3 s after the burst, and after 12 more small sessions.
`--module` names another server module with the same command line (an older copy, to compare).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from src.link.grpc_link import GrpcLink
from src.pipeline import RemoteCloud, build_pipeline

ROOT = Path(__file__).resolve().parent.parent
FIRST, SECOND = set(range(1, 7)), set(range(24, 30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", default="cloud_server")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    log_path = Path(tempfile.mkstemp(suffix=".log")[1])
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", f"src.{args.module}", "--port", "0", "--threads", "1", "--max-sessions", "4"],
                                  cwd=ROOT, stderr=log)
    try:
        while not (match := re.search(r"listening on (\S+)", log_path.read_text())):
            if server.poll() is not None:
                raise SystemExit(log_path.read_text())
            time.sleep(0.2)
        url = f"grpc://{match.group(1)}"
        edges = [build_pipeline(None, FIRST, SECOND, "int8", seed=i, with_tokenizer=False, remote=RemoteCloud(url)).edge for i in range(4)]

        def rss() -> float:
            with GrpcLink(url) as link:
                return link.stats()["rss_bytes"] / 2**20

        def at_once(work) -> None:
            threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                peaks.append(rss())
                time.sleep(0.5)

        def small(i: int) -> None:
            for _ in range(3):
                edges[i].generate([1] + list(range(100, 130)), 4)
                edges[i].link.end_session()

        def large(i: int) -> None:
            edges[i].generate([1] + [(7 * j + i) % 40000 + 50 for j in range(2047)], 2)
            edges[i].link.end_session()

        peaks: list[float] = []
        at_once(small)
        time.sleep(2)
        steady = rss()
        peaks.clear()
        began = time.monotonic()
        at_once(large)
        seconds, peak = time.monotonic() - began, max(peaks)
        time.sleep(3)
        after = rss()
        at_once(small)
        time.sleep(2)
        final = rss()
        print(f"{args.module}: steady {steady:.0f} MiB, peak during the burst {peak:.0f} MiB ({seconds:.0f} s), 3 s after it "
              f"{after:.0f} MiB ({100 * (after / steady - 1):+.1f}%), after 12 more small sessions {final:.0f} MiB "
              f"({100 * (final / steady - 1):+.1f}%)")
        for edge in edges:
            edge.link.close()
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
