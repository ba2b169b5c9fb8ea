"""8-bit weights through bitsandbytes (LLM.int8(), as Alpaca-LoRA's `load_8bit`), for the layers a side holds.

Only the decoder layers' linear projections are quantized; embeddings, norms and the head stay in
the compute dtype. Runs wherever bitsandbytes has kernels (CPU included since 0.45).
"""
from __future__ import annotations

import torch
from torch import nn

from .utils import TriadicError


def quantize_linear_layers_8bit(part: nn.Module, threshold: float = 6.0) -> int:
    """Replace every nn.Linear inside the part's decoder layers by an int8 one; return how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TriadicError("--load-in-8bit needs bitsandbytes") from None
    replaced = 0
    for layer in part.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                device = child.weight.device
                quantized = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    has_fp16_weights=False, threshold=threshold,
                )
                quantized.weight = bnb.nn.Int8Params(child.weight.data.to(torch.float16), requires_grad=False, has_fp16_weights=False)
                if child.bias is not None:
                    quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, quantized.to(device))
                replaced += 1
    return replaced
