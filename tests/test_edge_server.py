"""The edge server (python -m src.serve.edge_server) as a subprocess on loopback, through the `openai` client and raw HTTP.

Most cases run on a tiny random-init model that speaks through the embedded tokenizer; two use the
embedded SmolLM2-135M-Instruct with its cloud in another process over gRPC: the text equals
main_3_split.py's, and the page, driven in headless Chromium, streams an answer with one strip mark
per token.
"""
from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from src.schedule import SplitSchedule  # noqa: E402
from tests.cdp import CdpError, Chromium, find_chromium  # noqa: E402
from tests.conftest import ROOT, free_port, stop_process  # noqa: E402
from tests.tiny import make_tiny_checkpoint  # noqa: E402

KEY = "edge-test-key"
TINY_SETS = ((0, 1), (2, 3, 4))  # cuts move at every step; b = L = 4 happens
JAPAN = [{"role": "user", "content": "Tell me about Japan."}]


def make_tiny_chat_checkpoint(folder: Path, seed: int = 0, num_layers: int = 4) -> Path:
    """A tiny random-init model that speaks through the embedded model's tokenizer and chat template.

    For servers that take messages rather than token ids: the vocabulary and special ids are
    SmolLM2-135M-Instruct's, the layers as small as `tiny_config`'s.
    """
    import shutil

    from src.checkpoint import embedded_model_dir

    source = embedded_model_dir()
    make_tiny_checkpoint(folder, seed=seed, num_layers=num_layers, vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


class Process:
    """A server subprocess whose stderr goes to a file; `wait_for` finds a line in it."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._file = open(log, "w")
        self.process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._file)

    def wait_for(self, pattern: str, timeout: float = 180.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log.read_text())
            if match:
                return match
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        pytest.fail(f"no {pattern!r} in {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            stop_process(self.process)
        self._file.close()


def start_edge(log: Path, *flags: str) -> tuple[Process, str]:
    server = Process(["-m", "src.serve.edge_server", "--port", "0", "--threads", "1", *flags], log)
    port = server.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1)
    return server, f"http://127.0.0.1:{port}"


def post(url: str, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict]:
    """POST without the openai client (it would refuse to send what these tests must send)."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def post_declaring(url: str, length: int) -> tuple[int, dict]:
    """Headers that declare a body of `length` bytes, and none of it: the answer of a server that refuses by the declared
    length alone. (Sending the body, a client may still be writing when the refusal closes the connection: EPIPE.)"""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.putrequest("POST", "/v1/chat/completions")
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(length)), ("Authorization", f"Bearer {KEY}")):
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.load(response)
    finally:
        connection.close()


def assert_openai_error(status: int, body: dict, expected_status: int, param: str | None = None) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """Lossless link, so that the split and the unsplit model must agree token for token; queue of one."""
    folder = make_tiny_chat_checkpoint(tmp_path_factory.mktemp("tiny_chat"))
    key_file = folder / "key.txt"
    key_file.write_text(KEY + "\n")
    first, second = (",".join(map(str, s)) for s in TINY_SETS)
    server, url = start_edge(
        folder / "server.log", "--base-model", str(folder), "--first", first, "--second", second,
        "--codec", "none", "--seed", "3", "--max-queue", "1", "--api-key-file", str(key_file), "--served-model-name", "tiny",
    )
    yield url, folder
    server.stop()


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_and_health(tiny_server, client):
    url, folder = tiny_server
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-unsplit"]
    assert client.models.retrieve("tiny-unsplit").id == "tiny-unsplit"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("org/gpt-4o")  # a name with a slash reaches the model check, not a missing route
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(urllib.error.HTTPError) as missing:  # no id names no model (it does not mean the default one)
        urllib.request.urlopen(urllib.request.Request(url + "/v1/models/", headers={"Authorization": f"Bearer {KEY}"}), timeout=10)
    assert missing.value.code == 404 and json.load(missing.value)["error"]["code"] == "model_not_found"
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        health = json.load(response)
    assert health["status"] == "ok" and health["split"]["first"] == [0, 1] and health["split"]["num_layers"] == 4


def test_completion_and_trace(client):
    reply = client.chat.completions.create(temperature=0, model="tiny", messages=[{"role": "user", "content": "Hi there"}], max_tokens=9)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    assert reply.usage.completion_tokens == 9 and reply.usage.total_tokens == reply.usage.prompt_tokens + 9
    trace = reply.split_trace  # the extension field, kept by the client as an extra attribute
    assert trace["prefilled"] == reply.usage.prompt_tokens and trace["cached_tokens"] == 0
    schedule = SplitSchedule(*TINY_SETS, num_layers=4, seed=3)
    steps = [t["step"] for t in trace["tokens"]]
    assert steps == list(range(steps[0], steps[0] + 9))
    assert [(t["a"], t["b"]) for t in trace["tokens"]] == [schedule.cuts(step) for step in steps]
    assert "".join(t["text"] for t in trace["tokens"]) == choice.message.content
    if trace["cached_tokens"] == 0:
        assert trace["tokens"][0]["positions_up"] == reply.usage.prompt_tokens  # the prefill sends every prompt position
    crossed = [t for t in trace["tokens"] if t["a"] < t["b"]]
    assert all(t["bytes_up"] > 24 and t["bytes_down"] > 24 for t in crossed)
    assert trace["bytes_up"] == sum(t["bytes_up"] for t in trace["tokens"]) > 0
    # A temperature too small to divide float32 logits by is greedy, as vLLM does (transformers would fail).
    tiny = client.chat.completions.create(temperature=1e-300, model="tiny", messages=[{"role": "user", "content": "Hi there"}], max_tokens=9)
    assert tiny.choices[0].message.content == choice.message.content and tiny.split_trace["decoding"] == "greedy"

    unsplit = client.chat.completions.create(temperature=0, model="tiny-unsplit", messages=[{"role": "user", "content": "Hi there"}], max_tokens=9)
    assert [t["id"] for t in unsplit.split_trace["tokens"]] == [t["id"] for t in trace["tokens"]]  # lossless link
    assert unsplit.split_trace["bytes_up"] == 0 and {(t["a"], t["b"]) for t in unsplit.split_trace["tokens"]} == {(4, 4)}


def test_streaming_matches_non_streaming(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}]
    whole = client.chat.completions.create(temperature=0, model="tiny", messages=messages, max_tokens=12)
    chunks = list(client.chat.completions.create(
        temperature=0, model="tiny", messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].split_trace["prompt_tokens"] == whole.usage.prompt_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    tokens = [t for c in chunks if getattr(c, "split_trace", None) for t in c.split_trace.get("tokens", [])]
    assert text == whole.choices[0].message.content
    assert [(t["id"], t["text"]) for t in tokens] == [(t["id"], t["text"]) for t in whole.split_trace["tokens"]]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_stop_strings(client):
    messages = [{"role": "user", "content": "Write a long story."}]
    full = client.chat.completions.create(temperature=0, model="tiny", messages=messages, max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    expected = full[: full.find(stop)]
    reply = client.chat.completions.create(temperature=0, model="tiny", messages=messages, max_tokens=24, stop=[stop, "\u2603never"])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert reply.split_trace["stopped_by"] == "stop" and reply.usage.completion_tokens < 24
    streamed = client.chat.completions.create(temperature=0, model="tiny", messages=messages, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_extending_the_conversation_prefills_only_the_new_tokens(client):
    turn = [{"role": "user", "content": "Name a color."}]
    one = client.chat.completions.create(temperature=0, model="tiny", messages=turn, max_tokens=6)
    if not one.split_trace["prefix_reuse"]:
        pytest.skip("prefix reuse waits for the decoding issue's sessions (src/serve/engine.py: EdgeEngine.run)")
    longer = [*turn, {"role": "assistant", "content": one.choices[0].message.content}, {"role": "user", "content": "Another one?"}]
    two = client.chat.completions.create(temperature=0, model="tiny", messages=longer, max_tokens=6)
    cached = two.usage.prompt_tokens_details.cached_tokens
    assert cached >= one.usage.prompt_tokens and two.split_trace["prefilled"] == two.usage.prompt_tokens - cached
    fresh = client.chat.completions.create(temperature=0, model="tiny-unsplit", messages=longer, max_tokens=6)
    assert [t["id"] for t in two.split_trace["tokens"]] == [t["id"] for t in fresh.split_trace["tokens"]]


def test_bad_requests_get_400_with_openai_error_shape(tiny_server, client):
    url, _ = tiny_server
    good = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    cases = [
        ({k: v for k, v in good.items() if k != "messages"}, "messages"),
        ({**good, "messages": "Hi"}, "messages"),
        ({**good, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({**good, "messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role"),
        ({**good, "max_tokens": "4"}, "max_tokens"),
        ({**good, "max_tokens": 0}, "max_tokens"),
        ({**good, "max_tokens": 500}, "max_tokens"),  # the tiny model's context is 512
        ({**good, "max_completion_tokens": None, "max_tokens": "x"}, "max_tokens"),  # null is absent: max_tokens is read
        ({**good, "max_completion_tokens": None, "max_tokens": 0}, "max_tokens"),
        ({**good, "max_completion_tokens": "x"}, "max_completion_tokens"),
        ({**good, "max_completion_tokens": 500, "max_tokens": 4}, "max_completion_tokens"),
        ({**good, "temperature": "hot"}, "temperature"),
        ({**good, "stream": "yes"}, "stream"),
        ({**good, "stop": [1, 2]}, "stop"),
        ({**good, "n": True}, "n"),
        ({**good, "messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),  # a lone surrogate
        ({**good, "top_k": 1.5}, "top_k"),
        ({**good, "min_p": 2}, "min_p"),
        ({**good, "repetition_penalty": 0}, "repetition_penalty"),
        ({**good, "repetition_penalty": 1e-45}, "repetition_penalty"),  # was accepted, then a 500 from torch.multinomial
        ({**good, "seed": 2**64 + 5}, "seed"),  # was taken mod 2**64: the answer of seed 5
        ({**good, "seed": -1}, "seed"),
    ]
    for body, param in cases:
        status, reply = post(url, body)
        assert_openai_error(status, reply, 400, param)
    assert_openai_error(*post(url, good, raw=b"{not json"), 400)
    assert_openai_error(*post(url, good, raw=b"[" * 100_000 + b"]" * 100_000), 400)  # deeper than the JSON parser goes
    assert_openai_error(*post_declaring(url, 1024 * 1024 + 1), 413)  # --max-body-kb 1024, refused by the declared length
    huge = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1' + b"0" * 5000 + b"}"
    status, reply = post(url, None, raw=huge)  # past Python's 4300-digit limit on int(): a ValueError, not a JSONDecodeError
    assert_openai_error(status, reply, 400)
    assert "4300 digits" in reply["error"]["message"]
    status, reply = post(url, {**good, "max_completion_tokens": None, "max_tokens": 3, "temperature": 0})
    assert status == 200 and reply["usage"]["completion_tokens"] == 3, reply
    assert "context" in post(url, {**good, "max_tokens": 500})[1]["error"]["message"]
    status, reply = post(url, {**good, "model": "gpt-4o"})
    assert_openai_error(status, reply, 404, "model")  # as OpenAI answers a model that does not exist
    assert reply["error"]["code"] == "model_not_found"
    status, reply = post(url, good, key=None)
    assert_openai_error(status, reply, 401)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=good["messages"])
    assert caught.value.status_code == 404 and caught.value.body["code"] == "model_not_found"


def test_fields_that_would_change_the_answer_are_refused_by_name(tiny_server):
    """A client asking for JSON, a tool call or log probabilities must not get plain text with a 200."""
    url, _ = tiny_server
    good = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    refused = {
        "logprobs": True, "top_logprobs": 3, "tools": [tool], "tool_choice": "required", "functions": [tool["function"]],
        "function_call": "auto", "response_format": {"type": "json_object"}, "logit_bias": {"28": -100},
        "presence_penalty": 0.5, "frequency_penalty": -1, "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
    }
    for name, value in refused.items():
        status, reply = post(url, {**good, name: value})
        assert_openai_error(status, reply, 400, name)
        assert reply["error"]["code"] == "unsupported_parameter", reply
    for name, value in {"frequency_penalty": 5, "presence_penalty": "0"}.items():  # out of OpenAI's range, or not a number
        status, reply = post(url, {**good, name: value})
        assert_openai_error(status, reply, 400, name)
    plain = post(url, good)
    assert plain[0] == 200, plain
    harmless = {"logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "response_format": {"type": "text"}, "tools": [],
                "tool_choice": "none", "logit_bias": {}, "user": "u-1", "metadata": {"k": "v"}, "store": False, "n": 1}
    status, reply = post(url, {**good, **harmless})
    assert status == 200 and reply["choices"][0]["message"]["content"] == plain[1]["choices"][0]["message"]["content"], reply
    status, reply = post(url, {**good, "tools": [tool], "tool_choice": "none"})  # tools the model must not call: a plain answer
    assert status == 200 and reply["choices"][0]["message"]["content"] == plain[1]["choices"][0]["message"]["content"], reply


def test_the_sampling_extensions_reach_transformers_processors(tiny_server):
    """top_k, min_p and repetition_penalty (vLLM's extra fields) change what is sampled, each as transformers' option does."""
    from types import SimpleNamespace

    from src.serve.engine import EdgeEngine, Options

    url, _ = tiny_server
    good = {"model": "tiny", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 24}
    greedy = post(url, {**good, "temperature": 0})[1]

    def ids(reply: dict) -> list[int]:
        return [t["id"] for t in reply["split_trace"]["tokens"]]

    for only_the_top in ({"top_k": 1}, {"min_p": 1.0}):  # keeps the most likely token alone: sampling is greedy
        sampled = post(url, {**good, "temperature": 1.5, "seed": 7, **only_the_top})[1]
        assert sampled["split_trace"]["decoding"].startswith("sampling") and ids(sampled) == ids(greedy), only_the_top
    free = post(url, {**good, "temperature": 1.5, "seed": 7, "top_k": 0})[1]  # 0 (or vLLM's -1): the whole vocabulary
    assert ids(free) == ids(post(url, {**good, "temperature": 1.5, "seed": 7, "top_k": -1})[1]) != ids(greedy)
    # Below 1 the penalty favours the tokens already in the sequence (transformers' CTRL rule): greedy decoding repeats them.
    favoured = post(url, {**good, "temperature": 0, "repetition_penalty": 0.01})[1]
    assert ids(favoured) != ids(greedy) and len(set(ids(favoured))) < len(ids(favoured))
    stub = SimpleNamespace(generation_defaults=None)
    config = EdgeEngine.sampling(stub, Options(max_tokens=1, temperature=0, repetition_penalty=1.3))  # type: ignore[arg-type]
    assert not config.do_sample and config.repetition_penalty == 1.3
    config = EdgeEngine.sampling(stub, Options(max_tokens=1, temperature=0.5, seed=1, top_k=0, min_p=0.1))  # type: ignore[arg-type]
    assert (config.do_sample, config.top_k, config.min_p, config.seed) == (True, 0, 0.1, 1)


def test_a_stream_with_usage_says_usage_null_until_its_last_chunk(tiny_server):
    """OpenAI's chunks carry "usage": null until the usage chunk; raw-JSON clients read chunk["usage"]."""
    url, _ = tiny_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0, "stream": True}
    for include_usage in (True, False):
        request = urllib.request.Request(
            url + "/v1/chat/completions", headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
            data=json.dumps({**body, "stream_options": {"include_usage": include_usage}}).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        if include_usage:
            assert all("usage" in c and c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == 3
            assert chunks[-1]["choices"] == []
        else:
            assert all("usage" not in c for c in chunks)


def test_a_request_whose_client_left_while_it_waited_gives_up_its_place(tiny_server):
    """A non-streaming request that waits for the model, and whose client leaves, leaves the queue then, not when its turn comes."""
    import socket

    url, folder = tiny_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": 469, "stream": True, "temperature": 0}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})

    def health() -> dict:
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            return json.load(response)

    with urllib.request.urlopen(request, timeout=60) as holder:  # holds the model while it streams
        assert holder.readline().startswith(b"data: ")
        waiting = json.dumps({**body, "stream": False, "max_tokens": 5}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(waiting)}\r\n\r\n".encode() + waiting)
            deadline = time.monotonic() + 10
            while health()["waiting"] != 1:
                assert time.monotonic() < deadline, health()
                time.sleep(0.02)
        deadline, done_before = time.monotonic() + 5, (folder / "server.log").read_text().count(" 469 generated")
        while "went away while its request waited for the model" not in (log := (folder / "server.log").read_text()):
            if log.count(" 469 generated") > done_before:  # the holder (1.7 s here) ended before the waiter's check
                pytest.skip("the holding request finished first; test_waiting_for_the_model_... covers this without timing")
            assert time.monotonic() < deadline, (health(), log[-2000:])  # checked every second while it waits
            time.sleep(0.05)
        assert health()["waiting"] == 0
    assert post(url, {**body, "stream": False, "max_tokens": 2})[0] == 200


def test_waiting_for_the_model_ends_when_the_client_leaves_and_hands_the_model_on():
    """`Job._wait_for_the_model` without a server: a departed client's ticket leaves the queue; the next one gets the model."""
    import asyncio

    from src.serve.app import Admission, Job

    class Request:
        def __init__(self, gone: bool) -> None:
            self.gone = gone

        async def is_disconnected(self) -> bool:
            return self.gone

    async def scenario() -> None:
        admission = Admission(max_queue=2)
        holder = admission.admit()
        await holder.acquire()
        leaving, staying = admission.admit(), admission.admit()
        assert not await Job(None, "m", None, None, leaving)._wait_for_the_model(Request(gone=True))  # type: ignore[arg-type]
        leaving.release()
        assert admission.admitted == 2 and leaving.state == "done"
        waiting = asyncio.ensure_future(Job(None, "m", None, None, staying)._wait_for_the_model(Request(gone=False)))  # type: ignore[arg-type]
        await asyncio.sleep(1.5)  # one check of the client: still there, still waiting
        assert not waiting.done()
        holder.release()
        assert await asyncio.wait_for(waiting, 5) and staying.state == "holding" and admission.running == 1
        staying.release()
        assert admission.admitted == 0 and admission.running == 0

    asyncio.run(scenario())


def test_generations_run_one_after_another_on_one_long_lived_thread():
    """Not a thread per request: what torch keeps per thread (its thread count; on a GPU the codec's CUDA
    graphs, captured per thread) is then made once, not at every request. A work that raises does not end it."""
    from src.serve.app import DecodeThread

    decoder, seen, done = DecodeThread(), [], threading.Event()

    def work(index: int) -> None:
        seen.append((index, threading.get_ident(), threading.current_thread().name))
        if index == 2:
            done.set()

    decoder.run(lambda: work(0))
    decoder.run(lambda: 1 / 0)  # logged; the thread goes on
    decoder.run(lambda: work(1))
    decoder.run(lambda: work(2))
    assert done.wait(10)
    assert [index for index, _, _ in seen] == [0, 1, 2]
    assert len({ident for _, ident, _ in seen}) == 1 and seen[0][1] != threading.get_ident() and seen[0][2] == "edge-decode"


def test_429_past_the_queue(tiny_server):
    """One decoding and one waiting (--max-queue 1): of six requests sent at once, the rest are refused at once."""
    url, _ = tiny_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 200, "temperature": 0}
    barrier = threading.Barrier(6)
    results: list[tuple[int, dict]] = []

    def one() -> None:
        barrier.wait()
        results.append(post(url, body))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    statuses = sorted(status for status, _ in results)
    assert len(statuses) == 6 and 200 in statuses and 429 in statuses, statuses
    assert statuses.count(200) <= 2 + 1, statuses  # two admitted at once (a third only if one ended before the rest arrived)
    for status, reply in results:
        if status == 429:
            assert_openai_error(status, reply, 429)
            assert reply["error"]["code"] == "rate_limit_exceeded" and "busy" in reply["error"]["message"]
        else:
            assert reply["usage"]["completion_tokens"] == 200
    assert post(url, {**body, "max_tokens": 2})[0] == 200  # the queue empties: served again


def test_a_client_that_goes_away_stops_its_generation(tiny_server):
    """A stream closed after its first chunk frees the model at once: its generation never completes."""
    url, folder = tiny_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": 470, "stream": True, "temperature": 0}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.readline().startswith(b"data: ")
    deadline = time.monotonic() + 10
    while json.load(urllib.request.urlopen(url + "/health", timeout=10))["running"]:
        assert time.monotonic() < deadline, "the generation went on after its client left"
        time.sleep(0.05)
    assert "470 generated" not in (folder / "server.log").read_text()


def test_engine_time_limit_and_cancel(tiny_server):
    """The adapter in this process: the time limit and a cancel are checked before every layer of the prefill,
    on the edge and on the in-process cloud; either drops the session, and the next request is a fresh one's."""
    from src.pipeline import build_pipeline
    from src.serve.engine import Cancelled, ChatTokenizer, EdgeEngine, Options, Started

    pipeline = build_pipeline(str(tiny_server[1]), *TINY_SETS, codec_name="none", seed=3)
    cloud = pipeline.edge.link.cloud  # a LocalLink's
    engine = EdgeEngine(pipeline, "tiny", ChatTokenizer(pipeline.tokenizer))
    prompt = engine.prepare([{"role": "user", "content": "Hi"}])
    n = len(prompt.token_ids)
    assert SplitSchedule(*TINY_SETS, num_layers=4, seed=3).cuts(0) == (0, 2)  # the prefill: cloud [0, 2), edge [2, 4)
    calls: list[list[int]] = []

    def count() -> bool:
        calls.append(cloud.fill[:4])
        return False

    fresh = engine.run(prompt, Options(max_tokens=1, temperature=0), lambda event: None, count)
    assert len(calls) == 4 + 1  # one check per layer (two on each side), one after the token
    assert calls[:4] == [[0, 0, 0, 0], [n, 0, 0, 0], [n, n, 0, 0], [n, n, 0, 0]]
    fresh = engine.run(prompt, Options(max_tokens=8, temperature=0), lambda event: None, lambda: False)
    assert fresh.cached_tokens == n - 1 and len(fresh.token_ids) == 8

    seen: list = []
    done = engine.run(prompt, Options(max_tokens=50, temperature=0, time_limit=1e-9), seen.append, lambda: False)
    assert len(seen) == 1 and isinstance(seen[0], Started)  # stopped before the first layer: no token at all
    assert (done.text, done.token_ids, done.finish_reason, done.stopped_by) == ("", [], "length", "time_limit")
    assert engine.edge.end == cloud.end == 0 and cloud.fill == [0] * 5  # the session was dropped on both sides

    calls.clear()
    seen.clear()

    def cancel_in_the_cloud() -> bool:  # true from the cloud's second layer of the prefill on
        calls.append(cloud.fill[:4])
        return len(calls) >= 2

    with pytest.raises(Cancelled):
        engine.run(prompt, Options(max_tokens=50, temperature=0), seen.append, cancel_in_the_cloud)
    assert calls == [[0, 0, 0, 0], [n, 0, 0, 0]] and len(seen) == 1  # stopped inside the cloud, before any token
    assert engine.edge.end == 0 and cloud.fill == [0] * 5 and not cloud.session

    again = engine.run(prompt, Options(max_tokens=8, temperature=0), lambda event: None, lambda: False)
    assert again.cached_tokens == 0 and again.token_ids == fresh.token_ids and again.text == fresh.text
    after = engine.run(prompt, Options(max_tokens=8, temperature=0, time_limit=60), lambda event: None, lambda: False)
    assert after.cached_tokens == n - 1 and after.token_ids == fresh.token_ids  # a limit not reached changes nothing


@pytest.mark.parametrize(
    "entries,at_start,sampled",
    [
        ({"eos_token_id": [2, -1], "exponential_decay_length_penalty": [1, 1.5]}, "with this request", None),  # was 500
        ({"exponential_decay_length_penalty": [-400, 10.0]}, "choosing the token failed", None),  # overflows at once: 502
        ({"exponential_decay_length_penalty": [1, 1.2]}, None, None),  # overflows only thousands of tokens on, as in generate
        ({"top_p": 0}, None, "generation_config.json sets top_p 0: must be in (0, 1]"),  # greedy requests still served
        ({"temperature": 0.0}, None, None),  # a request that leaves the temperature out decodes greedily, as vLLM's
    ],
)
def test_a_model_file_every_request_would_fail_on_is_refused_at_start(tiny_server, tmp_path, entries, at_start, sampled):
    import json
    import shutil

    from src.pipeline import build_pipeline
    from src.serve.engine import ChatTokenizer, EdgeEngine, Options
    from src.utils import TriadicError

    folder = tmp_path / "model"
    shutil.copytree(tiny_server[1], folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, **entries}))
    pipeline = build_pipeline(str(folder), *TINY_SETS, codec_name="none", seed=3)
    if at_start is not None:
        with pytest.raises(TriadicError) as caught:
            EdgeEngine(pipeline, "tiny", ChatTokenizer(pipeline.tokenizer))
        assert at_start in str(caught.value) and "\n" not in str(caught.value)
        return
    engine = EdgeEngine(pipeline, "tiny", ChatTokenizer(pipeline.tokenizer))
    prompt = engine.prepare([{"role": "user", "content": "Hi"}])
    assert len(engine.run(prompt, Options(4, temperature=0), lambda event: None, lambda: False).token_ids) >= 1
    if sampled is None:
        assert engine.sampling(Options(4)).do_sample == ("temperature" not in entries)
    else:  # the app answers 400 with this, before any stream
        with pytest.raises(TriadicError, match=re.escape(sampled)):
            engine.sampling(Options(4))


def test_bad_flags_exit_2_with_one_line(capsys):
    """In this process: the flags are checked before anything loads, and argparse's own errors exit the same way."""
    from src.serve.edge_server import main

    for flags in (["--max-queue", "-1"], ["--codec", "zip"], ["--port", "70000"], ["--time-limit", "0"], ["--body-timeout", "0"], ["--body-timeout", "inf"],
                  ["--max-queue", "8", "--max-connections", "9"]):
        assert main(flags) == 2, flags
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("edge_server: error:"), err
    with pytest.raises(SystemExit) as caught:
        main(["--port", "eighty"])
    assert caught.value.code == 2 and capsys.readouterr().err.startswith("edge_server: error:")


# ---- the embedded model, its cloud in another process ------------------------------------------------
@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory):
    """main_3_split.py's sets, lossless link, the cloud as `python -m src.serve.cloud_server` over gRPC.

    Both processes load at the same time: the edge dials the cloud only at the first request.
    """
    logs = tmp_path_factory.mktemp("embedded_server")
    port = free_port()
    cloud = Process(["-m", "src.serve.cloud_server", "--host", "127.0.0.1", "--port", str(port), "--threads", "1"], logs / "cloud.log")
    try:
        edge, url = start_edge(logs / "edge.log", "--codec", "none", "--dtype", "float32", "--cloud", f"grpc://127.0.0.1:{port}")
        cloud.wait_for(rf"listening on 127\.0\.0\.1:{port}")
    except BaseException:
        cloud.stop()
        raise
    yield url
    edge.stop()
    cloud.stop()


def test_text_equals_main_3_split(embedded_server, capsys):
    """main_3_split.py's own sets and code path (`run`, in this process, --json), against the server's answer."""
    sys.path.insert(0, str(ROOT))
    import main_3_split

    from src.cli import run

    new = 32
    argv = ["--json", "--codec", "none", "--dtype", "float32", "--max-new-tokens", str(new), "--prompt", JAPAN[0]["content"]]
    assert run("three", main_3_split.first_split_layer_indices, main_3_split.second_split_layer_indices, argv) == 0
    script = json.loads(capsys.readouterr().out)
    client = openai.OpenAI(base_url=embedded_server + "/v1", api_key="unused", max_retries=0, timeout=300)
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=JAPAN, max_tokens=new, temperature=0)
    assert reply.choices[0].message.content == script["text"]
    assert [t["id"] for t in reply.split_trace["tokens"]] == script["token_ids"]
    assert [[t["a"], t["b"]] for t in reply.split_trace["tokens"]] == script["splits"][:new]
    assert reply.usage.prompt_tokens == len(script["prompt_token_ids"])


def _browser() -> str:
    """Chromium's path, installing it with `make browser` (Debian's package) where it is missing."""
    path = find_chromium()
    if path is None:
        subprocess.run(["make", "-s", "browser"], cwd=ROOT, capture_output=True, timeout=900)
        path = find_chromium()
    if path is None:
        pytest.skip("headless Chromium is not available and `make browser` could not install it "
                    "(it needs apt-get and root: apt-get install -y chromium); the page test did not run")
    return path


def test_page_streams_an_answer_with_one_mark_per_token(embedded_server, tmp_path):
    executable = _browser()
    try:
        browser = Chromium.start(tmp_path / "profile", executable)
    except CdpError as error:
        pytest.skip(f"headless Chromium at {executable} does not start here ({error}); the page test did not run")
    with browser:
        browser.navigate(embedded_server + "/")
        browser.wait_for("document.getElementById('model').textContent === 'SmolLM2-135M-Instruct'", 30)
        browser.evaluate(
            "document.getElementById('compare').checked = true; document.getElementById('max-tokens').value = 40;"
            f"document.getElementById('prompt').value = {json.dumps(JAPAN[0]['content'])};"
            "document.getElementById('send').click()"
        )
        browser.wait_for("document.body.dataset.busy === '0' && document.querySelectorAll('.card[data-done=\"1\"]').length === 2", 240)
        cards = browser.evaluate(
            "[...document.querySelectorAll('.card')].map(c => ({model: c.dataset.model, tokens: Number(c.dataset.tokens),"
            " marks: c.querySelectorAll('.strip .tok').length, bands: c.querySelectorAll('.strip .tok .band').length,"
            " text: c.querySelector('.text').textContent, errors: c.querySelectorAll('.error').length}))"
        )
        verdict = browser.evaluate("document.querySelector('.verdict').textContent")
        x, y = browser.evaluate("(() => { const r = document.querySelectorAll('.tok')[3].getBoundingClientRect(); return [r.left + r.width / 2, r.top + 20]; })()")
        browser.hover(x, y)
        browser.wait_for("!document.getElementById('tip').hidden", 5)
        browser.screenshot(ROOT / "results" / "edge_server_page.png")
    split, unsplit = cards
    assert split["model"] == "split" and unsplit["model"] == "unsplit"
    for card in cards:
        assert card["errors"] == 0 and card["tokens"] == 40 and card["marks"] == card["tokens"], card
        assert card["text"].startswith("Japan is a country"), card
    assert split["bands"] == 3 * 40  # edge / cloud / edge at every token (a <= 6 < 24 <= b)
    assert unsplit["bands"] == 40  # the edge alone: one band per token
    assert split["text"] == unsplit["text"] and verdict.startswith("Same 40 tokens"), verdict  # --codec none is exact


def test_without_prefix_reuse_a_request_gets_the_same_answer_whatever_came_before(tiny_server):
    """--no-prefix-reuse: every request a new session, so its cuts (the schedule's steps from 0), its lossy
    messages and its tokens repeat exactly after another request; with reuse the steps run on across requests."""
    from src.pipeline import build_pipeline
    from src.serve.engine import ChatTokenizer, EdgeEngine, Options

    def engine(reuse_prefix: bool) -> EdgeEngine:  # each its own pipeline: an engine wraps its edge's link
        pipeline = build_pipeline(str(tiny_server[1]), *TINY_SETS, codec_name="int8", seed=3)
        return EdgeEngine(pipeline, "tiny", ChatTokenizer(pipeline.tokenizer), reuse_prefix=reuse_prefix)

    def trace(engine: EdgeEngine, text: str) -> tuple[int, list[tuple]]:
        done = engine.run(engine.prepare([{"role": "user", "content": text}]), Options(max_tokens=8, temperature=0), lambda event: None, lambda: False)
        return done.cached_tokens, [(e.token_id, e.a, e.b, e.bytes_up, e.bytes_down) for e in done.events]

    fresh = engine(reuse_prefix=False)
    first = trace(fresh, "Name a color.")
    assert trace(fresh, "Name a color. And a fruit?")[0] == 0  # nothing kept from the request before
    assert trace(fresh, "Name a color.") == first and first[0] == 0 and fresh.describe()["prefix_reuse"] is False

    kept = engine(reuse_prefix=True)
    assert trace(kept, "Name a color.") == first  # a new engine's first request is a fresh session too
    trace(kept, "Name a color. And a fruit?")
    cached, again = trace(kept, "Name a color.")
    assert cached > 0 and [step[1:3] for step in again] != [step[1:3] for step in first[1]]  # the steps ran on: other cuts
    trace(kept, "Name a color, a fruit, a tree, a river, a city, a song and a number, then three more of each.")
    assert kept.edge.reusable_prefix(kept.prepare([{"role": "user", "content": "Something else?"}]).token_ids) > 0
    assert trace(kept, "Something else?")[0] == 0  # another conversation (less than half kept) starts afresh: the
    # template's common start, which it does not keep, was reported as cached


def test_a_request_too_long_for_the_clouds_limits_is_400_not_502():
    """The cloud refuses a prefill past its --max-message-positions: the client hears its request is too long."""
    from src.link.grpc_link import LinkError
    from src.serve.app import _as_api_error

    too_long = LinkError("cloud at 127.0.0.1:1 refused the message as too large: message carries 4155 positions, more than "
                         "the limit of 4096", "RESOURCE_EXHAUSTED")
    refusal = _as_api_error(too_long)
    assert (refusal.status, refusal.code, refusal.param) == (400, "context_length_exceeded", "messages") and "4096" in refusal.message
    full = _as_api_error(LinkError("cloud at 127.0.0.1:1 is out of capacity: 8 sessions at once", "RESOURCE_EXHAUSTED"))
    gone = _as_api_error(LinkError("cloud unreachable at 127.0.0.1:1: connection refused", "UNAVAILABLE"))
    assert (full.status, full.code) == (gone.status, gone.code) == (502, "split_failed")
