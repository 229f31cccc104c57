"""The definition of a correct quantized matmul: unpack, dequantize, matmul, in plain torch.

Every fused kernel is tested against these functions. They read the GPTQ layout documented in
``formats/gptq.py``; nothing here is tuned for speed.
"""

from __future__ import annotations

import torch

from neural_quantization.formats.packing import unpack


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight (N, K) in ``dtype``, computed in fp32 and rounded once.

    ``W[n, k] = scales[g_idx[k], n] · (q[k, n] - (stored_zero[g_idx[k], n] + 1))``
    """
    out_features = scales.shape[1]
    codes = unpack(qweight, bits, in_features, dim=0).float()  # (K, N)
    zeros = (unpack(qzeros, bits, out_features, dim=1) + 1).float()  # (G, N)
    g = g_idx.long()
    weight = scales.float()[g] * (codes - zeros[g])  # (K, N)
    return weight.T.to(dtype)


def quant_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """``y = x W^T + bias`` for x (..., K) -> (..., N), in the dtype of ``x``."""
    weight = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, in_features, x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def decode_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One decode step's attention with grouped KV heads, in fp32 (``kernels/attention.py``'s oracle).

    query (B, Hq, D); key, value (B, Hkv, L, D) with Hq a multiple of Hkv; mask (B, L), nonzero
    where the key may be attended (at least one per row). Query head ``h`` reads KV head
    ``h // (Hq / Hkv)``. Returns (B, Hq, D) in the query's dtype.
    """
    group = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1)  # (B, Hq, L, D)
    v = value.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhld->bhl", query.float(), k) * scale
    scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
    return torch.einsum("bhl,bhld->bhd", scores.softmax(-1), v).to(query.dtype)
