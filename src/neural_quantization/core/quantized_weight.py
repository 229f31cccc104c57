"""The result of quantizing one weight matrix, before it is packed into a storage format."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neural_quantization.core import grid


@dataclass
class QuantizedWeight:
    """Integer codes and grid of one linear layer's weight ``W`` (out_features N, in_features K).

    codes:  (N, K) int32, each in ``[0, 2**bits - 1]``
    scales: (G, N) fp32 holding fp16-representable values, G = ceil(K / group_size) (1 per channel)
    zeros:  (G, N) int32, the zero point of each group (not the "minus one" stored by GPTQ files)
    g_idx:  (K,) int32, the group of each input column (non-monotonic with act-order)
    loss:   ``tr((W - Q) H (W - Q)^T)``, the objective GPTQ minimises, where H was given
    damp_percent: the damping actually used (after automatic increases), where a solve ran

    ``dequantize()`` gives ``Q[n, k] = scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n])``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    loss: float | None = None
    damp_percent: float | None = None

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        scale = self.scales[g].T  # (N, K)
        zero = self.zeros[g].T.float()
        return grid.dequantize(self.codes, scale, zero)


def hessian_weighted_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the layer-output error GPTQ minimises (up to the token count)."""
    delta = weight.detach().float() - quantized.detach().float()
    return float(((delta @ hessian.float()) * delta).sum())


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """``g_idx`` for contiguous groups: column k belongs to group k // group_size."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // size


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)
