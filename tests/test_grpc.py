"""The cloud as a gRPC server (src/serve/cloud_server.py) and the edge's GrpcLink (src/link/grpc_link.py), over loopback.

Servers run as subprocesses on free ports over the tiny checkpoint; every generation's tokens are
compared with the in-process run (`build_pipeline(...).edge.generate`, LocalLink).
"""
from __future__ import annotations

import functools
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

grpc = pytest.importorskip("grpc")

from src.link import protocol  # noqa: E402
from src.checkpoint import load_config  # noqa: E402
from src.link.codec import get_codec  # noqa: E402
from src.link.grpc_link import GrpcLink, LinkError, RejectedError, make_link  # noqa: E402
from src.pipeline import RemoteCloud, build_edge, build_pipeline  # noqa: E402
from src.panels import why_no_kernel  # noqa: E402
from src.schedule import SplitSchedule  # noqa: E402
from src.utils import TriadicError  # noqa: E402
from tests.conftest import ROOT, stop_process  # noqa: E402

MOVING = ((0, 1), (2, 3, 4))  # cuts move at every step
FIXED = ((1,), (3,))
TWO = ((1, 2), (4,))  # --two-part: second is {L}
PROMPTS = [[1, 5, 9, 33, 17, 80, 3, 41], [1, 60, 2, 7], [1, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
NEW = 10
TOKEN = "s3cret-token-for-tests"


class Server:
    """`python -m src.serve.cloud_server` as a subprocess; its stderr goes to a file (never a full pipe)."""

    def __init__(self, folder: Path, log: Path, sets, *extra: str) -> None:
        self.folder, self.log, self.sets, self.extra = folder, log, sets, extra
        self.process = None
        self.port = 0

    def start(self, port: int = 0) -> Server:
        first, second = (",".join(map(str, s)) for s in self.sets)
        self.log.write_text("")
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "src.serve.cloud_server", "--host", "127.0.0.1", "--port", str(port or self.port),
             "--base-model", str(self.folder), "--first", first, "--second", second, "--threads", "1", *self.extra],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._log_file,
        )
        return self

    def wait_ready(self, timeout: float = 90.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log.read_text())
            if match:
                self.port = int(match.group(1))
                return self
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}: {self.log.read_text()}")
            time.sleep(0.05)
        pytest.fail(f"server not ready in {timeout} s: {self.log.read_text()}")

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def stop(self) -> int | None:
        if self.process is not None and self.process.poll() is None:
            stop_process(self.process)
        self._log_file.close()
        return self.process.returncode if self.process else None


@contextmanager
def running(servers: Iterable[Server]) -> Iterator[None]:
    """Start the servers together (their imports overlap), wait until each is ready; stop them all after.

    They are all told to terminate before any is waited for, so that they also shut down together.
    """
    servers = list(servers)
    for server in servers:
        server.start()
    try:
        for server in servers:
            server.wait_ready()
        yield
    finally:
        for server in servers:
            if server.process is not None and server.process.poll() is None:
                server.process.terminate()
        for server in servers:
            server.stop()


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it; a second, unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other_ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=test {name}",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                    "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return {name: folder / name for name in ("ca.pem", "other_ca.pem", "server.pem", "server.key")}


@pytest.fixture(scope="module")
def servers(tiny_tied, tmp_path_factory):
    """Three servers, started together so that their imports overlap."""
    folder, _ = tiny_tied
    tmp = tmp_path_factory.mktemp("grpc")
    certs = make_certs(tmp / "certs")
    (tmp / "token").write_text(TOKEN + "\n")
    started = {
        # moving cuts, at most 4 sessions, 1 MiB messages
        "plain": Server(folder, tmp / "plain.log", MOVING, "--max-sessions", "4", "--max-message-mb", "1"),
        # fixed cuts, TLS and a token, short idle timeout
        "secure": Server(folder, tmp / "secure.log", FIXED, "--tls-cert", str(certs["server.pem"]), "--tls-key",
                         str(certs["server.key"]), "--token-file", str(tmp / "token"), "--idle-timeout", "2"),
        # two-part split (the cloud holds the head and returns tokens), plaintext: killed and restarted
        "two": Server(folder, tmp / "two.log", TWO, "--two-part"),
    }
    with running(list(started.values())):
        started["certs"] = certs
        started["token_file"] = tmp / "token"
        yield started


@functools.lru_cache(maxsize=None)
def in_process(folder: str, sets, seed: int, prompt: tuple[int, ...], two_part: bool = False) -> list[int]:
    pipeline = build_pipeline(folder, set(sets[0]), set(sets[1]), "none", seed=seed, two_part=two_part, with_tokenizer=False)
    return pipeline.edge.generate(list(prompt), NEW).token_ids


def remote_edge(folder: Path, sets, seed: int, link, two_part: bool = False):
    config = load_config(folder)
    schedule = SplitSchedule(sets[0], sets[1], config.num_hidden_layers, seed, 1)
    return build_edge(folder, config, schedule, "none", two_part, link=link)


def start_message(folder: Path, sets, seed: int = 0) -> bytes:
    config = load_config(folder)
    schedule = SplitSchedule(sets[0], sets[1], config.num_hidden_layers, seed, 1)
    return protocol.encode_start(seed, 1, schedule.fingerprint(), config.hidden_size)


def wait_sessions(link: GrpcLink, count: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = link.stats()
        if stats["sessions"] == count or time.monotonic() > deadline:
            assert stats["sessions"] == count, stats
            return stats
        time.sleep(0.05)


class Hook:
    """A link that runs `action` just before its n-th request (1-based) is forwarded."""

    def __init__(self, link, n: int, action) -> None:
        self.link, self.n, self.action, self.count = link, n, action, 0

    def request(self, data: bytes) -> bytes:
        self.count += 1
        if self.count == self.n:
            self.action()
        return self.link.request(data)


def test_tokens_equal_the_in_process_run(servers, tiny_tied):
    folder, _ = tiny_tied
    server = servers["plain"]
    with GrpcLink(server.url, timeout=30) as link:
        for seed, prompt in zip((0, 1, 7), PROMPTS):
            edge = remote_edge(folder, MOVING, seed, link)
            result = edge.generate(prompt, NEW)
            assert result.token_ids == in_process(str(folder), MOVING, seed, tuple(prompt))
            assert len(set(s for s in result.splits)) > 1  # the cuts did move
            assert result.link_seconds > 0
        assert link.stats()["sessions"] == 1  # the last generation's session stays open until the link closes
    with GrpcLink(server.url) as probe:
        stats = wait_sessions(probe, 0)
    assert stats["sessions_total"] >= 3 and stats["rss_bytes"] > 0


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_remote_pipeline_matches_build_pipeline(servers, tiny_tied, codec):
    """What main_*_split.py --cloud builds: the three-part split and the two-part split (TOKEN replies)."""
    folder, _ = tiny_tied
    for name, sets, two_part in (("plain", MOVING, False), ("two", TWO, True)):
        remote = build_pipeline(str(folder), set(sets[0]), set(sets[1]), codec, seed=9, two_part=two_part,
                                       remote=RemoteCloud(servers[name].url), with_tokenizer=False)
        local = build_pipeline(str(folder), set(sets[0]), set(sets[1]), codec, seed=9, two_part=two_part, with_tokenizer=False)
        try:
            got = remote.edge.generate(PROMPTS[0], NEW)
        finally:
            remote.edge.link.close()
        want = local.edge.generate(PROMPTS[0], NEW)
        assert got.token_ids == want.token_ids, (name, codec)
        assert remote.edge.link.cloud_batches  # a default server batches sessions and says so in the stream's metadata
        assert (got.bytes_up, got.bytes_down) == (want.bytes_up, want.bytes_down)
        assert remote.cloud is None and (remote.edge.third is None) == two_part


def test_malformed_messages_get_invalid_argument_and_others_go_on(servers, tiny_tied):
    folder, _ = tiny_tied
    server = servers["plain"]
    config = load_config(folder)
    prompt = PROMPTS[0]
    good = protocol.encode_hidden(0, 0, torch.randn(len(prompt), config.hidden_size), get_codec("none"))
    nan = torch.randn(len(prompt), config.hidden_size)
    nan[2, 5] = float("nan")
    cases = {
        "truncated": (good[:-7], "checksum mismatch"),
        "nan": (protocol.encode_hidden(0, 0, nan, get_codec("none"), finite=False), "NaN or Inf"),
        "positions": (protocol.encode_hidden(0, 3, torch.randn(5, config.hidden_size), get_codec("none")), "positions start at 3"),
        "wrong sets": (start_message(folder, FIXED), "fingerprint mismatch"),
    }
    outcomes = {}

    def attack() -> None:  # while another session is mid-generation
        with GrpcLink(server.url, timeout=30) as bad:
            for name, (message, _) in cases.items():
                try:
                    if name != "wrong sets":
                        bad.request(start_message(folder, MOVING))
                    bad.request(message)
                except TriadicError as error:
                    outcomes[name] = error
            try:
                bad.request(b"x" * (2 << 20))  # over --max-message-mb 1
            except TriadicError as error:
                outcomes["oversized"] = error

    with GrpcLink(server.url, timeout=30) as link:
        result = remote_edge(folder, MOVING, 3, Hook(link, 4, attack)).generate(prompt, NEW)
        assert result.token_ids == in_process(str(folder), MOVING, 3, tuple(prompt))
    for name, (_, reason) in cases.items():
        error = outcomes[name]
        assert isinstance(error, RejectedError) and error.code == "INVALID_ARGUMENT", (name, error)
        assert str(error).startswith(f"cloud at {link.target} rejected the message:") and reason in str(error), (name, error)
        assert "\n" not in str(error)
    assert outcomes["oversized"].code in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"), outcomes["oversized"]
    with GrpcLink(server.url) as probe:
        wait_sessions(probe, 0)
        assert server.process.poll() is None


def test_token_is_required(servers, tiny_tied):
    folder, _ = tiny_tied
    server, ca = servers["secure"], servers["certs"]["ca.pem"]
    for token in (None, "wrong-token", TOKEN + "x"):
        with GrpcLink(server.url, tls_ca=str(ca), token=token, timeout=30) as link:
            with pytest.raises(LinkError, match="refused the token") as caught:
                link.request(start_message(folder, FIXED))
            assert caught.value.code == "UNAUTHENTICATED"
            with pytest.raises(LinkError) as caught:
                link.stats()
            assert caught.value.code == "UNAUTHENTICATED"


def test_tls(servers, tiny_tied):
    folder, _ = tiny_tied
    server, certs = servers["secure"], servers["certs"]
    with GrpcLink(server.url, token=TOKEN, timeout=30) as plaintext:  # no CA: plaintext
        with pytest.raises(LinkError, match="cloud unreachable at 127.0.0.1") as caught:
            plaintext.request(start_message(folder, FIXED))
        assert caught.value.code == "UNAVAILABLE"
    with GrpcLink(server.url, tls_ca=str(certs["other_ca.pem"]), token=TOKEN, timeout=30) as untrusted:
        with pytest.raises(LinkError) as caught:
            untrusted.request(start_message(folder, FIXED))
        assert caught.value.code == "UNAVAILABLE"
    # the name the certificate must carry, where it is not the host dialled (it holds IP:127.0.0.1 and DNS:localhost)
    with GrpcLink(server.url, tls_ca=str(certs["ca.pem"]), token=TOKEN, timeout=30, tls_server_name="cloud.example.org") as renamed:
        with pytest.raises(LinkError) as caught:
            renamed.request(start_message(folder, FIXED))
        assert caught.value.code == "UNAVAILABLE"
    with make_link(server.url, str(certs["ca.pem"]), str(servers["token_file"]), tls_server_name="localhost") as link:
        assert link.tls
        for seed, prompt in zip((0, 5), PROMPTS):
            result = remote_edge(folder, FIXED, seed, link).generate(prompt, NEW)
            assert result.token_ids == in_process(str(folder), FIXED, seed, tuple(prompt))


def test_idle_session_is_freed(servers, tiny_tied):
    folder, _ = tiny_tied
    server, ca = servers["secure"], servers["certs"]["ca.pem"]
    with GrpcLink(server.url, tls_ca=str(ca), token=TOKEN, timeout=30) as link:
        link.request(start_message(folder, FIXED))
        assert link.stats()["sessions"] == 1
        wait_sessions(link, 0, timeout=8)  # --idle-timeout 2
        message = protocol.encode_hidden(0, 0, torch.randn(3, 32), get_codec("none"))
        reply = link.request(message)  # the stream ended CANCELLED: the link opened the session again and replayed it
        assert protocol.decode(reply, 32).kind is protocol.Kind.HIDDEN and link.failovers == 1
        assert "CANCELLED idle for 2 s" in server.log.read_text()


def test_a_replay_to_open_the_session_again_stops_when_its_check_says_so(servers, tiny_tied):
    """The edge server's time limit and its client's leaving reach the messages a reopening replays (`GrpcLink.watch`):
    a replay is one round trip per message, and took 16.4 s of a request under --time-limit 4."""
    folder, _ = tiny_tied
    server, ca = servers["secure"], servers["certs"]["ca.pem"]

    class Stop(Exception):
        pass

    seen: list[int] = []

    def check() -> None:
        seen.append(len(seen))
        if len(seen) == 2:
            raise Stop()

    message = protocol.encode_hidden(0, 0, torch.randn(3, 32), get_codec("none"))
    with GrpcLink(server.url, tls_ca=str(ca), token=TOKEN, timeout=30) as link:
        link.request(start_message(folder, FIXED))
        link.request(message)
        wait_sessions(link, 0, timeout=8)  # --idle-timeout 2: the cloud ended the session
        link.watch(check)
        with pytest.raises(Stop):
            link.request(protocol.encode_hidden(0, 3, torch.randn(1, 32), get_codec("none")))
        assert seen == [0, 1] and link.failovers == 0  # stopped before its second replayed message
        link.watch(None)


def test_a_pause_before_a_turn_and_its_prefill_do_not_add_up_to_idle(servers, tiny_tied):
    """A later request's TURN counts as work once (--idle-timeout 2 here): 1.3 s of the user's pause before it and 1.3 s
    of the edge's prefill after it are no idle session (counted from the last computation alone, the cloud ended the
    session between the TURN it had accepted and that turn's states)."""
    folder, _ = tiny_tied
    server, ca = servers["secure"], servers["certs"]["ca.pem"]

    class Pausing:
        """The link, with 1.3 s before a TURN and 1.3 s after it."""

        def __init__(self, link) -> None:
            self.link = link

        def __getattr__(self, name: str):
            return getattr(self.link, name)

        def request(self, data: bytes) -> bytes:
            turn = protocol.decode(data, 32).kind is protocol.Kind.TURN
            time.sleep(1.3 if turn else 0.0)
            reply = self.link.request(data)
            time.sleep(1.3 if turn else 0.0)
            return reply

    with GrpcLink(server.url, tls_ca=str(ca), token=TOKEN, timeout=30) as link:
        edge = remote_edge(folder, FIXED, 0, Pausing(link))
        first = [1, 5, 9, 33, 17, 80, 3, 41]
        answer = edge.continue_with(first, 2).token_ids
        edge.continue_with(first + answer + [11, 12], 2)
        assert link.failovers == 0


def test_a_session_that_only_starts_again_idles_out(servers, tiny_tied):
    """A START computes nothing, so it does not count as work: a stream sending STARTs every 0.4 s is ended past
    --idle-timeout (2 s here). Counted, one connection holding every session of the cloud with 40-byte STARTs
    refused every other client for as long as it liked."""
    import grpc

    from src.link.grpc_link import SESSION_METHOD

    folder, _ = tiny_tied
    server, ca = servers["secure"], servers["certs"]["ca.pem"]
    start, replies = start_message(folder, FIXED), []

    def starts() -> Iterator[bytes]:
        for _ in range(20):  # 8 s of STARTs, if nothing ends the stream first
            yield start
            time.sleep(0.4)

    with GrpcLink(server.url, tls_ca=str(ca), token=TOKEN, timeout=30) as link:
        began = time.monotonic()
        call = link.channel.stream_stream(SESSION_METHOD)(starts(), metadata=link.metadata)
        with pytest.raises(grpc.RpcError) as caught:
            for reply in call:
                replies.append(reply)
        assert caught.value.code() == grpc.StatusCode.CANCELLED and "idle for 2 s (no states to compute)" in caught.value.details()
        assert 2 <= time.monotonic() - began < 6 and 4 <= len(replies) <= 8


def test_a_client_gone_mid_generation_frees_its_session(servers, tiny_tied):
    folder, _ = tiny_tied
    server = servers["plain"]
    prompt = PROMPTS[1]
    with GrpcLink(server.url, timeout=30) as probe:
        # 1. the client cancels its stream mid-generation
        link = GrpcLink(server.url, timeout=30)

        def cancel() -> None:
            assert probe.stats()["sessions"] == 1
            link.cancel()
            raise KeyboardInterrupt  # the client dies here

        with pytest.raises(KeyboardInterrupt):
            remote_edge(folder, MOVING, 0, Hook(link, 4, cancel)).generate(prompt, NEW)
        wait_sessions(probe, 0)

        # 2. a client process is killed (SIGKILL) with its session open
        client = subprocess.Popen(
            [sys.executable, "-c", KILLED_CLIENT, f"127.0.0.1:{server.port}", start_message(folder, MOVING).hex()],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert client.stdout.readline().strip() == "started"
            wait_sessions(probe, 1)
        finally:
            client.kill()
            client.wait()
        wait_sessions(probe, 0)

        # the next client is served
        with GrpcLink(server.url, timeout=30) as next_link:
            result = remote_edge(folder, MOVING, 2, next_link).generate(prompt, NEW)
        assert result.token_ids == in_process(str(folder), MOVING, 2, tuple(prompt))
        link.close()


KILLED_CLIENT = """
import sys, time, grpc
channel = grpc.insecure_channel(sys.argv[1])
def requests():
    yield bytes.fromhex(sys.argv[2])
    time.sleep(600)
replies = channel.stream_stream("/triadic.Cloud/Session")(requests())
next(replies)
print("started", flush=True)
time.sleep(600)
"""


def test_four_clients_at_once(servers, tiny_tied):
    """Four sessions at once get the in-process tokens; their batched replies are what each gets alone: bit for
    bit where the server's products run in the panel kernel (on a CPU with AVX-512),
    whose rows do not depend on each other, and within 1e-4 where MKL's products change with the row count."""
    folder, _ = tiny_tied
    server = servers["plain"]
    jobs = [(seed, prompt) for seed, prompt in zip((11, 12, 13, 14), PROMPTS + [[1, 3, 3, 7, 40, 50]])]
    expected = [in_process(str(folder), MOVING, seed, tuple(prompt)) for seed, prompt in jobs]
    edges = [remote_edge(folder, MOVING, seed, GrpcLink(server.url, timeout=60)) for seed, _ in jobs]
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []
    logits, peak = [None] * len(jobs), []

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            result = edges[i].generate(jobs[i][1], NEW, keep_logits=True)
            results[i], logits[i] = result.token_ids, result.logits
            peak.append(edges[i].link.stats()["sessions"])
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == expected
    assert max(peak) >= 2  # the sessions did overlap
    assert edges[0].link.stats()["batching"]["largest"] >= 2  # and ran in batches
    panels = "stored as panels" in server.log.read_text()
    assert panels is (why_no_kernel() is None)
    for i, edge in enumerate(edges):  # each alone now
        alone = edge.generate(jobs[i][1], NEW, keep_logits=True)
        assert alone.token_ids == results[i]
        difference = max((x - y).abs().max().item() for x, y in zip(alone.logits, logits[i]))
        assert difference == 0 if panels else difference < 1e-4, (i, difference)
    for edge in edges:
        edge.link.close()
    with GrpcLink(server.url) as probe:
        wait_sessions(probe, 0)


def test_sessions_past_the_maximum_are_refused(servers, tiny_tied):
    folder, _ = tiny_tied
    server = servers["plain"]  # --max-sessions 4
    links = [GrpcLink(server.url, timeout=30) for _ in range(5)]
    try:
        for link in links[:4]:
            link.request(start_message(folder, MOVING))
        with pytest.raises(LinkError, match="out of capacity") as caught:
            links[4].request(start_message(folder, MOVING))
        assert caught.value.code == "RESOURCE_EXHAUSTED"
        assert links[0].stats()["sessions"] == 4
        links[0].end_session()
        wait_sessions(links[4], 3)
        result = remote_edge(folder, MOVING, 4, links[4]).generate(PROMPTS[0], NEW)
        assert result.token_ids == in_process(str(folder), MOVING, 4, tuple(PROMPTS[0]))
    finally:
        for link in links:
            link.close()
    with GrpcLink(server.url) as probe:
        assert wait_sessions(probe, 0)["sessions_rejected"] >= 1


def test_server_killed_and_restarted(servers, tiny_tied):
    folder, _ = tiny_tied
    server = servers["two"]
    prompt = PROMPTS[2]
    expected = in_process(str(folder), TWO, 0, tuple(prompt), True)
    link = GrpcLink(server.url, timeout=30)
    edge = remote_edge(folder, TWO, 0, link, two_part=True)

    def kill() -> None:
        server.process.kill()
        server.process.wait()

    edge.link = Hook(link, 4, kill)
    began = time.monotonic()
    with pytest.raises(TriadicError) as caught:
        edge.generate(prompt, NEW)
    assert time.monotonic() - began < 20  # no hang
    assert isinstance(caught.value, LinkError) and caught.value.code in ("UNAVAILABLE", "CANCELLED", "UNKNOWN", "INTERNAL"), caught.value
    with pytest.raises(LinkError, match="cloud unreachable"):  # still down
        link.request(start_message(folder, TWO))

    server.start(port=server.port).wait_ready()
    edge.link = link  # the same edge and link: a new generation opens a new session
    assert edge.generate(prompt, NEW).token_ids == expected

    # Stopped while that link holds a session open: the session ends with a reason, the server exits 0, no traceback.
    def stop_and_wait() -> None:
        server.process.terminate()
        deadline = time.monotonic() + 20
        while "UNAVAILABLE the cloud is shutting down" not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "UNAVAILABLE the cloud is shutting down" in server.log.read_text(), server.log.read_text()  # the stop reached the session

    edge.link = Hook(link, 3, stop_and_wait)
    with pytest.raises(LinkError, match="the cloud is shutting down"):
        edge.generate(prompt, NEW)
    link.close()
    assert server.process.wait(30) == 0  # the one SIGTERM: a clean exit
    server.stop()
    log = server.log.read_text()
    assert "SIGTERM: stopping (1 open sessions cancelled)" in log and "Traceback" not in log, log


def test_tls_credentials_that_cannot_serve_are_one_line_naming_them(tiny_tied, tmp_path, capsys):
    """A key of another certificate, or a PEM that holds none, is refused before the weights load, by what is wrong
    with it: gRPC found it only when the port opened, printed its own lines and said it could not bind the address."""
    from src.serve.cloud_server import main

    folder, _ = tiny_tied
    certs = make_certs(tmp_path / "certs")
    fake = tmp_path / "fake.pem"
    fake.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    for cert, key, expected in [(certs["server.pem"], certs["ca.pem"].with_suffix(".key"), "the key does not belong to the certificate"),
                                (fake, fake, "OpenSSL cannot read them as a certificate chain and its key")]:
        assert main(["--base-model", str(folder), "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"cloud_server: error: --tls-cert {cert} / --tls-key {key}: {expected}"), err


def test_bad_command_line(tiny_tied, capsys):
    from src.serve.cloud_server import main

    folder, _ = tiny_tied
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    for argv, expected in [
        (["--port", str(busy.getsockname()[1])], "Address already in use"),
        (["--first", "3", "--second", "1"], "max(first) = 3 > min(second) = 1"),
        (["--first", "2", "--second", "2"], "give the cloud no layers"),
        (["--max-sessions", "0"], "--max-sessions must be at least 1"),
        (["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
        (["--token-file", "/no/such/file"], "cannot read"),
        (["--session-lifetime", "inf"], "--session-lifetime inf: must be > 0 and at most 2147483 seconds"),
        (["--connection-idle", "1e10"], "--connection-idle 1e+10: must be > 0 and at most 2147483 seconds"),
        (["--cloud-device", "foo"], "--cloud-device foo: not a device this process can use"),
    ]:
        port = [] if "--port" in argv else ["--port", "0"]
        assert main(["--base-model", str(folder), *port, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cloud_server: error:") and expected in err[0], err
    busy.close()
    for url in ("http://x:1", "grpc://host:99999", "grpc://host/path", "grpc://[::1"):
        with pytest.raises(TriadicError, match="--cloud"):
            GrpcLink(url)
    with pytest.raises(TriadicError, match="--tls-ca /no/such/ca.pem: cannot read"):
        make_link("grpc://127.0.0.1:1", "/no/such/ca.pem", None)
