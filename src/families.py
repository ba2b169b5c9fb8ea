"""Model families: what each one does outside its decoder layers, declared once.

The split path (src/models.py) runs a family's own transformers modules: its embedding, its decoder
layers, its final norm, its rotary embedding, and transformers' mask functions. What differs between
dense decoder-only families is small and lives here, one `Family` entry each:

- which rotary embedding a layer uses (one shared, or one per layer type as in Gemma 3's local and
  global RoPE);
- factors the family's `forward` applies around the modules (Granite's embedding multiplier and logit
  divisor, Cohere's logit scale, Gemma 2's final logit soft-capping);
- module names that are not LLaMA's (Phi's `final_layernorm`);
- how a lossy link weighs the channels it quantizes (Gemma 3: by the receiving norm's gain).

Which mask a layer uses follows from the config's layer types (full or sliding attention), for every
family alike. To add a family: make a tiny random-init checkpoint of it (tests/families.py), add its
model type to an entry below (or a new entry for what it does differently), and run
tests/test_families.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from .utils import TriadicError

# Attention layer types the split path runs: full causal attention and sliding-window attention.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Family:
    """The declared differences of one model family; the defaults are LLaMA's."""

    model_types: tuple[str, ...]  # config.model_type values this entry serves
    rotary_per_layer_type: bool = False  # rotary_emb(h, positions, layer_type): a RoPE per layer type (Gemma 3)
    embedding_multiplier: str | None = None  # config field the token embeddings are multiplied by in forward()
    logit_softcap: str | None = None  # config field c (may be None in a config): logits = c * tanh(logits / c)
    logit_divisor: str | None = None  # config field the logits are divided by
    logit_multiplier: str | None = None  # config field the logits are multiplied by
    norm: str = "norm"  # attribute of the base model holding the final norm
    # Lossy links (int8) quantize h * g and send back h, with g = |offset + w| the gain the receiving
    # layer's norm gives each channel (None: g = 1). Gemma's residual stream carries small channels that
    # its norms scale up; quantizing evenly across channels buries them (KL 1e-3 instead of 5e-5).
    link_gain_offset: float | None = None
    # Whether its attention gets the keys and values its cache returned, as they are: cross-session
    # batching (src/serve/batching.py) reads each session's own from its cache. DiffLlama splits the values
    # into two halves first, so its sessions are not batched.
    batchable: bool = True

    def scale_embeddings(self, config: PretrainedConfig, embeddings: torch.Tensor) -> torch.Tensor:
        if self.embedding_multiplier is None:
            return embeddings
        return embeddings * getattr(config, self.embedding_multiplier)

    def process_logits(self, config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
        """What the family's *ForCausalLM.forward does to the LM head's output, in the same order."""
        if self.logit_multiplier is not None:
            logits = logits * getattr(config, self.logit_multiplier)
        if self.logit_divisor is not None:
            logits = logits / getattr(config, self.logit_divisor)
        cap = getattr(config, self.logit_softcap, None) if self.logit_softcap else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


FAMILIES = (
    # LLaMA's shape: embeddings, layers, norm, one rotary embedding, plain logits. The layers
    # differ (GQA, biases, q/k norms, fused projections, post-norms, sliding windows) but are the
    # family's own modules, so they need no entry of their own.
    Family((
        "llama", "mistral", "ministral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "glm", "glm4",
        "helium", "starcoder2", "stablelm", "apertus", "arcee", "seed_oss", "smollm3", "exaone4",
        "nemotron", "hunyuan_v1_dense", "ernie4_5", "jais2", "bitnet", "cwm",
        "gemma",  # Gemma scales its embeddings inside its own embedding module
    )),
    Family(("diffllama",), batchable=False),
    Family(("gemma2",), logit_softcap="final_logit_softcapping"),
    Family(("gemma3_text",), rotary_per_layer_type=True, logit_softcap="final_logit_softcapping", link_gain_offset=1.0),
    Family(("olmo3",), rotary_per_layer_type=True),
    Family(("granite", "granite_swa"), embedding_multiplier="embedding_multiplier", logit_divisor="logits_scaling"),
    Family(("cohere", "cohere2"), logit_multiplier="logit_scale"),
    Family(("phi",), norm="final_layernorm"),
)
FAMILY_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILY_BY_MODEL_TYPE))


def family_for(config: PretrainedConfig, source: str = "") -> Family:
    """The family of a checkpoint's config, or a one-line TriadicError that names its model type and why."""
    model_type = getattr(config, "model_type", None)
    where = f"{source}: " if source else ""
    if model_type in FAMILY_BY_MODEL_TYPE:
        family = FAMILY_BY_MODEL_TYPE[model_type]
        layer_types = attention_layer_types(config)
        unsupported = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
        if unsupported:
            raise TriadicError(f"{where}model type {model_type!r} has {unsupported[0]} layers; the split runs full and sliding attention only")
        window = getattr(config, "sliding_window", None)
        if "sliding_attention" in layer_types and isinstance(window, int) and window < 2:
            # transformers' sliding cache keeps window - 1 positions by a slice that keeps them all at 1: its chunks over a
            # cache (a session's next turn, a moving cut's catch-up) then fail, where generate never runs one
            raise TriadicError(f"{where}sliding_window {window}: the split runs sliding windows of 2 positions or more")
        return family
    raise TriadicError(f"{where}model type {model_type!r} is not supported: {_why_not(config)}")


def context_length(config: PretrainedConfig) -> tuple[int, str]:
    """The positions the split runs as generate does, and, where they are fewer than the model's, why (for messages).

    A longrope RoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) rotates a call's positions with its short factors while the
    call's last position is within `original_max_position_embeddings`, with its long ones past it; and Phi-3's
    generate, on first passing that length, drops its cache and computes the whole sequence again with the long ones.
    The split computes a step's rotary once for all its chunks (a lagging layer's catch-up included) and keeps its
    caches, so it runs such a model up to that length, where both always use the short factors."""
    context = int(config.max_position_embeddings)
    parameters = getattr(config, "rope_parameters", None) or {}
    per_type = [parameters] if "rope_type" in parameters else [p for p in parameters.values() if isinstance(p, dict)]
    originals = [p.get("original_max_position_embeddings") for p in per_type if p.get("rope_type") == "longrope"]
    if originals:
        originals.append(getattr(config, "original_max_position_embeddings", None))  # Phi-3's generate reads this one
        limit = min([context] + [int(n) for n in originals if isinstance(n, int) and n > 0])
        if limit < context:
            return limit, (" (its longrope RoPE's original length: past it transformers switches every position to the long"
                           " factors, which the split does not)")
    return context, ""


def _why_not(config: PretrainedConfig) -> str:
    """The reason a config is refused, in the words of the field."""
    model_type = str(getattr(config, "model_type", ""))
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not split (decoder-only models are)"
    if any(getattr(config, name, None) for name in ("vision_config", "audio_config", "vision_tower", "image_token_id")):
        return "multimodal models are not split (use a text-only checkpoint)"
    if any(getattr(config, name, None) for name in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")):
        return "mixture-of-experts models are not split (dense decoder-only models are)"
    if any(word in model_type for word in ("mamba", "rwkv", "jamba", "zamba", "bamba", "hybrid", "xlstm", "lfm2")):
        return "state-space and recurrent models are not split (attention decoders are)"
    return f"the split covers the dense decoder-only families {', '.join(SUPPORTED_MODEL_TYPES)}"


def attention_layer_types(config: PretrainedConfig) -> list[str]:
    """Each layer's attention type, as transformers' own caches read it (full unless a window is set)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    return list(get_layer_types_and_kwargs(config)[0])
