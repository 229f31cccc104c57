"""Quantized matmul entry point and kernel backend selection.

``quant_linear`` is what :class:`~neural_quantization.nn.qlinear.QuantLinear` calls. Backends:

* ``torch``: the reference in ``kernels/reference.py`` (dequantize, then matmul); runs anywhere.
* ``auto``: the fastest kernel available for the device; the reference on the CPU.
* ``triton``, ``marlin``: GPU kernels (see the kernels issue); until they exist these fall back
  to the reference with the same numbers.
"""

from __future__ import annotations

import torch

from neural_quantization.kernels.reference import quant_linear_reference


def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    in_features: int,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x W^T + bias`` for x (..., K) with W stored in the GPTQ layout."""
    return quant_linear_reference(x, qweight, qzeros, scales, g_idx, bias, bits, in_features)
