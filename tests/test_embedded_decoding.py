"""On the embedded SmolLM2-135M-Instruct: sampling, stop strings, the chat loop and the error line."""
import io
import json

import torch

from src.cli import run
from src.pipeline import build_pipeline
from src.sampling import SamplingConfig, model_generation_defaults
from src.utils import conversation_ids

NEW = 12
SETTINGS = [  # (options, sampling seed)
    (dict(temperature=1.0), 1),
    (dict(temperature=0.7, top_k=20, top_p=0.9), 2),
    (dict(temperature=1.2, min_p=0.05, top_k=0), 3),
    (dict(temperature=0.9, top_p=0.95, repetition_penalty=1.3), 4),
]
DEFAULT_SETS = (set(range(1, 7)), set(range(24, 30)))


def hf(model, ids, new, seed=None, **options):
    tensor = torch.tensor([ids])
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=new, do_sample=seed is not None,
                         pad_token_id=2, **options)
    return out[0, len(ids):].tolist()


def test_sampled_generation_matches_generate(embedded, japan_ids):
    folder, model, _ = embedded
    defaults = model_generation_defaults(folder)
    references = [hf(model, japan_ids, NEW, seed, eos_token_id=None, **options) for options, seed in SETTINGS]
    assert len({tuple(r) for r in references}) == len(SETTINGS)
    assert hf(model, japan_ids, NEW, eos_token_id=None) not in references  # they really sample
    for first, second in [({1}, {29}), ({4}, {26}), DEFAULT_SETS]:
        edge = build_pipeline(str(folder), first, second, "none", with_tokenizer=False).edge
        for (options, seed), reference in zip(SETTINGS, references):
            config = SamplingConfig(do_sample=True, seed=seed, **options).resolved(defaults)
            assert edge.generate(japan_ids, NEW, sampling=config).token_ids == reference, (first, options)


def test_cli_samples_and_stops_on_a_string(embedded, japan_ids, capsys):
    _, model, tokenizer = embedded
    argv = ["--json", "--codec", "none", "--dtype", "float32", "--max-new-tokens", "24"]
    sample = ["--do-sample", "--temperature", "0.8", "--top-p", "0.9", "--sampling-seed", "5"]
    assert run("three", *DEFAULT_SETS, argv + sample) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["token_ids"] == hf(model, japan_ids, 24, 5, temperature=0.8, top_p=0.9, eos_token_id=2)
    assert report["sampling"]["do_sample"] and report["sampling"]["top_k"] == 50  # transformers' default, as generate

    # --stop: generation ends at the token that completes the string, as generate(stop_strings=...) does
    assert run("three", *DEFAULT_SETS, argv + ["--stop", ". ", "--stop", "never"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    expected = hf(model, japan_ids, 24, stop_strings=[". ", "never"], tokenizer=tokenizer, eos_token_id=2)
    assert report["token_ids"] == expected and len(expected) < 24
    assert report["text"] == "Japan is a country steeped in tradition and culture"
    assert captured.err.splitlines()[1] == report["text"]  # the streamed text stops before the stop string


def test_an_error_after_streaming_begins_is_one_line_of_its_own(monkeypatch, capsys):
    from src.cloud import Cloud
    from src.utils import ProtocolError

    handle, calls = Cloud.handle, []

    def failing(self, request):
        calls.append(1)
        if len(calls) == 6:
            raise ProtocolError("the cloud went away (test)")
        return handle(self, request)

    monkeypatch.setattr(Cloud, "handle", failing)
    assert run("three", {1}, {29}, ["--json", "--codec", "none"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[-1] == "main_3_split.py: error: the cloud went away (test)"
    assert lines[-2].startswith("Japan is")  # the streamed text, ended by a newline
    assert sum("error" in line for line in lines) == 1 and captured.out == ""


def test_interactive_chat_keeps_the_caches(embedded, monkeypatch, capsys):
    _, model, tokenizer = embedded
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi, who are you?\nName a fruit.\n/reset\nName a fruit.\n/exit\n"))
    assert run("three", *DEFAULT_SETS, ["--interactive", "--json", "--codec", "none", "--dtype", "float32", "--max-new-tokens", "12"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(reports) == 3
    messages = []
    for k, (report, user) in enumerate(zip(reports, ["Hi, who are you?", "Name a fruit.", "Name a fruit."])):
        if k == 2:
            messages = []  # /reset
        messages.append({"role": "user", "content": user})
        ids = conversation_ids(tokenizer, messages, "auto")
        assert report["prompt_token_ids"] == ids
        assert report["token_ids"] == hf(model, ids, 12, eos_token_id=2), k
        messages.append({"role": "assistant", "content": report["text"]})
    assert reports[1]["cached_positions"] > len(reports[0]["prompt_token_ids"])  # turn 2 reused turn 1's caches
    assert reports[2]["cached_positions"] == 0  # /reset started a new session
