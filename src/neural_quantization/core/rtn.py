"""Round-to-nearest (RTN): the baseline every quantization method is measured against.

Each group of each output row gets its min/max (or MSE-clipped) grid and every weight is rounded to
the nearest code, independently. It uses the same grid code as GPTQ, so the two differ only by
GPTQ's error compensation.
"""

from __future__ import annotations

import torch

from neural_quantization.config import QuantizationConfig
from neural_quantization.core import grid
from neural_quantization.core.quantized_weight import QuantizedWeight, group_index, hessian_weighted_error


def rtn_quantize(
    weight: torch.Tensor, config: QuantizationConfig, hessian: torch.Tensor | None = None
) -> QuantizedWeight:
    """Quantize ``weight`` (N, K) group by group; ``loss`` is filled in when ``hessian`` is given.

    With ``config.clip == "hessian"`` the grids are clipped on the Hessian-weighted error, which
    needs ``hessian`` (K, K).
    """
    w = weight.float()
    n_out, n_in = w.shape
    size = n_in if config.group_size == -1 else config.group_size
    scales, zeros, codes = [], [], torch.empty(n_out, n_in, dtype=torch.int32, device=w.device)
    for start in range(0, n_in, size):
        block = w[:, start : start + size]
        columns = slice(start, start + size)
        block_hessian = hessian[columns, columns].to(w.device) if hessian is not None else None
        scale, zero = grid.choose_params(block, config.bits, config.sym, config.clip, block_hessian)
        codes[:, start : start + size] = grid.quantize(block, scale, zero, config.bits)
        scales.append(scale.squeeze(1))
        zeros.append(zero.squeeze(1))
    result = QuantizedWeight(
        codes=codes,
        scales=torch.stack(scales),
        zeros=torch.stack(zeros).to(torch.int32),
        g_idx=group_index(n_in, config.group_size).to(w.device),
        bits=config.bits,
        group_size=config.group_size,
    )
    if hessian is not None:
        result.loss = hessian_weighted_error(w, result.dequantize(), hessian)
    return result
