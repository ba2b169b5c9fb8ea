"""tools.compare: the unsplit rows and the lossless rows equal HF generate; bad input is one line, exit 2."""
import json

import pytest

from tests.conftest import ROOT
from tools import compare


def test_compare_rows_equal_generate(tiny_with_tokenizer, tmp_path, monkeypatch):
    folder, _ = tiny_with_tokenizer
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# three of the shipped prompts\n" + "\n".join((ROOT / "bench/data/prompts.txt").read_text().splitlines()[2:5]) + "\n")

    def no_file_reads(*args):  # the parts take their tensors from the baseline's copy: the files are read once
        raise AssertionError("a part read the checkpoint files")

    monkeypatch.setattr("src.checkpoint._weight_files", no_file_reads)
    for extra in ([], ["--do-sample", "--temperature", "0.9", "--top-p", "0.95", "--sampling-seed", "3"]):
        out = tmp_path / ("sampled" if extra else "greedy")
        argv = ["--prompts", str(prompts), "--base-model", str(folder), "--settings", "unsplit,1/3,0-1/2-4,two:1",
                "--codecs", "none,int8", "--max-new-tokens", "8", "--out", str(out)]
        assert compare.main(argv + extra) == 0
        runs = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
        assert len(runs) == 3 * (1 + 1 + 3 * 2)  # per prompt: the baseline, unsplit once, three split settings x two codecs
        baselines = {run["prompt_index"]: run for run in runs if run["setting"] == compare.BASELINE}
        assert len({tuple(run["token_ids"]) for run in baselines.values()}) == 3
        for run in runs:
            if run["setting"] == "unsplit" or run["codec"] == "none":
                assert run["token_ids"] == baselines[run["prompt_index"]]["token_ids"], run
                assert run["same"] and run["first_difference"] is None
        markdown = out.with_suffix(".md").read_text()
        assert "| 1/3 | none | 3/3 |" in markdown and "| unsplit | - | 3/3 |" in markdown
        assert markdown.count("| HF generate | - |") == 3


def test_stop_strings_end_the_baseline_by_the_splits_rule(tiny_with_tokenizer, tmp_path):
    """--stop ends the baseline as it ends the split: in the answer's text. transformers' stop_strings also match
    across the prompt's end, so with them the baseline stopped after one token where the split ran on, and the
    table reported a difference that was the two stop rules', not the split's."""
    import torch

    folder, model = tiny_with_tokenizer
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(folder)
    prompt = "The answer is"
    ids = tokenizer(prompt)["input_ids"]
    free = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=12,
                          do_sample=False, eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    answer = tokenizer.decode(free, skip_special_tokens=True)
    across = prompt[-2:] + answer[:2]  # spans the prompt's end: not in the answer's text
    assert across not in answer
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompt + "\n")
    out = tmp_path / "stop"
    argv = ["--prompts", str(prompts), "--base-model", str(folder), "--prompt-format", "raw", "--settings", "1/3,0-1/2-4",
            "--codecs", "none", "--max-new-tokens", "12", "--stop", across, "--out", str(out)]
    assert compare.main(argv) == 0
    runs = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [run["token_ids"] for run in runs] == [free] * 3 and all(run["same"] for run in runs[1:]), runs

    inside = answer[len(answer) // 2:][:3]  # in the answer's text: the baseline and the split stop at the same token
    assert compare.main([*argv[:-4], "--stop", inside, "--out", str(out)]) == 0
    runs = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(runs[0]["token_ids"]) < 12 and inside not in runs[0]["text"], runs[0]
    assert all(run["token_ids"] == runs[0]["token_ids"] and run["text"] == runs[0]["text"] for run in runs[1:]), runs


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--prompts", "/no/such/file"], "--prompts /no/such/file: cannot read"),
        (["--settings", "1/x"], "--settings 1/x: 'x' is not a layer index or range"),
        (["--settings", "banana"], "--settings: 'banana' is not a setting"),
        (["--settings", "3/1"], "--settings 3/1: max(first) = 3 > min(second) = 1"),
        # checked before the range is expanded (1-99999999999 filled 22 GB); a regression here costs 200 MB, not that
        (["--settings", "1-4000000/3"], "layer 4000000 is beyond this model's 4 layers"),
        (["--settings", "1_0/3"], "'1_0' is not a layer index or range"),
        (["--codecs", "zip"], "unknown codec 'zip'"),
        (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["--out", ""], "--out '': give a path without suffix"),
        (["--out", "{tmp}/"], "not a folder"),
        (["--out", "{tmp}/p.txt/x"], "cannot make its folder"),  # under a regular file: found before any run, not after
    ],
)
def test_bad_input_is_one_line(tiny_with_tokenizer, tmp_path, capsys, argv, expected):
    folder, _ = tiny_with_tokenizer
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hi.\n")
    base = ["--prompts", str(prompts), "--base-model", str(folder), "--out", str(tmp_path / "x")]
    assert compare.main(base + [arg.format(tmp=tmp_path) for arg in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tools.compare: error:") and expected in err[0], err
    assert not (tmp_path / "x.md").exists()


def test_an_empty_prompts_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(compare.TriadicError, match="no prompts"):
        compare.read_prompts(str(tmp_path / "empty.txt"))
    assert len(compare.read_prompts(str(ROOT / "bench/data/prompts.txt"))) == 20
