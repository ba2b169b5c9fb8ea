"""What each part of the split model computes.

The three parts are LlamaModel subclasses that keep the full list of decoder layers, so that each
layer keeps its global index (and its KV-cache slot), but put `nn.Identity` in place of the layers
the part never runs. All of them run a layer the same way, `SplitLlamaModel.run_layer`: one chunk of
consecutive positions on top of that layer's own KV cache. That is the only forward code here; the
decoder layers, rotary embedding and mask are transformers' own.

    First  : embeddings + layers [0, a)
    Second : layers [a, b)
    Third  : layers [b, L) + final norm + LM head
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel, LlamaRotaryEmbedding

from .checkpoint import load_lora_deltas, read_tensors


@dataclass
class Chunk:
    """Positions [start, start + length) with their rotary embedding and attention mask.

    The mask depends only on the start (the layer's cache holds exactly `start` positions), so one
    Chunk serves every layer whose cache is filled up to the same position.
    """

    start: int
    length: int
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None


class SplitLlamaModel(LlamaModel):
    """A LlamaModel that holds only the decoder layers in `owned_layers`, and optionally no embeddings or norm."""

    def __init__(self, config: LlamaConfig, owned_layers: Iterable[int], with_embeddings: bool, with_norm: bool):
        super().__init__(config)
        self.owned_layers = frozenset(owned_layers)
        self.replace_unused_layers_with_identity()
        if not with_embeddings:
            self.embed_tokens = None
        if not with_norm:
            self.norm = None

    def replace_unused_layers_with_identity(self) -> None:
        """Drop the weights of every layer this part never runs; indices of the others stay global."""
        for index in range(len(self.layers)):
            if index not in self.owned_layers:
                self.layers[index] = nn.Identity()

    def make_chunk(self, hidden_states: torch.Tensor, start: int, cache: Cache | None, layer_idx: int) -> Chunk:
        length = hidden_states.shape[1]
        position_ids = torch.arange(start, start + length, device=hidden_states.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        if length == 1:
            mask = None  # one query attends to every cached key: no mask needed
        else:
            # Sized from this layer's own cache (layer_idx): caches of different layers hold different lengths.
            # Several queries on top of a non-empty cache always get an explicit mask, never sdpa's
            # top-left-aligned is_causal.
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden_states,
                attention_mask=None,
                past_key_values=cache,
                position_ids=position_ids,
                layer_idx=layer_idx if cache is not None else None,
            )
        return Chunk(start, length, position_ids, position_embeddings, mask)

    def run_layer(self, index: int, hidden_states: torch.Tensor, chunk: Chunk, cache: Cache | None) -> torch.Tensor:
        """Run decoder layer `index` over one chunk, appending its keys and values to the cache."""
        if index not in self.owned_layers:
            raise RuntimeError(f"layer {index} is not held by this part")
        return self.layers[index](
            hidden_states,
            attention_mask=chunk.mask,
            position_ids=chunk.position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            position_embeddings=chunk.position_embeddings,
        )

    def run_owned_layers(self, hidden_states: torch.Tensor, start: int = 0, cache: Cache | None = None) -> torch.Tensor:
        """All owned layers on one chunk, for a fixed split where every layer's cache has the same length."""
        chunk = None
        for index in sorted(self.owned_layers):
            chunk = chunk or self.make_chunk(hidden_states, start, cache, index)
            hidden_states = self.run_layer(index, hidden_states, chunk, cache)
        return hidden_states


class FirstLlamaModel(SplitLlamaModel):
    """Embeddings + layers [0, a): runs on the edge."""

    def __init__(self, config: LlamaConfig, owned_layers: Iterable[int]):
        super().__init__(config, owned_layers, with_embeddings=True, with_norm=False)

    def forward(self, input_ids: torch.LongTensor, start: int = 0, cache: Cache | None = None) -> torch.Tensor:
        return self.run_owned_layers(self.embed_tokens(input_ids), start, cache)


class SecondLlamaModel(SplitLlamaModel):
    """Layers [a, b) only: runs in the cloud, which never holds embeddings, norm or head."""

    def __init__(self, config: LlamaConfig, owned_layers: Iterable[int]):
        super().__init__(config, owned_layers, with_embeddings=False, with_norm=False)

    def forward(self, hidden_states: torch.Tensor, start: int = 0, cache: Cache | None = None) -> torch.Tensor:
        return self.run_owned_layers(hidden_states, start, cache)


class ThirdLlamaModel(SplitLlamaModel):
    """Layers [b, L) + final norm: runs on the edge (or, in the two-part split, in the cloud)."""

    def __init__(self, config: LlamaConfig, owned_layers: Iterable[int]):
        super().__init__(config, owned_layers, with_embeddings=False, with_norm=True)

    def forward(self, hidden_states: torch.Tensor, start: int = 0, cache: Cache | None = None) -> torch.Tensor:
        return self.norm(self.run_owned_layers(hidden_states, start, cache))


class SplitLlamaForCausalLM(LlamaPreTrainedModel):
    """Shared loading for the three parts: built on the meta device, then only the part's own tensors are read."""

    model_class: type[SplitLlamaModel]

    def __init__(self, config: LlamaConfig, owned_layers: Iterable[int]):
        super().__init__(config)
        self.model = self.model_class(config, owned_layers)

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: Path,
        config: LlamaConfig,
        owned_layers: Iterable[int],
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        lora_weights: str | None = None,
        shared: dict[str, torch.Tensor] | None = None,
    ) -> "SplitLlamaForCausalLM":
        """Build on meta, drop unused layers, then read exactly the tensors this part holds.

        `shared` hands in tensors this side already holds (the edge's tied embedding, used again as LM head).
        """
        with torch.device("meta"):
            part = cls(config, owned_layers)
        shared = shared or {}
        wanted = {name: cls.checkpoint_name(name, config) for name, _ in part.named_parameters() if name not in shared}
        tensors = read_tensors(model_dir, wanted, dtype, device)
        if lora_weights:
            for name, delta in load_lora_deltas(lora_weights, part.model.owned_layers).items():
                if name in tensors:
                    tensors[name] = (tensors[name].float() + delta.to(device)).to(dtype)
        tensors.update(shared)
        part.load_state_dict(tensors, strict=True, assign=True)
        # Non-persistent buffers (rotary inv_freq) are not in the checkpoint: build them for real.
        part.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(device)
        return part.eval().requires_grad_(False)

    @staticmethod
    def checkpoint_name(name: str, config: LlamaConfig) -> str:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return name

    def parameter_count(self, exclude: Iterable[torch.Tensor] = ()) -> int:
        excluded = {id(t) for t in exclude}
        return sum(p.numel() for p in self.parameters() if id(p) not in excluded)


class FirstLlamaForCausalLM(SplitLlamaForCausalLM):
    model_class = FirstLlamaModel

    def forward(self, input_ids: torch.LongTensor, start: int = 0, cache: Cache | None = None) -> torch.Tensor:
        """Hidden states at the first cut."""
        return self.model(input_ids, start, cache)


class SecondLlamaForCausalLM(SplitLlamaForCausalLM):
    model_class = SecondLlamaModel

    def forward(self, hidden_states: torch.Tensor, start: int = 0, cache: Cache | None = None) -> torch.Tensor:
        """Hidden states at the second cut."""
        return self.model(hidden_states, start, cache)


class ThirdLlamaForCausalLM(SplitLlamaForCausalLM):
    model_class = ThirdLlamaModel

    def __init__(self, config: LlamaConfig, owned_layers: Iterable[int]):
        super().__init__(config, owned_layers)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, start: int = 0, cache: Cache | None = None) -> torch.Tensor:
        """Logits for every position of the chunk."""
        return self.lm_head(self.model(hidden_states, start, cache))

    def head(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the hidden state after the last decoder layer (before the final norm)."""
        return self.lm_head(self.model.norm(last_hidden))
