"""Split-K GEMV for one activation row per program (decode, M = 1 … 2): CUDA-core FMAs.

Grid ``(cdiv(N, BLOCK_N), split_k, M)``. Program ``(n, s, m)`` owns output columns
``n·BLOCK_N …`` of row m and walks ``tiles_per_split`` tiles of ``BLOCK_K`` input positions starting
at tile ``s·tiles_per_split``. Per tile it loads a (BLOCK_K / P, BLOCK_N) block of int32 words
(16-byte loads along N), unpacks it to the (BLOCK_K, BLOCK_N) codes (``common.unpack_tile``), loads
the matching BLOCK_K activations contiguously, and accumulates element-wise

    acc[k, n] += x[m, k] · scale[g, n] · (q[k, n] - zero[g, n])

reducing ``acc`` over k only once, at the end. Dequantization costs a shift, a mask-or, a
subtraction and a multiply per weight: OR-ing the code into the mantissa of 2**23 gives the fp32
number 2**23 + q without an int→float conversion, and subtracting the per-column constant
2**23 + zero leaves q - zero exactly. Split-K partials are reduced by ``common.finish_output``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from neural_quantization.kernels.triton.common import (
    FP32_MAGIC,
    FP32_MAGIC_VALUE,
    finish_output,
    load_words_and_sources,
    load_zero_points,
    load_zero_points_2d,
    split_tiles,
    unpack_tile,
)


@triton.jit
# Same launch signature as dot_splitk_kernel on purpose: dispatch.launch calls every kernel alike.
def gemv_splitk_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, bias_ptr, out_ptr, partial_ptr, ticket_ptr,
    M, N, K, stride_xm, stride_om, group_size, tiles_per_split, split_k,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr, USE_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // PER_WORD
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    n_words = (K + PER_WORD - 1) // PER_WORD
    packed_n = (N + PER_WORD - 1) // PER_WORD
    tile_begin, tile_end = split_tiles(pid_k, tiles_per_split, K, BLOCK_K)

    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    for tile in range(tile_begin, tile_end):
        k0 = tile * BLOCK_K
        words, k, k_mask, source = load_words_and_sources(qweight_ptr, perm_ptr, tile, offs_r, offs_k, offs_n, n_mask,
                                                          n_words, N, K, ROWS, BLOCK_K, HAS_PERM)
        xv = tl.load(x_ptr + row * stride_xm + source, mask=k_mask, other=0.0).to(tl.float32)
        if SCALE_PER_TILE:
            group = k0 // group_size
            zero_magic = (load_zero_points(qzeros_ptr, group, offs_n, n_mask, packed_n, BITS, SYMMETRIC,
                                           BLOCK_N).to(tl.float32) + FP32_MAGIC_VALUE)[None, :]
            scale = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:
            groups = tl.minimum(k, K - 1) // group_size
            zero_magic = load_zero_points_2d(qzeros_ptr, groups, offs_n, n_mask, packed_n, BITS,
                                             SYMMETRIC).to(tl.float32) + FP32_MAGIC_VALUE
            scale = tl.load(scales_ptr + groups[:, None] * N + offs_n[None, :], mask=n_mask[None, :],
                            other=0.0).to(tl.float32)
        codes = unpack_tile(words, BITS)
        w = ((codes | FP32_MAGIC).to(tl.float32, bitcast=True) - zero_magic) * scale
        acc += xv[:, None] * w
    result = tl.sum(acc, axis=0)[None, :]
    offs_m = row + tl.arange(0, 1)
    finish_output(result, out_ptr, bias_ptr, partial_ptr, ticket_ptr, offs_m, offs_n, offs_m < M, n_mask,
                  M, N, stride_om, pid_k, split_k, row * tl.num_programs(0) + pid_n, HAS_BIAS, USE_SPLIT)
