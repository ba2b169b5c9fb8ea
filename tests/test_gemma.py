"""Gemma 3 270M, the second embedded model (18 layers, hidden 640, five sliding layers to one global).

The reference is transformers' own Gemma3ForCausalLM loaded from the converted folder, never the
project's code. The full matrix against a model loaded straight from the GGUF file (four fixed splits
and the moving sets, three prompts) is `python -m tools.gemma_exact` (results/gemma_exact.md).
"""
from __future__ import annotations

import pytest
import torch

from src.checkpoint import EMBEDDED_MODELS, load_config, load_tokenizer
from src.pipeline import build_pipeline
from tools.gemma_exact import chat_prompts, greedy_continuations

NEW = 32  # the full 48-token matrix against the GGUF-loaded model is tools.gemma_exact
# main_3_split.py's default sets {1..6}/{24..29} of 30 layers, scaled to 18 layers and rounded.
MOVING = ({1, 2, 3, 4}, {14, 15, 16, 17})


@pytest.fixture(scope="module")
def gemma():
    from transformers import AutoModelForCausalLM

    from src.checkpoint import embedded_model_dir

    folder = embedded_model_dir("gemma3-270m")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(folder)
    prompts = chat_prompts(tokenizer)
    return folder, model, prompts, greedy_continuations(model, prompts, NEW)


def test_gemma_is_what_the_readme_says(gemma):
    folder, model, prompts, _ = gemma
    config = load_config(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("gemma3_text", 18, 640, 262144)
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
    assert EMBEDDED_MODELS["gemma3-270m"].prompt_format == "raw"  # a base model: raw text by default
    assert all(ids[:2] == [2, 105] for ids in prompts)  # <bos><start_of_turn>: the Gemma turn format


@pytest.mark.parametrize("first,second", [({6}, {12}), MOVING])
def test_gemma_split_tokens_equal_generate(gemma, first, second):
    folder, _, prompts, references = gemma
    pipeline = build_pipeline(str(folder), first, second, with_tokenizer=False)
    for ids, reference in zip(prompts, references):
        assert pipeline.edge.generate(ids, NEW).token_ids == reference


def test_gemma_sliding_window_is_crossed_with_moving_cuts(gemma):
    """A prompt longer than the 512-position window: sliding layers keep only their window and stay exact."""
    folder, model, _, _ = gemma
    ids = [2] + [(17 * i) % 5000 + 300 for i in range(560)]
    tensor = torch.tensor([ids])
    out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=8, do_sample=False, eos_token_id=None)
    pipeline = build_pipeline(str(folder), *MOVING, seed=1, with_tokenizer=False)
    assert pipeline.edge.generate(ids, 8).token_ids == out[0, len(ids):].tolist()
    sliding = [layer for i, layer in enumerate(pipeline.edge.cache.layers) if getattr(layer, "is_sliding", False) and pipeline.edge.fill[i]]
    assert sliding and all(layer.keys.shape[-2] == 511 for layer in sliding)
