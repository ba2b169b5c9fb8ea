"""Every supported family, from tiny random-init checkpoints made by transformers alone: the split's
tokens equal HF generate(do_sample=False) at every fixed split and under moving cuts, sliding-window
layers included with prompts longer than the window; LoRA merges exactly or is refused; anything
else is refused in one line."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from families import COMMON, FAMILY_CONFIGS, WINDOW, family_config, make_family_checkpoint
from src.checkpoint import load_config
from src.families import SUPPORTED_MODEL_TYPES, attention_layer_types
from src.pipeline import build_pipeline
from src.utils import TriadicError
from tests.conftest import ROOT
from tiny import hf_greedy

PROMPT = [1, 5, 9, 33, 17, 80, 3, 41, 7, 12, 50]  # longer than the sliding window
NEW = 10
FAMILIES = sorted(FAMILY_CONFIGS)
_checkpoints: dict[tuple[str, bool], tuple] = {}


def checkpoint(model_type: str, tie: bool, tmp_path_factory) -> tuple:
    """One checkpoint and its reference generation per (family, tie), shared by the tests of this file."""
    key = (model_type, tie)
    if key not in _checkpoints:
        folder, model = make_family_checkpoint(tmp_path_factory.mktemp(f"{model_type}-{tie}"), model_type, tie=tie)
        _checkpoints[key] = (folder, model, *hf_greedy(model, PROMPT, NEW))
    return _checkpoints[key]


def max_logit_gap(logits, reference) -> float:
    assert len(logits) == len(reference)
    return max((x - y).abs().max().item() for x, y in zip(logits, reference))


def test_every_family_is_tested():
    assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_fixed_split_matches_generate(model_type, tmp_path_factory):
    """Tied embeddings at every 0 <= a <= b <= L; untied at the splits that touch the ends."""
    for tie in (True, False):
        folder, model, reference, reference_logits = checkpoint(model_type, tie, tmp_path_factory)
        assert len(set(reference)) >= 3  # the reference is not degenerate
        L = model.config.num_hidden_layers
        splits = [(a, b) for a in range(L + 1) for b in range(a, L + 1)] if tie else [(0, 4), (1, 3), (2, 2), (0, 1)]
        for a, b in splits:
            pipeline = build_pipeline(str(folder), {a}, {b}, with_tokenizer=False)
            result = pipeline.edge.generate(PROMPT, NEW, keep_logits=True)
            assert result.token_ids == reference, (tie, a, b)
            assert max_logit_gap(result.logits, reference_logits) < 1e-5, (tie, a, b)


def test_sliding_families_have_sliding_layers_and_prompts_beyond_the_window():
    sliding = [t for t in FAMILIES if "sliding_attention" in attention_layer_types(family_config(t))]
    assert {"mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo3", "cohere2"} <= set(sliding)
    hybrid = [t for t in sliding if "full_attention" in attention_layer_types(family_config(t))]
    assert {"gemma2", "gemma3_text", "qwen2", "olmo3"} <= set(hybrid)
    assert len(PROMPT) + NEW > 2 * WINDOW


@st.composite
def moving_cases(draw):
    L = 4
    middle = draw(st.integers(0, L))
    first = draw(st.sets(st.integers(0, middle), min_size=1, max_size=3))
    second = draw(st.sets(st.integers(middle, L), min_size=1, max_size=3))
    return dict(
        first=first, second=second, seed=draw(st.integers(0, 2**32 - 1)), tie=draw(st.booleans()),
        resplit_every=draw(st.sampled_from([1, 1, 2, 0])),
    )


@pytest.mark.parametrize("model_type", FAMILIES)
def test_moving_cuts_match_generate(model_type, tmp_path_factory):
    @settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(moving_cases())
    def check(case):
        folder, _, reference, reference_logits = checkpoint(model_type, case["tie"], tmp_path_factory)
        pipeline = build_pipeline(
            str(folder), case["first"], case["second"], seed=case["seed"], resplit_every=case["resplit_every"], with_tokenizer=False
        )
        result = pipeline.edge.generate(PROMPT, NEW, keep_logits=True)
        assert result.token_ids == reference
        assert max_logit_gap(result.logits, reference_logits) < 1e-4

    check()


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text", "phi3", "granite", "olmo2"])
def test_lora_merges_exactly_per_part(model_type, tmp_path_factory):
    """A PEFT adapter on every Linear of every layer, with per-module alpha and rank patterns."""
    from peft import LoraConfig, get_peft_model

    folder, model, _, _ = checkpoint(model_type, True, tmp_path_factory)
    targets = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name})
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={targets[0]: 2}, alpha_pattern={targets[-1]: 3})
    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    adapter = tmp_path_factory.mktemp(f"lora-{model_type}")
    peft_model.save_pretrained(adapter)
    merged = peft_model.merge_and_unload().eval()
    reference, reference_logits = hf_greedy(merged, PROMPT, NEW)
    for first, second in [({1}, {3}), ({0, 2}, {2, 4})]:
        pipeline = build_pipeline(str(folder), first, second, lora_weights=str(adapter), with_tokenizer=False)
        result = pipeline.edge.generate(PROMPT, NEW, keep_logits=True)
        assert result.token_ids == reference
        assert max_logit_gap(result.logits, reference_logits) < 1e-4


@pytest.mark.parametrize("field,value,why", [
    ("use_dora", True, "DoRA"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("target_modules", ["embed_tokens"], "not a LoRA update of a Linear layer"),
    ("target_modules", ["lm_head"], "lm_head"),
])
def test_lora_that_cannot_merge_exactly_is_refused(field, value, why, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    folder, model, _, _ = checkpoint("llama", False, tmp_path_factory)
    values = {"r": 2, "target_modules": ["q_proj"], field: value}
    peft_model = get_peft_model(type(model)(model.config), LoraConfig(**values))
    adapter = tmp_path_factory.mktemp("lora-refused")
    peft_model.save_pretrained(adapter)
    with pytest.raises(TriadicError, match=why):
        build_pipeline(str(folder), {1}, {3}, lora_weights=str(adapter), with_tokenizer=False)


UNSUPPORTED = {
    "mixtral": "mixture-of-experts",
    "qwen3_moe": "mixture-of-experts",
    "t5": "encoder-decoder",
    "mamba": "state-space",
    "llava": "multimodal",
    "gpt2": "dense decoder-only families",
}


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED))
def test_unsupported_model_types_are_refused_by_name(model_type, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    with pytest.raises(TriadicError, match=f"model type '{model_type}' is not supported: .*{UNSUPPORTED[model_type]}"):
        load_config(tmp_path)


def test_cli_refuses_an_unsupported_model_in_one_line(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("mixtral").save_pretrained(tmp_path)
    run = subprocess.run(
        [sys.executable, "main_3_split.py", "--base-model", str(tmp_path), "--first", "1", "--second", "3", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().count("\n") == 0 and "model type 'mixtral' is not supported" in run.stderr


def bad_model_inputs(tmp_path) -> dict[str, tuple[str, str]]:
    """--base-model values a careless user gives, each with the words its error line must contain."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text("{not json")
    (tmp_path / "noweights").mkdir()
    family_config("llama").save_pretrained(tmp_path / "noweights")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(60))
    (tmp_path / "notes.txt").write_text("hello")
    for name, field in [("negative_layers", "num_hidden_layers"), ("negative_hidden", "hidden_size")]:
        family_config("llama").save_pretrained(tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, field: -3 if field == "num_hidden_layers" else -1}))
    return {
        "negative layer count": (str(tmp_path / "negative_layers"), "config.json has num_hidden_layers = -3, not a positive integer"),
        "negative hidden size": (str(tmp_path / "negative_hidden"), "cannot read its config.json (The hidden size (-1) is not a multiple"),
        "empty string": ("", "--base-model: empty"),
        "folder without config": (str(tmp_path / "empty"), "folder has no config.json"),
        "unreadable config": (str(tmp_path / "garbage"), "cannot read its config.json"),
        "no tokenizer": (str(tmp_path / "noweights"), "cannot load its tokenizer"),
        "broken gguf": (str(tmp_path / "broken.gguf"), "cannot read this GGUF file"),
        "text file": (str(tmp_path / "notes.txt"), "not a model folder, a .gguf file"),
    }


def test_bad_base_model_gives_one_line_and_exit_2(tmp_path, capsys):
    from src.cli import run

    for what, (value, expected) in bad_model_inputs(tmp_path).items():
        assert run("three", {1}, {3}, ["--base-model", value, "--json"]) == 2, what
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert expected in lines[-1] and lines[-1].startswith("main_3_split.py: error:"), (what, captured.err)
        assert "Traceback" not in captured.err and captured.out == "", what


def test_a_damaged_model_folder_gives_one_line_and_exit_2(tiny_with_tokenizer, tmp_path, capsys):
    """An interrupted copy, a file that is not safetensors at all, a chat template that does not parse."""
    from src.cli import run

    folder, _ = tiny_with_tokenizer
    damaged = {}
    for name, file, content in [
        ("truncated", "model.safetensors", (folder / "model.safetensors").read_bytes()[:-1000]),
        ("garbage", "model.safetensors", bytes(range(256)) * 20),
        ("template", "chat_template.jinja", b"{% if %}"),
    ]:
        shutil.copytree(folder, tmp_path / name)
        (tmp_path / name / file).write_bytes(content)
        damaged[name] = tmp_path / name
    shutil.copytree(folder, tmp_path / "missing_shard")  # an index that names a shard that is not there
    (tmp_path / "missing_shard" / "model.safetensors").unlink()
    with safe_open(folder / "model.safetensors", "pt") as f:
        index = {"weight_map": {name: "model-00001-of-00002.safetensors" for name in f.keys()}}
    (tmp_path / "missing_shard" / "model.safetensors.index.json").write_text(json.dumps(index))
    damaged["missing_shard"] = tmp_path / "missing_shard"
    for name, flags, expected in [
        ("missing_shard", [], "model-00001-of-00002.safetensors: not a readable safetensors file (No such file"),
        ("truncated", [], "model.safetensors: not a readable safetensors file (Error while deserializing header: incomplete metadata"),
        ("garbage", [], "model.safetensors: not a readable safetensors file (Error while deserializing header"),
        ("template", ["--prompt-format", "chat"], "the tokenizer's chat template fails: Expected an expression"),
    ]:
        assert run("three", {1}, {3}, ["--base-model", str(damaged[name]), "--max-new-tokens", "2", *flags]) == 2, name
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert expected in lines[-1] and lines[-1].startswith("main_3_split.py: error:"), (name, captured.err)
        assert "Traceback" not in captured.err and captured.out == "", name


def test_gemma3_lossy_link_weighs_channels_by_the_receiving_norm_gain(tmp_path_factory):
    """int8 quantizes h * |1 + w| (w: the receiving layer's norm weight) and the receiver divides it back out."""
    from src.link.codec import get_codec

    folder, model, reference, _ = checkpoint("gemma3_text", True, tmp_path_factory)
    pipeline = build_pipeline(str(folder), {1, 2}, {3, 4}, "int8", with_tokenizer=False)
    for side in (pipeline.edge, pipeline.cloud):
        assert sorted(side.link_gains) == [1, 2, 3, 4]
    norm = model.model.layers[3].input_layernorm.weight.detach()
    gain = pipeline.edge.link_gains[3]
    assert torch.allclose(gain, (1 + norm).abs().clamp_min(0.1 * float((1 + norm).abs().mean())))
    states = torch.randn(3, gain.shape[0])
    int8, lossless = get_codec("int8"), get_codec("none")
    assert torch.allclose(pipeline.cloud.unweigh(3, pipeline.edge.weigh(3, states, int8), int8), states, atol=1e-6)
    assert pipeline.edge.weigh(3, states, lossless) is states  # lossless transport is never weighed
    assert pipeline.edge.generate(PROMPT, NEW).token_ids == reference  # and the tiny model's tokens survive int8
    llama = build_pipeline(str(checkpoint("llama", True, tmp_path_factory)[0]), {1}, {3}, "int8", with_tokenizer=False)
    assert llama.edge.link_gains == {} and llama.cloud.link_gains == {}  # LLaMA's link is unweighted, as before


COMMON_SMALL = {**COMMON, "num_attention_heads": 4, "head_dim": 8}
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 3.0, 5.0, 9.0]}


@pytest.mark.parametrize("model_type", ["phi3", "llama"])
def test_a_longrope_model_runs_to_its_original_length_exactly_and_is_refused_past_it(model_type, tmp_path):
    """Past `original_max_position_embeddings` transformers rotates every position by the long factors (Phi-3's generate
    computes its whole cache again there); the split runs such a model up to that length, where generate does not
    switch, and refuses a request past it in one line, on the edge, the edge server and the cloud server alike."""
    from transformers import AutoModelForCausalLM

    from src.serve.cloud_server import make_limits, make_parser

    values = {**COMMON_SMALL, "rope_parameters": dict(LONGROPE), "max_position_embeddings": 64, "original_max_position_embeddings": 16}
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path)
    prompt = [1, 5, 9, 33, 17, 80, 3, 41, 7]
    reference, reference_logits = hf_greedy(model, prompt, 16 - len(prompt))  # the sequence ends at the original length
    for first, second, seed in (({1}, {3}, 0), ({0, 1, 2}, {2, 3, 4}, 5)):
        edge = build_pipeline(str(tmp_path), first, second, seed=seed, with_tokenizer=False).edge
        result = edge.generate(prompt, 16 - len(prompt), keep_logits=True)
        assert result.token_ids == reference and max_logit_gap(result.logits, reference_logits) < 1e-4
        with pytest.raises(TriadicError, match="exceeds the model's context of 16 \\(its longrope RoPE's original length"):
            edge.generate(prompt, 16 - len(prompt) + 1)
    limits = make_limits(make_parser().parse_args([]), load_config(tmp_path))
    assert limits.context == 16 and limits.session_positions == 16


def test_a_sliding_window_of_one_is_refused_in_one_line(tmp_path):
    """transformers' sliding cache keeps every position at a window of 1, and a chunk over a cache then fails."""
    family_config("mistral").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 1}))
    with pytest.raises(TriadicError, match="sliding_window 1: the split runs sliding windows of 2 positions or more"):
        load_config(tmp_path)
