"""The tensor-core int4 kernel (``mma_int4.cu``) for M ≤ 16: its load-time layout and its call.

Layout (built once per layer by :func:`repack` from the kernel-order GPTQ tensors; the checkpoint
is unchanged). With tiles of 16 output columns and chunks of 64 input positions (both padded with
zero codes), lane ``(g, t) = (lane // 4, lane % 4)`` of a warp owns columns ``g`` and ``g + 8``
of the tile and positions ``16t … 16t + 15`` of the chunk:

    wq[tile, chunk, lane, s]   int32, s = 0..3 (one 16-byte load per lane)
        nibble i = 4·kpair + 2·kh + nh (bits 4i … 4i+3) holds the code of
        column  tile·16 + g + 8·nh,
        position chunk·64 + 16t + 4s + 2·kh + kpair
    scales[tile, group, g]     int32 = (s[group, tile·16 + g], s[group, tile·16 + g + 8]) as two
                               16-bit floats in the activations' dtype (low half first)
    zeros[tile, group, g]      int32 = the two zero points (stored zero + 1) as 16-bit integers;
                               absent for symmetric layers (zero 8 everywhere)

Word ``s`` of a lane is exactly its A fragment of the chunk's mma step ``s`` (see the .cu file):
nibbles 0 and 4 → fragment register 0 (column g, positions +0, +1), 1 and 5 → register 1 (column
g + 8), 2 and 6 → register 2 (column g, positions +2, +3), 3 and 7 → register 3. The layout is
4 bits per weight like the checkpoint (plus padding to whole tiles and chunks).
"""

from __future__ import annotations

import torch

from neural_quantization.formats.packing import unpack
from neural_quantization.kernels.cuda import extension

TILE_N = 16
CHUNK_K = 64
#: rows per launch the kernel is instantiated for (M is rounded up to one of these)
BLOCK_MS = (8, 16)
#: instantiated (chunks per warp per batch, prefetch next batch, activations prefetched, code load
#: mode) by variant index (NQ_MMA_VARIANTS in mma_int4.cuh)
VARIANTS = ((1, 1, 1, 1), (2, 1, 1, 1), (4, 0, 1, 1), (2, 0, 1, 1), (6, 0, 1, 1), (4, 0, 1, 2))
MAX_WARPS = 8
#: the untuned choice (inside a capture or a trace before any tuning)
DEFAULT_VARIANT = 3


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class MmaLayout:
    """One layer in the kernel's layout (see the module docstring).

    wq (tiles, chunks, 32, 4) int32; scales (tiles, groups, 8) int32 pairs of the checkpoint's
    16-bit scales (fp16 or bf16, whatever the activations' dtype); zeros like scales, or None.
    """

    def __init__(self, wq, scales, scale_dtype: torch.dtype, zeros, in_features: int, out_features: int,
                 group_size: int):
        self.wq, self.scales, self.scale_dtype, self.zeros = wq, scales, scale_dtype, zeros
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size

    @property
    def tiles(self) -> int:
        return _cdiv(self.out_features, TILE_N)

    @property
    def num_chunks(self) -> int:
        return _cdiv(self.in_features, CHUNK_K)

    def tensors(self) -> tuple:
        return (self.wq, self.scales, self.zeros)

    def clone(self) -> MmaLayout:
        zeros = None if self.zeros is None else self.zeros.clone()
        return MmaLayout(self.wq.clone(), self.scales.clone(), self.scale_dtype, zeros, self.in_features,
                         self.out_features, self.group_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)


def _pairs(values: torch.Tensor) -> torch.Tensor:
    """(G, Np) 16-bit values -> (tiles, G, 8) int32 pairs (value of column g, of column g + 8)."""
    groups, padded_n = values.shape
    pairs = values.reshape(groups, padded_n // TILE_N, 2, 8).permute(1, 0, 3, 2).contiguous()
    return pairs.view(torch.int32).reshape(padded_n // TILE_N, groups, 8)


def _unpair(pairs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`_pairs`; ``dtype`` is the 16-bit dtype the values were paired in."""
    tiles, groups, _ = pairs.shape
    half = pairs.contiguous().view(dtype).reshape(tiles, groups, 8, 2)
    return half.permute(1, 0, 3, 2).reshape(groups, tiles * TILE_N)


def group_length(group_size: int, in_features: int) -> int | None:
    """The group length the kernel indexes with (a power of two ≥ 16, or ≥ K for one group), or None
    where it cannot run."""
    if group_size <= 0 or group_size >= in_features:  # one group (-1: per-channel)
        return _cdiv(in_features, CHUNK_K) * CHUNK_K
    return group_size if group_size >= 16 and group_size & (group_size - 1) == 0 else None


def repack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, in_features: int,
           group_size: int, symmetric: bool) -> MmaLayout | None:
    """The kernel layout of a 4-bit layer in kernel order (``layout.prepare_kernel_layout``), or None
    where the kernel cannot run it (K not a multiple of 16, a group size that is not a power of two ≥ 16)."""
    K, N = in_features, scales.shape[1]
    group = group_length(group_size, K)
    if K % 16 != 0 or group is None or scales.dtype not in (torch.float16, torch.bfloat16):
        return None
    tiles, chunks = _cdiv(N, TILE_N), _cdiv(K, CHUNK_K)
    padded_k, padded_n = chunks * CHUNK_K, tiles * TILE_N
    codes = torch.zeros((padded_k, padded_n), dtype=torch.int64, device=qweight.device)
    codes[:K, :N] = unpack(qweight, 4, K, dim=0).to(torch.int64)
    # position = chunk·64 + 16t + 4s + 2kh + kpair, column = tile·16 + 8nh + g
    codes = codes.reshape(chunks, 4, 4, 2, 2, tiles, 2, 8)  # chunk, t, s, kh, kpair, tile, nh, g
    codes = codes.permute(5, 0, 7, 1, 2, 4, 3, 6)  # tile, chunk, g, t, s, kpair, kh, nh
    codes = codes.reshape(tiles, chunks, 32, 4, 8)
    shifts = 4 * torch.arange(8, device=codes.device, dtype=torch.int64)
    words = (codes << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()

    groups = scales.shape[0]
    padded_scales = torch.zeros((groups, padded_n), dtype=scales.dtype, device=scales.device)
    padded_scales[:, :N] = scales
    zeros = None
    if not symmetric:
        stored = unpack(qzeros, 4, N, dim=1).to(torch.int16) + 1  # (G, N) zero points
        padded_zeros = torch.zeros((groups, padded_n), dtype=torch.int16, device=qzeros.device)
        padded_zeros[:, :N] = stored
        zeros = _pairs(padded_zeros)
    return MmaLayout(words, _pairs(padded_scales), scales.dtype, zeros, K, N, group)


def codes_of(layout: MmaLayout) -> torch.Tensor:
    """The (K, N) codes a layout holds (inverse of :func:`repack`'s code shuffle; for tests)."""
    tiles, chunks = layout.tiles, layout.num_chunks
    words = layout.wq.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=words.device, dtype=torch.int64)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF  # tile, chunk, lane, s, i
    nibbles = nibbles.reshape(tiles, chunks, 8, 4, 4, 2, 2, 2)  # tile, chunk, g, t, s, kpair, kh, nh
    codes = nibbles.permute(1, 3, 4, 6, 5, 0, 7, 2).reshape(chunks * CHUNK_K, tiles * TILE_N)
    return codes[: layout.in_features, : layout.out_features]


def block_m_for(m: int) -> int | None:
    """The instantiated row count serving ``m`` rows, or None above 16."""
    for block_m in BLOCK_MS:
        if m <= block_m:
            return block_m
    return None


def device_supported(device: torch.device) -> bool:
    """mma.sync m16n8k16 with fp16 and bf16 needs compute capability 8.0 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def supports(M: int, K: int, N: int, bits: int, group_size: int) -> bool:
    """Whether the kernel runs this shape (the layout must also exist: :func:`repack`)."""
    return bits == 4 and 1 <= M <= BLOCK_MS[-1] and K % 16 == 0 and K > 0 and N > 0 \
        and group_length(group_size, K) is not None


def splits_for(K: int, chunks_per_split: int) -> int:
    return _cdiv(_cdiv(K, CHUNK_K), chunks_per_split)


def mma_int4(x2d, layout: MmaLayout, perm, bias, tickets, block_m: int, warps: int, variant: int,
             splits: int, pdl: bool = False) -> torch.Tensor:
    """``y = x2d[:, perm] @ W^T + bias`` (M, N) in x2d's dtype, M ≤ block_m ∈ (8, 16).

    ``splits``: blocks along K per tile (partials reduced in the same launch; ``tickets`` holds one
    zeroed int32 counter per tile); ``variant`` indexes :data:`VARIANTS`.
    """
    module = extension.load()
    if module is None:
        raise RuntimeError(f"the CUDA kernels are not available: {extension.LOAD_ERROR}")
    return module.mma_int4(x2d, layout.wq, layout.scales, layout.zeros, perm, bias, tickets, layout.group_size,
                           layout.in_features, layout.out_features, block_m, warps, variant, splits, pdl,
                           layout.scale_dtype == torch.bfloat16)
