"""The tensor-core int4 kernel (``mma_int4.cu``) for M ≤ 16: its shapes, variants and call.

The kernel reads the layer's GPTQ tensors in kernel order (``kernels/layout.py``) as they
are: ``qweight`` (K/8, N) int32, ``scales`` (G, N) fp16/bf16, ``qzeros`` (G, N/8) int32. No copy
of the weights is made. How the GPTQ words become ``mma.sync.m16n8k16`` fragments is documented at
the top of ``mma_int4.cuh``: lane ``(g, t)`` of a warp reads the words of 2·NT adjacent columns
``2·NT·g …`` of its tile in packed rows ``8c + 2t`` and ``8c + 2t + 1`` of chunk ``c`` (64 input
positions); for m-tile ``i`` the instruction's A rows ``g`` and ``g + 8`` are the lane's columns
``2i`` and ``2i + 1``, and in mma step ``p`` of a packed row its K slots ``2t, 2t+1, 2t+8, 2t+9``
are the row's nibbles ``2p, 2p+4, 2p+1, 2p+5`` (``tests/test_kernels.py`` emulates the kernel lane
by lane on the CPU with this map).
"""

from __future__ import annotations

import torch

from neural_quantization.kernels.cuda import extension

CHUNK_K = 64
#: rows per launch the kernel is instantiated for (M is rounded up to one of these)
BLOCK_MS = (8, 16)
#: instantiated (m-tiles of 16 columns per warp, chunks per warp per batch, prefetch the next batch,
#: code load mode) by variant index (NQ_MMA_VARIANTS in mma_int4.cuh)
VARIANTS = ((1, 2, 0, 2), (1, 4, 0, 2), (1, 2, 1, 2), (2, 1, 1, 2), (2, 2, 0, 2), (2, 1, 0, 2), (1, 2, 0, 1))
MAX_WARPS = 8
#: the fallback variant where the rule of :func:`default_launch` picks one the shape cannot run
DEFAULT_VARIANT = 4
#: split-K factors the tuner tries (``dispatch.cuda_mma_configs``) and the untuned rule picks from
SPLITS = (1, 2, 3, 4, 6, 8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_n(variant: int) -> int:
    """Output columns per block of a variant (16 per m-tile)."""
    return 16 * VARIANTS[variant][0]


def tiles(variant: int, out_features: int) -> int:
    return _cdiv(out_features, tile_n(variant))


def group_length(group_size: int, in_features: int) -> int | None:
    """The group length the kernel indexes with (a power of two ≥ 16, or ≥ K for one group), or None
    where it cannot run."""
    if group_size <= 0 or group_size >= in_features:  # one group (-1: per-channel)
        return _cdiv(in_features, CHUNK_K) * CHUNK_K
    return group_size if group_size >= 16 and group_size & (group_size - 1) == 0 else None


def block_m_for(m: int) -> int | None:
    """The instantiated row count serving ``m`` rows, or None above 16."""
    for block_m in BLOCK_MS:
        if m <= block_m:
            return block_m
    return None


def device_supported(device: torch.device) -> bool:
    """mma.sync m16n8k16 with fp16 and bf16 needs compute capability 8.0 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def supports(M: int, K: int, N: int, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16) -> bool:
    """Whether some variant runs this shape (:func:`variant_supports` says which)."""
    return bits == 4 and 1 <= M <= BLOCK_MS[-1] and K % 8 == 0 and K > 0 and N > 0 and N % 2 == 0 \
        and scale_dtype in (torch.float16, torch.bfloat16) and group_length(group_size, K) is not None


def default_launch(K: int, N: int, sm_count: int) -> tuple[int, int, int]:
    """(variant, split, warps) of the untuned choice, a rule read off the tuned choices of 151 keys
    (W4 g128, M = 1…16, six Llama / Mistral / Qwen models, one H100:
    ``benchmarks/results/tuning_defaults_h100.json``):

    * tall layers (K ≥ 8192 and K ≥ 2N, the down projections) have too few output tiles to fill
      the chip: variant 3 (32 columns, one chunk in flight, prefetch) split along K so that about
      three blocks per SM run, the nearest of :data:`SPLITS`;
    * narrow layers (N ≤ 4096): variant 1 (16 columns, 4 chunks per batch), no split;
    * the rest: variant 3, no split; 4 warps per block from N = 16384 on, else 8.
    """
    chunks = _cdiv(K, CHUNK_K)
    if K >= 8192 and K >= 2 * N and variant_supports(3, N):
        target = 3 * sm_count / tiles(3, N)
        split = min((s for s in SPLITS if s <= chunks), key=lambda s: abs(s - target))
        return 3, split, 8
    if N <= 4096 and variant_supports(1, N):
        return 1, 1, 8
    if variant_supports(3, N):
        return 3, 1, 4 if N >= 16384 else 8
    variant = DEFAULT_VARIANT if variant_supports(DEFAULT_VARIANT, N) else 0
    return variant, 1, 8


def variant_supports(variant: int, N: int) -> bool:
    """A variant with NT m-tiles loads 2·NT adjacent words per lane: N must be a multiple of 2·NT."""
    return N % (2 * VARIANTS[variant][0]) == 0


def mma_int4(x2d, qweight, qzeros, scales, symmetric: bool, perm, bias, tickets, group_size: int, in_features: int,
             block_m: int, warps: int, variant: int, splits: int, pdl: bool = False) -> torch.Tensor:
    """``y = x2d[:, perm] @ W^T + bias`` (M, N) in x2d's dtype, M ≤ block_m ∈ (8, 16), from the
    kernel-order GPTQ tensors.

    ``splits``: blocks along K per tile (partials reduced in the same launch; ``tickets`` holds one
    zeroed int32 counter per tile); ``variant`` indexes :data:`VARIANTS`.
    """
    module = extension.load()
    if module is None:
        raise RuntimeError(f"the CUDA kernels are not available: {extension.LOAD_ERROR}")
    return module.mma_int4(x2d, qweight, scales, qzeros, symmetric, perm, bias, tickets,
                           group_length(group_size, in_features), in_features, block_m, warps, variant, splits, pdl)
