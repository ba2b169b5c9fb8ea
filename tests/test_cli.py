"""Bad input on the command line: one line on stderr, exit code 2, no traceback."""
import subprocess
import sys

import pytest

from src.cli import run
from tests.conftest import ROOT

THREE = ({1}, {29})


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--first", "31"], "split index 31 is outside [0, 30]"),
        (["--second", "-1"], "split index -1 is outside [0, 30]"),
        (["--first", "20", "--second", "10"], "max(first) = 20 > min(second) = 10"),
        (["--first", "1,8", "--second", "5,29"], "max(first) = 8 > min(second) = 5"),
        (["--first", ""], "empty set"),
        (["--first", "1,x"], "'x' is not an integer"),
        (["--first", "1,,2"], "'1,,2' has an empty item"),
        (["--second", "28,"], "'28,' has an empty item"),
        (["--first", "\u0663"], "'\u0663' is not an integer"),  # an Arabic-Indic 3, which int() reads
        (["--first", "1_0"], "'1_0' is not an integer"),
        (["--codec", "zip"], "unknown codec 'zip'"),
        (["--base-model", "/no/such/model"], "no such model folder"),
        (["--prompt", "word " * 9000], "exceeds the model's context of 8192"),
        (["--edge-dtype", "float8"], "unknown dtype 'float8'"),
        (["--max-new-tokens", "0"], "at least 1"),
        (["--do-sample", "--temperature", "0"], "--temperature 0.0: must be at least 1e-05 when sampling"),
        (["--do-sample", "--temperature", "1e-300"], "--temperature 1e-300: must be at least 1e-05 when sampling"),
        (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k -1: must be an integer in [0, 2**32)"),
        (["--do-sample", "--top-k", "999999999999"], "--top-k 999999999999: must be an integer in [0, 2**32)"),
        (["--seed", "-5"], "--seed -5: the split schedule's seed must be an integer in [0, 2**64)"),
        (["--resplit-every", "99999999999999999999999"], "--resplit-every 99999999999999999999999: must be an integer in [0, 2**32)"),
        (["--resplit-every", "-1"], "--resplit-every -1: must be an integer in [0, 2**32)"),
        (["--uplink-noise", "inf"], "--uplink-noise inf: must be finite and >= 0"),
        (["--edge-device", "foo"], "--edge-device foo: not a device this process can use"),
        (["--cloud-device", "cuda:99"], "--cloud-device cuda:99: not a device this process can use"),
        (["--edge-device", "meta"], "--edge-device meta: not a device this process can use (the meta device holds shapes"),
        (["--cloud", "grpc://[::1"], "--cloud grpc://[::1: Invalid IPv6 URL"),
        (["--cloud", "grpc://127.0.0.1:1", "--cloud-timeout", "inf"], "--cloud-timeout inf: must be > 0 and at most 2147483 seconds"),
        (["--cloud", "grpc://127.0.0.1:1", "--tls-server-name", "cloud.example"],
         "--tls-server-name cloud.example: the link to 127.0.0.1:1 is not TLS"),  # was silently plaintext
        (["--prompt", "hi \udcff\udcfe"], "the prompt is not valid UTF-8 text (at character 3)"),
        (["--min-p", "2"], "--min-p 2.0: must be in [0, 1]"),
        (["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be in [0.01, 100]"),
        (["--stop", ""], "--stop: a stop string must not be empty"),
        (["--stop", "end\udcff"], "--stop: a stop string is not valid UTF-8 text (at character 3)"),  # undecodable argv bytes
        (["--lora-weights", "/tmp"], "--lora-weights /tmp: cannot load a PEFT LoRA adapter"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(argv, expected, capsys):
    assert run("three", *THREE, argv + ["--json"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert expected in lines[-1] and lines[-1].startswith("main_3_split.py: error:")
    assert all(line.startswith("[triadic split") for line in lines[:-1])  # at most the run's header line before it
    assert "Traceback" not in captured.err and captured.out == ""


def test_main_1_refuses_sets_that_need_a_cloud(capsys):
    assert run("one", None, None, ["--first", "3", "--second", "5"]) == 2
    assert "runs unsplit" in capsys.readouterr().err


def test_a_script_with_its_sets_set_to_none_gets_one_line(capsys):
    # A user who blanks the sets at the top of main_3_split.py (or main_2_split.py's first) is told what to give.
    assert run("three", None, None, []) == 2
    assert run("two", None, None, []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["main_3_split.py: error: no split sets: give --first and --second",
                   "main_2_split.py: error: no split sets: give --first and --second"]


def test_the_edge_servers_unsplit_baseline_drops_every_link_flag(tiny_with_tokenizer):
    # The baseline runs without a cloud: a TLS cloud's --tls-server-name used to follow it there and be refused
    # ("--tls-ca, --tls-server-name and --token-file go with --cloud") the first time the baseline was asked for.
    from src.cli import LINK_FLAGS, baseline_args, build_from_args
    from src.serve.edge_server import make_parser

    args = make_parser().parse_args(["--base-model", str(tiny_with_tokenizer[0]), "--cloud", "grpc://127.0.0.1:1", "--tls-ca", "ca.pem",
                                     "--tls-server-name", "cloud.example", "--token-file", "token"])
    baseline = baseline_args(args)
    assert [getattr(baseline, name) for name in LINK_FLAGS] == [None] * 4 and args.tls_server_name == "cloud.example"
    pipeline = build_from_args("one", baseline, None, None)
    assert pipeline.cloud is None and pipeline.edge.link is None and pipeline.schedule.needs_cloud is False


def test_a_real_process_prints_no_traceback():
    process = subprocess.run(
        [sys.executable, "main_3_split.py", "--first", "4,9", "--second", "7", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == ["main_3_split.py: error: max(first) = 9 > min(second) = 7: the pair (9, 7) would put the second cut before the first"]


def test_a_real_process_that_loads_peft_prints_its_one_line_alone(tmp_path):
    """peft imports bitsandbytes, which warned at import about an optional 4-bit kernel on CPUs with AVX-512 bf16."""
    process = subprocess.run([sys.executable, "main_3_split.py", "--lora-weights", str(tmp_path), "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [f"main_3_split.py: error: --lora-weights {tmp_path}: cannot load a PEFT LoRA adapter (ValueError)"]
    assert process.stdout == ""


def test_two_part_refuses_a_repetition_penalty(capsys):
    assert run("two", {15}, None, ["--repetition-penalty", "1.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "never sees the prompt's tokens" in err[0]


def test_a_checkpoint_that_does_not_match_its_tokenizer_or_config_gets_one_line(tiny_with_tokenizer, embedded, tmp_path, capsys):
    """A tokenizer whose ids pass the model's vocabulary (an IndexError in the embedding), and a config.json whose shapes
    are not the weights' (load_state_dict's many-line size mismatch): each one line and exit 2."""
    import json
    import shutil

    from tests.tiny import make_tiny_checkpoint

    small, _ = make_tiny_checkpoint(tmp_path / "small_vocabulary", vocab_size=100, eos_token_id=2, pad_token_id=2)
    embedded[2].save_pretrained(small)  # SmolLM2's tokenizer: 49,152 ids
    reshaped = tmp_path / "reshaped"
    shutil.copytree(tiny_with_tokenizer[0], reshaped)
    config = json.loads((reshaped / "config.json").read_text())
    (reshaped / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    cases = {small: "outside the model's vocabulary of 100: the tokenizer does not match the checkpoint",
             reshaped: "by config.json: they do not match"}
    for folder, expected in cases.items():
        for mode, sets in (("three", ({1}, {3})), ("one", ({2}, {2}))):
            assert run(mode, *sets, ["--base-model", str(folder), "--max-new-tokens", "2", "--prompt", "Hello"]) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert expected in lines[-1] and "Traceback" not in "\n".join(lines), (folder.name, mode, lines)


def test_the_unsplit_baseline_computes_as_a_lossless_run_whatever_the_codec(tiny_with_tokenizer, capsys):
    """main_1_split.py sends nothing: with the default --codec int8 it must still be HF's computation (transformers'
    layout, no panels), not a lossy side's, whose bf16 products can change a token."""
    import json

    argv = ["--base-model", str(tiny_with_tokenizer[0]), "--max-new-tokens", "4", "--prompt", "Hello", "--json"]
    assert run("one", {2}, {2}, argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["codec"] == "none" and "codec=none" in captured.err


def test_generation_config_decides_like_generate_or_is_named(tiny_with_tokenizer, tmp_path, capsys):
    """generation_config.json's end-of-sequence ids end a generation as they end `generate`'s (Llama 3 Instruct lists
    <|eot_id|> there only: the split ran past it); a repetition penalty set there, which the two-part split cannot
    apply, is named as the file's, not as a flag the user never passed."""
    import json
    import shutil

    import torch
    from transformers import GenerationConfig

    folder = tmp_path / "model"
    shutil.copytree(tiny_with_tokenizer[0], folder)
    model, prompt = tiny_with_tokenizer[1], [504, 2988, 314]  # "The answer is" in SmolLM2's vocabulary
    free = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=8,
                          do_sample=False, eos_token_id=None, pad_token_id=2)[0, 3:].tolist()
    GenerationConfig(eos_token_id=[2, free[3]]).save_pretrained(folder)  # the 4th token ends it; config.json says 2
    argv = ["--base-model", str(folder), "--prompt-format", "raw", "--prompt", "The answer is", "--max-new-tokens", "8",
            "--codec", "none", "--dtype", "float32", "--json"]
    assert run("three", {1}, {3}, argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["prompt_token_ids"] == prompt and report["token_ids"] == free[:4], (report["token_ids"], free)

    GenerationConfig(repetition_penalty=1.05).save_pretrained(folder)
    assert run("two", {1}, None, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generation_config.json sets repetition_penalty 1.05" in err[0], err
    assert run("two", {1}, None, [*argv, "--repetition-penalty", "1"]) == 0
    capsys.readouterr()
    GenerationConfig(no_repeat_ngram_size=2).save_pretrained(folder)  # needs the ids too, and no flag turns it off
    assert run("two", {1}, None, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generation_config.json sets no_repeat_ngram_size, which the two-part split cannot apply" in err[0], err
    (folder / "generation_config.json").write_text('{"eos_token_id": "12"}')  # was read as the ids [1, 2]
    assert run("three", {1}, {3}, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generation_config.json: eos_token_id must be a token id or a list of token ids, not '12'" in err[0], err
