"""Tiny random-init LLaMA checkpoints for exactness tests (no tokenizer needed: tests work on token ids)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_config(num_layers: int = 4, tie: bool = True, **overrides) -> LlamaConfig:
    values = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=10000.0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def make_tiny_checkpoint(folder: Path, seed: int = 0, **config_overrides) -> tuple[Path, LlamaForCausalLM]:
    """Save a random-init model with non-trivial weights; return the folder and the unsplit model."""
    torch.manual_seed(seed)
    config = tiny_config(**config_overrides)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than default init, so that tokens depend on every layer
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    model.eval()
    model.save_pretrained(folder)
    return folder, model


def hf_greedy(model: LlamaForCausalLM, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Reference: unsplit Hugging Face generate(do_sample=False), with its per-step logits."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(  # an all-ones mask: never let generate mask prompt tokens equal to the pad id
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
    )
    return out.sequences[0, len(prompt_ids):].tolist(), [l[0] for l in out.logits]


def hf_sample(model, prompt_ids: list[int], max_new_tokens: int, seed: int, pad_token_id: int = 0, **options) -> list[int]:
    """Reference: unsplit Hugging Face generate(do_sample=True, ...) after torch.manual_seed(seed)."""
    ids = torch.tensor([prompt_ids])
    torch.manual_seed(seed)
    out = model.generate(  # an all-ones mask, as above
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=True,
        eos_token_id=None, pad_token_id=pad_token_id, **options,
    )
    return out[0, len(prompt_ids):].tolist()
