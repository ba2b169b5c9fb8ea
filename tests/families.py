"""Tiny random-init checkpoints of every supported family, made the way a new user would make them.

`AutoConfig.for_model(model_type, ...)` + `AutoModelForCausalLM.from_config` + `save_pretrained`:
nothing of the project is used to make them, so the split is tested against transformers alone.
Families with sliding-window layers get a window of 6 and prompts longer than it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

WINDOW = 6
COMMON = dict(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
# What each family needs beyond COMMON: its sliding window and layer pattern, non-trivial multipliers.
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "ministral": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma": {},
    "gemma2": dict(sliding_window=WINDOW, query_pre_attn_scalar=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(sliding_window=WINDOW, query_pre_attn_scalar=8, sliding_window_pattern=2, final_logit_softcapping=30.0),
    "phi3": dict(sliding_window=WINDOW),
    "olmo": {},
    "olmo2": {},
    "olmo3": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]),
    "glm": {},
    "glm4": {},
    "helium": {},
    "starcoder2": dict(sliding_window=WINDOW),
    "stablelm": {},
    "apertus": {},
    "arcee": {},
    "seed_oss": {},
    "smollm3": {},
    "exaone4": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]),
    "nemotron": {},
    "granite": dict(embedding_multiplier=3.0, logits_scaling=2.5, residual_multiplier=0.7, attention_multiplier=0.2),
    "cohere": dict(logit_scale=0.3),
    "cohere2": dict(sliding_window=WINDOW, logit_scale=0.3),
    "phi": {},
    "hunyuan_v1_dense": {},
    "ernie4_5": {},
    "jais2": {},
    "diffllama": {},
    "bitnet": {},
    "cwm": dict(sliding_window=WINDOW),
    "granite_swa": dict(
        sliding_window=WINDOW, embedding_multiplier=3.0, logits_scaling=2.5, residual_multiplier=0.7, attention_multiplier=0.2,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
}


def family_config(model_type: str, tie: bool = True, num_layers: int = 4):
    values = {**COMMON, **FAMILY_CONFIGS[model_type], "tie_word_embeddings": tie, "num_hidden_layers": num_layers}
    return AutoConfig.for_model(model_type, **values)


def make_family_checkpoint(folder: Path, model_type: str, tie: bool = True, seed: int = 0, num_layers: int = 4):
    """Save a random-init model of the family with weights large enough that every layer matters."""
    torch.manual_seed(seed)
    config = family_config(model_type, tie, num_layers)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("embed_tokens.weight") and model_type.startswith("gemma"):
                param.normal_(0.0, 0.05)  # Gemma multiplies embeddings by sqrt(hidden): keep the layers' share visible
            elif param.dim() == 2:
                param.normal_(0.0, 0.3)
            elif "norm" in name and param.mean().abs() > 0.5:  # norms scaling by w (LLaMA): around 1
                param.uniform_(0.5, 1.5)
            elif "norm" in name:  # norms scaling by 1 + w (Gemma), and norm biases: around 0
                param.uniform_(-0.3, 0.3)
    model.eval()
    model.save_pretrained(folder)
    return folder, model
