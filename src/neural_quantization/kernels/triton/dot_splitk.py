"""Split-K tiled GEMM with tensor cores (``tl.dot``) for M = 2 … a few hundred.

Grid ``(cdiv(N, BLOCK_N), split_k, cdiv(M, BLOCK_M))``, the same work split as ``gemv_splitk``.
Per tile of BLOCK_K positions the program loads a (BLOCK_K / P, BLOCK_N) block of words, unpacks it
to (BLOCK_K, BLOCK_N) codes (``common.unpack_tile``), loads x[:, k0 : k0 + BLOCK_K] contiguously and
runs one matrix product per tile:

    part = x[:, k0 : k0 + BLOCK_K] (BLOCK_M × BLOCK_K)  @  (q - zero)[k0 : k0 + BLOCK_K, :] (BLOCK_K × BLOCK_N)

The right operand ``q - zero`` is an integer in [-(2**BITS - 1), 2**BITS - 1], exact in fp16 and
(for 4 bits) bf16, so it is built without an int→float conversion: OR the code into the mantissa of
a 16-bit magic number (0x6400 = 1024.0 in fp16, 0x4300 = 128.0 in bf16) and subtract
``magic + zero``. The products accumulate in fp32 and the group's scale multiplies the (BLOCK_M,
BLOCK_N) tile once per tile (``SCALE_PER_TILE``); for groups shorter than BLOCK_K the scale is
folded into each weight instead (``(q - zero)·scale`` rounded once to the activation dtype, as the
reference does). ``DOT_IN_FP32`` builds both operands in fp32 instead; the dispatcher sets it only
under the Triton interpreter for bf16, whose bf16 arithmetic and ``tl.dot`` give wrong results
(Triton 3.9), never on a GPU. tl.dot needs BLOCK_M, BLOCK_K and BLOCK_N ≥ 16.
"""

from __future__ import annotations

import triton
import triton.language as tl

from neural_quantization.kernels.triton.common import (
    finish_output,
    load_words_and_sources,
    load_zero_points,
    load_zero_points_2d,
    split_tiles,
    unpack_tile,
)


@triton.jit
def dot_splitk_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, bias_ptr, out_ptr, partial_ptr, ticket_ptr,
    M, N, K, stride_xm, stride_om, group_size, tiles_per_split, split_k,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr, USE_SPLIT: tl.constexpr, HALF_MAGIC: tl.constexpr,
    HALF_MAGIC_VALUE: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // PER_WORD
    dtype = x_ptr.dtype.element_ty
    # Tile prologue repeated in each kernel on purpose: every kernel is its own specialisation.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n_words = (K + PER_WORD - 1) // PER_WORD
    packed_n = (N + PER_WORD - 1) // PER_WORD
    tile_begin, tile_end = split_tiles(pid_k, tiles_per_split, K, BLOCK_K)

    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for tile in range(tile_begin, tile_end):
        k0 = tile * BLOCK_K
        words, k, k_mask, source = load_words_and_sources(qweight_ptr, perm_ptr, tile, offs_r, offs_k, offs_n, n_mask,
                                                          n_words, N, K, ROWS, BLOCK_K, HAS_PERM)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + source[None, :],
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        codes = unpack_tile(words, BITS)
        if SCALE_PER_TILE:
            group = k0 // group_size
            zeros = load_zero_points(qzeros_ptr, group, offs_n, n_mask, packed_n, BITS, SYMMETRIC, BLOCK_N)
            scale = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if DOT_IN_FP32:  # only for the Triton interpreter, whose bf16 arithmetic is wrong (3.9)
                w = (codes - zeros[None, :]).to(tl.float32)
                part = tl.dot(xv.to(tl.float32), w)
            else:
                if HALF_MAGIC != 0:
                    zero_magic = (zeros + HALF_MAGIC_VALUE).to(dtype)[None, :]
                    w = (codes | HALF_MAGIC).to(tl.int16).to(dtype, bitcast=True) - zero_magic
                else:
                    w = (codes - zeros[None, :]).to(dtype)
                part = tl.dot(xv, w)
            acc += part * scale[None, :]
        else:
            groups = tl.minimum(k, K - 1) // group_size
            zeros_2d = load_zero_points_2d(qzeros_ptr, groups, offs_n, n_mask, packed_n, BITS, SYMMETRIC)
            scale_2d = tl.load(scales_ptr + groups[:, None] * N + offs_n[None, :], mask=n_mask[None, :],
                               other=0.0).to(tl.float32)
            w = (codes - zeros_2d).to(tl.float32) * scale_2d
            if DOT_IN_FP32:
                acc = tl.dot(xv.to(tl.float32), w, acc)
            else:
                acc = tl.dot(xv, w.to(dtype), acc)
    finish_output(acc, out_ptr, bias_ptr, partial_ptr, ticket_ptr, offs_m, offs_n, m_mask, n_mask,
                  M, N, stride_om, pid_k, split_k, pid_m * tl.num_programs(0) + pid_n, HAS_BIAS, USE_SPLIT)
