"""The GPTQ tensor layout of one quantized linear layer (``checkpoint_format: "gptq"``).

For a linear layer with ``K = in_features``, ``N = out_features``, ``b = bits``,
``G = ceil(K / group_size)`` groups (1 for per-channel), each layer stores:

=========  =======  ===========================  =================================================
name       dtype    shape                        content
=========  =======  ===========================  =================================================
qweight    int32    (packed_length(K, b), N)     codes ``q[k, n]`` packed along K (the input dim):
                                                 for 4 bits, row ``r`` holds k = 8r … 8r+7,
                                                 k = 8r + j in bits 4j…4j+3 (see packing.py)
qzeros     int32    (G, packed_length(N, b))     ``zero[g, n] - 1`` packed along N (the output dim)
scales     float16  (G, N)                       ``scale[g, n]``
g_idx      int32    (K,)                         group of input column k (``k // group_size``
                                                 unless act-order reordered the groups)
bias       float16  (N,)                         only where the original layer had a bias
=========  =======  ===========================  =================================================

and the weight it represents is

    W[n, k] = scales[g_idx[k], n] · (q[k, n] - (stored_zero[g_idx[k], n] + 1))

**Zero-point convention.** GPTQ checkpoints in the original ``gptq`` format (AutoGPTQ, GPTQModel
with ``checkpoint_format: gptq``, what vLLM's and transformers' GPTQ loaders read) store the zero
point *minus one* and add the one back when loading. Symmetric 4-bit groups therefore store 7 in
every nibble (``qzeros`` words of ``0x77777777``) and dequantize with zero 8. Our grid keeps every
zero ≥ 1 (see ``core/grid.py``) so ``zero - 1`` never wraps.
"""

from __future__ import annotations

import torch

from neural_quantization.core.quantized_weight import QuantizedWeight
from neural_quantization.formats.packing import pack, unpack

TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")


def to_gptq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Pack a :class:`QuantizedWeight` into the four GPTQ tensors (on the device of its codes)."""
    mask = (1 << qw.bits) - 1
    if int(qw.zeros.min()) < 1:
        raise ValueError("GPTQ format needs zero points >= 1; quantize with core.grid (it guarantees this)")
    return {
        "qweight": pack(qw.codes.T, qw.bits, dim=0),
        "qzeros": pack((qw.zeros - 1) & mask, qw.bits, dim=1),
        "scales": qw.scales.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def from_gptq_tensors(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
) -> QuantizedWeight:
    """Unpack the GPTQ tensors back into codes (N, K), zeros (G, N) and fp32 scales (G, N)."""
    out_features = scales.shape[1]
    codes = unpack(qweight, bits, in_features, dim=0).T.contiguous()
    zeros = unpack(qzeros, bits, out_features, dim=1) + 1
    return QuantizedWeight(
        codes=codes,
        scales=scales.float(),
        zeros=zeros,
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=group_size,
    )
