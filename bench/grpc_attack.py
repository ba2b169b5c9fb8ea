"""Attack a local cloud server on 127.0.0.1 with bounded loops, and print how it answered.

    python -m bench.grpc_attack

Starts `python -m src.serve.cloud_server` on a free loopback port (embedded model, default sets,
--max-sessions 2, a token, --connection-idle 3, one thread), then sends: messages over the byte
limit, garbage, a corrupted payload, a step that jumps past the context, a claim of 2^20
positions, int8 steps of 1e6 and 1e30, huge `none` values; opens 600 silent TCP connections and
100 idle HTTP/2 connections; runs a 10 s cancel storm of 1,024-position prefills from 10 clients;
and serves a legitimate prefill afterwards. Nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import argparse
import os
import queue
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from src.link import protocol
from src.checkpoint import load_config, resolve_model_dir
from src.link.codec import get_codec
from src.link.grpc_link import GrpcLink, LinkError
from src.schedule import SplitSchedule

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "attack-token"


def main() -> None:
    # No options: --help says what the run does and writes, before it starts; anything else is refused.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    folder = resolve_model_dir(None)
    config = load_config(folder)
    hidden = config.hidden_size
    tmp = Path(tempfile.mkdtemp())
    (tmp / "token").write_text(TOKEN)
    log_path = tmp / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "src.serve.cloud_server", "--port", "0", "--threads", "1", "--max-sessions", "2",
             "--connection-idle", "3", "--token-file", str(tmp / "token")], cwd=ROOT, stderr=log)
    while not (match := re.search(r"listening on 127.0.0.1:(\d+)", log_path.read_text())):
        time.sleep(0.2)
    port = int(match.group(1))
    url = f"grpc://127.0.0.1:{port}"
    auth = (("authorization", f"Bearer {TOKEN}"),)
    schedule = SplitSchedule(tuple(range(1, 7)), tuple(range(24, 30)), config.num_hidden_layers)
    start = protocol.encode_start(0, 1, schedule.fingerprint(), hidden)

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{server.pid}/fd"))

    def stats() -> dict:
        with GrpcLink(url, token=TOKEN, timeout=10) as link:
            return link.stats()

    def attempt(name: str, messages: list[bytes], timeout: float = 120) -> None:
        began = time.monotonic()
        with GrpcLink(url, token=TOKEN, timeout=timeout) as link:
            try:
                for message in messages:
                    link.request(message)
                outcome = "served"
            except LinkError as error:
                outcome = f"{error.code}: {str(error)[:120]}"
        print(f"{name:34s} {time.monotonic() - began:6.2f} s  {outcome}", flush=True)

    try:
        first = stats()
        print(f"RSS at start {first['rss_bytes'] >> 20} MiB; descriptors {descriptors()}")
        limit = first["limits"]["message_bytes"]
        attempt("limit + 1 bytes", [start, b"x" * (limit + 1)])
        attempt("3 x limit bytes", [start, b"x" * (3 * limit)])
        rng = random.Random(0)
        for i in range(3):
            attempt(f"garbage {i}", [start, rng.randbytes(rng.randint(0, 5000))])
        good = protocol.encode_hidden(0, 0, torch.randn(8, hidden), get_codec("int8"))
        attempt("valid header, one payload byte flipped", [start, good[:30] + bytes([good[30] ^ 0xFF]) + good[31:]])
        prefill = protocol.encode_hidden(0, 0, torch.randn(2048, hidden), get_codec("int8"))
        jump = protocol._pack(protocol.Kind.HIDDEN, 0, 0, hidden, 6200, 2048, 6200, b"")
        attempt("prefill 2048, then a jump to 8248", [start, prefill, jump])
        attempt("2^20 positions claimed", [start, protocol._pack(protocol.Kind.HIDDEN, 0, 0, hidden, 0, 0, 1 << 20, b"")])
        for value in (1e6, 1e30):
            payload = bytearray(good[protocol.HEADER_SIZE:])
            payload[:16] = torch.full((8,), value).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
            attempt(f"int8 step {value:g}", [start, protocol._pack(protocol.Kind.HIDDEN, 5, 0, hidden, 0, 0, 8, bytes(payload))])
        attempt("none, values 1e30", [start, protocol.encode_hidden(0, 0, torch.full((8, hidden), 1e30), get_codec("none"))])
        print(f"RSS {stats()['rss_bytes'] >> 20} MiB; a traceback in the log: {'Traceback' in log_path.read_text()}")

        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(600)]
        time.sleep(0.5)
        try:
            stats()
            served = "served"
        except LinkError as error:
            served = f"refused ({error.code})"
        print(f"600 silent TCP connections: descriptors {descriptors()}; a Stats call meanwhile: {served}")
        time.sleep(6)
        print(f"6 s later (handshake timeout 5 s): descriptors {descriptors()}")
        for sock in silent:
            sock.close()
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(100)]
        for channel in channels:
            try:
                grpc.channel_ready_future(channel).result(timeout=5)
            except grpc.FutureTimeoutError:
                pass
        print(f"100 idle HTTP/2 connections: descriptors {descriptors()}")
        time.sleep(5)
        print(f"5 s later (--connection-idle 3): descriptors {descriptors()}")
        for channel in channels:
            channel.close()

        storm_prefill = protocol.encode_hidden(0, 0, torch.randn(1024, hidden), get_codec("int8"))
        stop_at = time.monotonic() + 10

        def storm() -> None:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            method = channel.stream_stream("/triadic.Cloud/Session")
            while time.monotonic() < stop_at:
                requests: queue.Queue = queue.Queue()
                call = method(iter(requests.get, None), metadata=auth)
                requests.put(start)
                try:
                    next(call)
                except grpc.RpcError:
                    time.sleep(0.01)
                    continue
                requests.put(storm_prefill)
                time.sleep(0.05)
                call.cancel()
            channel.close()

        threads = [threading.Thread(target=storm) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(1)
        after = stats()
        print("cancel storm (10 clients, 10 s):", {k: after[k] for k in ("sessions", "computations_total", "computations_stopped",
                                                                           "max_computations_running", "refusals")})
        attempt("a legitimate 1,024-position prefill", [start, storm_prefill])
        print(f"RSS at the end {stats()['rss_bytes'] >> 20} MiB; descriptors {descriptors()}")
    finally:
        server.terminate()
        server.wait(30)
    text = log_path.read_text()
    print(f"server log: {len(text.splitlines())} lines, a traceback: {'Traceback' in text}")


if __name__ == "__main__":
    main()
