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
