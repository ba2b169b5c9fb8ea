"""What each part of the split model computes, for every supported model family.

A part holds the modules of the family's own base model (`LlamaModel`, `Qwen3Model`,
`Gemma3TextModel`, ... built from the checkpoint's config): the full list of decoder layers, so that
each layer keeps its global index and KV-cache slot, with `nn.Identity` in place of the layers the
part never runs. Every part runs a layer the same way, `SplitLlamaModel.run_layer`: one chunk of
consecutive positions on top of that layer's own KV cache, with the family's rotary embedding and
transformers' mask for that layer's attention type (full or sliding window). That is the only forward
code here; what a family does differently is declared in src/families.py.

    First  : embeddings + layers [0, a)
    Second : layers [a, b)
    Third  : layers [b, L) + final norm + LM head

The class names are the original design's; they serve every family, not only LLaMA.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.initialization import no_init_weights
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import local_torch_dtype

from .checkpoint import laid_out, load_lora_deltas, read_tensors
from .families import Family, attention_layer_types, family_for
from .utils import TriadicError

MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


@dataclass
class Chunk:
    """Positions [start, start + length) with their rotary embedding and attention mask.

    The mask depends only on the start (the layer's cache holds exactly `start` positions) and the
    layer's attention type, so one Chunk serves every layer of that type filled up to the same position.
    """

    start: int
    length: int
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None


class SplitLlamaModel(nn.Module):
    """The family's base-model modules that one part holds: some decoder layers, maybe embeddings and norm."""

    def __init__(self, base: nn.Module, family: Family, owned_layers: Iterable[int], with_embeddings: bool, with_norm: bool):
        super().__init__()
        self.config: PretrainedConfig = base.config
        self.family = family
        self.owned_layers = frozenset(owned_layers)
        self.layer_types = attention_layer_types(self.config)
        self.embed_tokens = base.embed_tokens if with_embeddings else None
        self.layers = nn.ModuleList(
            layer if index in self.owned_layers else nn.Identity() for index, layer in enumerate(base.layers)
        )
        self.norm = getattr(base, family.norm) if with_norm else None
        self.rotary_emb = base.rotary_emb

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the family's forward() makes them (Gemma scales inside its module, Granite here)."""
        assert self.embed_tokens is not None, "embed() on a part without the embeddings"
        return self.family.scale_embeddings(self.config, self.embed_tokens(input_ids))

    def rotary(self, hidden_states: torch.Tensor, start: int, end: int, layer_idx: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Position ids and the family's rotary embedding (cos, sin) of positions start .. end-1.

        Each position's row depends on that position alone, so rows of a longer range ending at the same
        position are the same numbers: a side computes one range per step and slices it (Party._chunk).
        """
        position_ids = torch.arange(start, end, device=hidden_states.device).unsqueeze(0)
        if self.family.rotary_per_layer_type:
            return position_ids, self.rotary_emb(hidden_states, position_ids, self.layer_types[layer_idx])
        return position_ids, self.rotary_emb(hidden_states, position_ids)

    def make_chunk(self, hidden_states: torch.Tensor, start: int, cache: Cache | None, layer_idx: int,
                   rotary: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Chunk:
        """The chunk of `hidden_states` at `start` for this layer's attention type; `rotary` if already made."""
        length = hidden_states.shape[1]
        position_ids, position_embeddings = rotary or self.rotary(hidden_states, start, start + length, layer_idx)
        if length == 1 and cache is not None and self.layer_types[layer_idx] == "full_attention":
            # One query on top of a full-attention layer's cache sees every position the cache holds, so no
            # mask: what transformers decides too. A sliding layer's single query gets transformers' own
            # mask below: once its cache holds a full window that mask is all True, but transformers passes
            # it, and a mask changes sdpa's kernel (grouped heads packed, not enable_gqa), so the sums.
            return Chunk(start, length, position_ids, position_embeddings, None)
        # Sized from this layer's own cache (layer_idx): caches of different layers hold different lengths,
        # and sliding layers keep only their window. Several queries on top of a non-empty cache always get
        # an explicit mask, never sdpa's top-left-aligned is_causal.
        mask = MASK_FUNCTIONS[self.layer_types[layer_idx]](
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=None,
            past_key_values=cache,
            position_ids=position_ids,
            layer_idx=layer_idx if cache is not None else None,
        )
        return Chunk(start, length, position_ids, position_embeddings, mask)

    def chunk_key(self, start: int, layer_idx: int) -> tuple[int, str]:
        """Layers with equal keys can share one Chunk."""
        return start, self.layer_types[layer_idx]

    def run_layer(self, index: int, hidden_states: torch.Tensor, chunk: Chunk, cache: Cache | None) -> torch.Tensor:
        """Run decoder layer `index` over one chunk, appending its keys and values to the cache."""
        if index not in self.owned_layers:
            raise RuntimeError(f"layer {index} is not held by this part")
        output = self.layers[index](
            hidden_states,
            attention_mask=chunk.mask,
            position_ids=chunk.position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            position_embeddings=chunk.position_embeddings,
        )
        return output[0] if isinstance(output, tuple) else output

    def run_owned_layers(self, hidden_states: torch.Tensor, start: int = 0, cache: Cache | None = None) -> torch.Tensor:
        """All owned layers on one chunk, for a fixed split where every layer's cache has the same length."""
        chunks: dict[tuple[int, str], Chunk] = {}
        for index in sorted(self.owned_layers):
            key = self.chunk_key(start, index)
            if key not in chunks:
                chunks[key] = self.make_chunk(hidden_states, start, cache, index)
            hidden_states = self.run_layer(index, hidden_states, chunks[key], cache)
        return hidden_states


class FirstLlamaModel(SplitLlamaModel):
    """Embeddings + layers [0, a): runs on the edge."""

    def __init__(self, base: nn.Module, family: Family, owned_layers: Iterable[int]):
        super().__init__(base, family, owned_layers, with_embeddings=True, with_norm=False)

    def forward(self, input_ids: torch.LongTensor, start: int = 0, cache: Cache | None = None) -> torch.Tensor:
        return self.run_owned_layers(self.embed(input_ids), start, cache)


class SecondLlamaModel(SplitLlamaModel):
    """Layers [a, b) only: runs in the cloud, which never holds embeddings, norm or head."""

    def __init__(self, base: nn.Module, family: Family, owned_layers: Iterable[int]):
        super().__init__(base, family, owned_layers, with_embeddings=False, with_norm=False)

    def forward(self, hidden_states: torch.Tensor, start: int = 0, cache: Cache | None = None) -> torch.Tensor:
        return self.run_owned_layers(hidden_states, start, cache)


class ThirdLlamaModel(SplitLlamaModel):
    """Layers [b, L) + final norm: runs on the edge (or, in the two-part split, in the cloud)."""

    def __init__(self, base: nn.Module, family: Family, owned_layers: Iterable[int]):
        super().__init__(base, family, owned_layers, with_embeddings=False, with_norm=True)

    def forward(self, hidden_states: torch.Tensor, start: int = 0, cache: Cache | None = None) -> torch.Tensor:
        assert self.norm is not None  # the last part holds the norm (with_norm=True above)
        return self.norm(self.run_owned_layers(hidden_states, start, cache))


# Held while a part is built on the meta device and while its weights are assigned. Both change or go
# through process-wide state (accelerate's `init_empty_weights` patches nn.Module's parameter registration,
# `local_torch_dtype` sets the default dtype), so parts built in several threads at once take turns: without
# it, 17 of 20 concurrent builds lost parameters to another thread's meta device.
CONSTRUCTION = threading.RLock()


class SplitLlamaForCausalLM(nn.Module):
    """Shared loading for the three parts: parameters on the meta device, then only the part's own tensors are read.

    Parameter names are the checkpoint's (`model.layers.3.mlp.up_proj.weight`, `lm_head.weight`), so a
    part's state dict is a subset of the full model's.
    """

    model_class: Callable[[nn.Module, Family, Iterable[int]], SplitLlamaModel]
    with_head = False

    def __init__(self, config: PretrainedConfig, owned_layers: Iterable[int]):
        super().__init__()
        self.config = config
        self.family = family_for(config)
        # The family's own CausalLM, its parameters on meta (nothing allocated), its buffers (rotary
        # frequencies, Gemma's embedding scale) computed for real as transformers computes them.
        with CONSTRUCTION, init_empty_weights(include_buffers=False), no_init_weights():  # the weights come from the checkpoint
            full = AutoModelForCausalLM.from_config(config)
        self.model = self.model_class(full.model, self.family, owned_layers)
        if self.with_head:
            self.lm_head = full.lm_head

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: Path,
        config: PretrainedConfig,
        owned_layers: Iterable[int],
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        lora_weights: str | None = None,
        shared: dict[str, torch.Tensor] | None = None,
        column_major: bool = False,
    ) -> "SplitLlamaForCausalLM":
        """Build without weights, drop unused layers, then read exactly the tensors this part holds.

        `shared` hands in tensors this side already holds (the edge's tied embedding, used again as LM head).

        `column_major`: store the decoder layers' fp32 CPU linear weights transposed in memory (`W.T`
        contiguous; the same values and shape). `F.linear(x, W)` computes x @ W.T, and with W row-major
        ([out, in], transformers' layout) MKL's fp32 product over 4 rows or more costs a quarter to a third
        more than with W.T contiguous, over one row the same. Measured over SmolLM2's 28 middle layers in
        turn (7 products each, weights from memory, one thread), per layer, row-major against column-major:
        one row 963 against 962 us, 4 rows 1,753 against 1,356, 8 rows 2,230 against 1,809, a 35-token
        prompt 3,329 against 2,452. Over 2-3 rows column-major costs 1.0-1.1x at hidden 576 and 1.2-1.3x
        from 960 up; in whole runs with moving cuts the layout still gained, at 576 and at 4096 (README).
        Moving cuts' catch-up chunks, prompts and cross-session batches run several rows. The last bits
        of a product change with the layout, so only sides whose results need not match transformers' bit
        for bit use it (`build_pipeline`, a batching server). bf16 and fp16 products do not depend on the
        layout (oneDNN reorders), nor a GPU's, so those weights stay as they are; so does the LM head,
        which runs one row at a time.
        """
        with CONSTRUCTION, local_torch_dtype(dtype):  # buffers in the model's dtype, as from_pretrained(dtype=...) makes them
            part = cls(config, owned_layers)
        shared = shared or {}
        wanted = {name: part.checkpoint_name(name) for name, _ in part.named_parameters() if name not in shared}
        transposed: frozenset[str] = frozenset()
        if column_major and dtype == torch.float32 and torch.device(device).type == "cpu":
            transposed = frozenset(f"{name}.weight" for name, module in part.named_modules()
                                   if isinstance(module, nn.Linear) and name.startswith("model.layers.")) & wanted.keys()
        tensors = read_tensors(model_dir, wanted, dtype, device, transposed)
        if lora_weights:
            for name, delta in load_lora_deltas(lora_weights, part.model.owned_layers).items():
                if name in tensors:
                    if delta.shape != tensors[name].shape:
                        raise TriadicError(f"--lora-weights {lora_weights}: {name} is {tuple(tensors[name].shape)}, its update {tuple(delta.shape)}")
                    tensors[name] = laid_out((tensors[name].float() + delta.to(device)).to(dtype), name in transposed)
        tensors.update(shared)
        expected = dict(part.named_parameters())
        for name, tensor in tensors.items():  # else load_state_dict's many-line size mismatch
            if name in expected and tensor.shape != expected[name].shape:
                raise TriadicError(f"{model_dir}: {part.checkpoint_name(name)} is {tuple(tensor.shape)} in the weights and "
                                   f"{tuple(expected[name].shape)} by config.json: they do not match")
        with CONSTRUCTION:  # assigning goes through nn.Module's parameter registration, which a build patches
            part.load_state_dict(tensors, strict=False, assign=True)
        still_empty = [name for name, p in part.named_parameters() if p.is_meta]
        if still_empty:
            raise RuntimeError(f"internal: {still_empty[0]} was not loaded")
        part.to(device)  # the buffers; parameters are there already
        return part.eval().requires_grad_(False)

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint's name of a part's parameter: the tied head is the embedding, the norm the family's."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return "model.embed_tokens.weight"
        if name.startswith("model.norm."):
            return f"model.{self.family.norm}." + name.removeprefix("model.norm.")
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
    with_head = True

    def forward(self, hidden_states: torch.Tensor, start: int = 0, cache: Cache | None = None) -> torch.Tensor:
        """Logits for every position of the chunk."""
        return self.logits(self.model(hidden_states, start, cache))

    def head(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the hidden state after the last decoder layer (before the final norm)."""
        assert self.model.norm is not None  # a part with the head holds the norm
        return self.logits(self.model.norm(last_hidden))

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self.family.process_logits(self.config, self.lm_head(normed))
