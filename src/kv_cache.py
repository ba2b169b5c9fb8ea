"""A KV cache whose appends cost O(new positions), not O(length).

transformers' DynamicLayer appends with torch.cat, which copies the whole cache at every step:
quadratic memory traffic over a long generation. This layer keeps a buffer with spare capacity,
doubling it when full, and exposes the filled part as a view. Sliding-window layers are bounded by
their window and stay transformers' own.
"""
from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            capacity = max(end, 64, 2 * (0 if self._key_buffer is None else self._key_buffer.shape[-2]))
            self._key_buffer = self._grow(self._key_buffer, key_states, capacity)
            self._value_buffer = self._grow(self._value_buffer, value_states, capacity)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[..., self.length : end, :] = key_states
        self._value_buffer[..., self.length : end, :] = value_states
        self.length = end
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` positions (a session cut back to a common prefix); the buffer stays."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of positions to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        assert self._key_buffer is not None and self._value_buffer is not None  # set by the first update
        self.length = max(0, self.length + tokens_to_remove)
        self.keys = self._key_buffer[..., : self.length, :]
        self.values = self._value_buffer[..., : self.length, :]

    def _grow(self, buffer: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = like.new_empty(*like.shape[:-2], capacity, like.shape[-1])
        if buffer is not None:
            grown[..., : self.length, :] = buffer[..., : self.length, :]
        return grown


def growing_cache(config: PretrainedConfig) -> DynamicCache:
    """transformers' cache for this config, with full-attention layers that grow without copying.

    Sliding-window layers keep transformers' own layer, which holds only the last `window - 1`
    positions: its append copies at most the window, and its mask sizes follow the window.
    """
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
