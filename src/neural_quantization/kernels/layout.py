"""Load-time preparation of a GPTQ layer for the kernels ("kernel order").

The checkpoint keeps the GPTQ layout (``formats/gptq.py``). The kernels want groups to be contiguous
runs of input positions, ``g(k) = k // group_size``, so that one tile of BLOCK_K positions needs one
row of scales and zeros. Ordinary checkpoints already are; act-order (``desc_act``) checkpoints have
a ``g_idx`` that jumps between groups. For those, :func:`prepare_kernel_layout` sorts the input
dimension by group once:

    perm = argsort(g_idx, stable)          kernel position k reads input column perm[k]
    qweight_k[rows of k] = qweight[rows of perm[k]]   (codes re-packed in the new order)

and each call gathers ``x[:, perm]`` inside the kernel (no extra launch). ``scales`` and ``qzeros``
are indexed by group and stay as they are. Symmetric layers (every stored zero equals
``2**(bits-1) - 1``) are flagged so the kernels skip loading zeros.

The tensor-core CUDA kernel for M ≤ 16 reads these same tensors (``kernels/cuda/mma.py``): no
layout of its own, no second copy of the weights.

Preparation synchronizes with the device (it inspects ``g_idx`` and the zeros), so it must run
eagerly, before any CUDA graph capture; ``QuantLinear`` does it on its first eager CUDA forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neural_quantization.formats.packing import pack, unpack

KERNEL_BITS = (4, 8)


@dataclass(frozen=True)
class KernelLayout:
    """What the kernels need beyond the checkpoint tensors.

    qweight: (ceil(K / P), N) int32 in kernel order (the checkpoint tensor itself unless act-order)
    perm: (K,) int32, input column of each kernel position, or None when the order is unchanged
    group_size: length of the contiguous groups in kernel order (≥ K for per-channel layers)
    symmetric: every zero point is 2**(bits-1)
    """

    qweight: torch.Tensor
    perm: torch.Tensor | None
    group_size: int
    symmetric: bool


def supports(bits: int) -> bool:
    return bits in KERNEL_BITS


def groups_ascending(g_idx: torch.Tensor) -> bool:
    """Whether ``g_idx`` never goes back to an earlier group (no act-order permutation is needed)."""
    g = g_idx.to(torch.int64)
    return bool((g[1:] >= g[:-1]).all()) if g.numel() > 1 else True


def zeros_symmetric(qzeros: torch.Tensor, bits: int, out_features: int) -> bool:
    """Whether every stored zero is the midpoint ``2**(bits-1) - 1`` (GPTQ stores zero - 1)."""
    return bool((unpack(qzeros, bits, out_features, dim=1) == (1 << (bits - 1)) - 1).all())


# Takes the GPTQ tensors as reference.dequantize_gptq does: both read the checkpoint's layout.
def prepare_kernel_layout(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    in_features: int,
) -> KernelLayout | None:
    """The kernel layout of one layer, or None where the kernels cannot run it (the reference will).

    Unsupported: bits other than 4/8, and a ``g_idx`` whose groups, once sorted, are not runs of one
    common length that is a multiple of the codes per word (never produced by GPTQ or RTN).
    """
    if not supports(bits):
        return None
    per_word = 32 // bits
    num_groups, out_features = scales.shape
    g = g_idx.to(torch.int64)
    if num_groups == 1:
        perm = None
        group_size = max(in_features, 1) + per_word  # one group: every position maps to group 0
    else:
        perm = None if groups_ascending(g) else torch.argsort(g, stable=True)
        sorted_groups = g if perm is None else g[perm]
        counts = torch.bincount(sorted_groups, minlength=num_groups)
        group_size = int(counts[0])
        expected = torch.arange(in_features, device=g.device) // max(group_size, 1)
        if group_size % per_word != 0 or not torch.equal(sorted_groups, expected):
            return None
    kernel_qweight = qweight
    if perm is not None:
        codes = unpack(qweight, bits, in_features, dim=0)  # (K, N)
        kernel_qweight = pack(codes[perm], bits, dim=0)
        perm = perm.to(torch.int32).contiguous()
    return KernelLayout(kernel_qweight.contiguous(), perm, group_size, zeros_symmetric(qzeros, bits, out_features))
