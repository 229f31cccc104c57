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
