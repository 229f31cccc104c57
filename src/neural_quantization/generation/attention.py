"""Our decode-attention kernel as a transformers attention implementation (``"nq_decode"``).

transformers looks up every attention layer's function by ``config._attn_implementation`` in its
``AttentionInterface`` registry. :func:`use_decode_attention` registers ``"nq_decode"`` and switches
a model to it: steps with one query position per sequence (decode) whose mask is a boolean key row
go to ``kernels/attention.decode_attention``, which reads the grouped-query KV cache without
copying it for every query head; everything else (prefill, additive masks, soft-capped or
sink-token attention) goes to transformers' own SDPA function unchanged, so outputs differ from
SDPA's only by floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

NAME = "nq_decode"
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def decode_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (B, Hq, Q, D), key/value (B, Hkv, L, D), mask
    (B, 1, Q, L); returns (B, Q, Hq, D) and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from neural_quantization.kernels.attention import decode_attention, supported

    batch, _, q_len, head_dim = query.shape
    if (q_len == 1 and attention_mask is not None and attention_mask.dtype == torch.bool
            and attention_mask.shape[-1] == key.shape[2] and attention_mask.shape[-2] == 1
            and not module.training and not any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS)
            and supported(query[:, :, 0], key)):
        mask = attention_mask.reshape(attention_mask.shape[0], -1)
        if mask.shape[0] != batch:
            mask = mask.expand(batch, -1)
        scale = head_dim ** -0.5 if scaling is None else scaling
        out = decode_attention(query[:, :, 0], key, value, mask.contiguous(), scale)  # (B, Hq, D)
        return out[:, None], None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> None:
    """Add ``"nq_decode"`` to transformers' attention and mask registries (masks built as for SDPA)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, decode_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def use_decode_attention(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Run ``model`` with ``"nq_decode"`` attention inside the block (where it uses SDPA now);
    yields whether it switched. The previous implementation is restored on exit."""
    configs = [c for c in {id(c): c for c in _configs(model)}.values()]
    if not enabled or not configs or any(getattr(c, "_attn_implementation", None) != "sdpa" for c in configs):
        yield False
        return
    register()
    for config in configs:
        config._attn_implementation = NAME
    try:
        yield True
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"


def _configs(model: nn.Module) -> list[Any]:
    """The configs that attention layers read (the model's, and its sub-configs such as a text model's)."""
    found = [module.config for module in model.modules() if hasattr(module, "config")]
    return [c for c in found if hasattr(c, "_attn_implementation")]
