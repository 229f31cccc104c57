"""Split-K tensor-core GEMM that never reorders codes: one ``tl.dot`` per code slot (M = 1 … 64).

Grid ``(cdiv(N, BLOCK_N), split_k, cdiv(M, BLOCK_M))`` as in the other kernels. A tile is ``ROWS``
packed words (≥ 16) = ``ROWS · P`` input positions. Code slot j of word r holds input position
``P·r + j``, so for each slot j the codes of the (ROWS, BLOCK_N) word tile form, element-wise and
in place, a (ROWS, BLOCK_N) matrix whose matching activations are the strided columns
``x[:, k0 + P·r + j]``: the tile is P small products with a contraction of ROWS

    acc += x[:, k0 + j :: P] (BLOCK_M × ROWS)  @  (q_j - zero) (ROWS × BLOCK_N)       j = 0 … P-1

and the dequantized operand is a purely element-wise function of the loaded words (shift, mask-or
into the mantissa of the 16-bit magic number 1024 (fp16) / 128 (bf16), subtract magic + zero), so no
join / permute / reshape of register tiles is needed. ``SWAP`` computes the transposed product
``acc^T (BLOCK_N × BLOCK_M) += (q_j - zero)^T @ x_j^T`` instead, which puts the weights in the
tensor-core instruction's large M dimension (≥ 64 on Hopper) and the few activation rows in its
small N dimension. The group scale multiplies the per-tile accumulator once (every tile lies inside
one group: ``group_size % (ROWS · P) == 0`` or a single group). ``DOT_IN_FP32`` (interpreter, bf16
only) builds both operands in fp32 instead.
"""

from __future__ import annotations

import triton
import triton.language as tl

from neural_quantization.kernels.triton.common import finish_output, input_columns, load_zero_points, split_tiles


@triton.jit
def _slot_product(words, j: tl.constexpr, xv, acc, zeros_b, dtype, BITS: tl.constexpr, HALF_MAGIC: tl.constexpr,
                  HALF_MAGIC_VALUE: tl.constexpr, DOT_IN_FP32: tl.constexpr, SWAP: tl.constexpr):
    """``acc + x_j @ (q_j - zero)`` (or its transpose with SWAP) for code slot j of ``words``."""
    codes = (words >> (BITS * j)) & ((1 << BITS) - 1)
    if DOT_IN_FP32:  # only for the Triton interpreter, whose bf16 arithmetic is wrong (3.9)
        w = (codes - zeros_b).to(tl.float32)
        xv = xv.to(tl.float32)
    elif HALF_MAGIC != 0:
        w = (codes | HALF_MAGIC).to(tl.int16).to(dtype, bitcast=True) - (zeros_b + HALF_MAGIC_VALUE).to(dtype)
    else:
        w = (codes - zeros_b).to(dtype)
    if SWAP:
        return tl.dot(w, xv, acc)
    else:
        return tl.dot(xv, w, acc)


@triton.jit
def _halves(t):
    """Split the last axis (size 2·n) of a 3-D ``t`` by parity: (t[:, :, 0::2], t[:, :, 1::2]), the
    axis dropped when n = 1."""
    if t.shape[2] == 2:
        return tl.split(t)
    else:
        return tl.split(tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2] // 2, 2)))


@triton.jit
def dot_slices_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, bias_ptr, out_ptr, partial_ptr, ticket_ptr,
    M, N, K, stride_xm, stride_om, group_size, tiles_per_split, split_k,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_SPLIT: tl.constexpr, HALF_MAGIC: tl.constexpr, HALF_MAGIC_VALUE: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, SWAP: tl.constexpr, XSPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    P: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = ROWS * P
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
    n_words = (K + P - 1) // P
    packed_n = (N + P - 1) // P
    tile_begin, tile_end = split_tiles(pid_k, tiles_per_split, K, BLOCK_K)

    if SWAP:
        total = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for tile in range(tile_begin, tile_end):
        rows = tile * ROWS + offs_r
        row_mask = rows < n_words
        if SWAP:
            words = tl.load(qweight_ptr + rows[None, :] * N + offs_n[:, None],
                            mask=row_mask[None, :] & n_mask[:, None], other=0)  # (BLOCK_N, ROWS)
        else:
            words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                            mask=row_mask[:, None] & n_mask[None, :], other=0)  # (ROWS, BLOCK_N)
        group = (tile * BLOCK_K) // group_size
        zeros = load_zero_points(qzeros_ptr, group, offs_n, n_mask, packed_n, BITS, SYMMETRIC, BLOCK_N)
        scale = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SWAP:
            zeros_b = zeros[:, None]
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        else:
            zeros_b = zeros[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if XSPLIT:
            # one contiguous (BLOCK_M, BLOCK_K) activation load per tile, split into the P slots in
            # registers: x[:, k0 + P·r + j] = xt[:, r, j]
            k_mask, source = input_columns(perm_ptr, tile * BLOCK_K + tl.arange(0, BLOCK_K), K, HAS_PERM)
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + source[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            xt = tl.reshape(xt, (BLOCK_M, ROWS, P))
            if SWAP:
                xt = tl.permute(xt, (1, 0, 2))  # (ROWS, BLOCK_M, P)
            if BITS == 4:
                e, o = _halves(xt)  # slots 0,2,4,6 / 1,3,5,7
                e0, e1 = _halves(e)  # 0,4 / 2,6
                o0, o1 = _halves(o)  # 1,5 / 3,7
                x0, x4 = _halves(e0)
                x2, x6 = _halves(e1)
                x1, x5 = _halves(o0)
                x3, x7 = _halves(o1)
                # Unrolled on purpose: Triton cannot index a tuple of register tensors with a loop variable.
                acc = _slot_product(words, 0, x0, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
                acc = _slot_product(words, 1, x1, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
                acc = _slot_product(words, 2, x2, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
                acc = _slot_product(words, 3, x3, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
                acc = _slot_product(words, 4, x4, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
                acc = _slot_product(words, 5, x5, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
                acc = _slot_product(words, 6, x6, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
                acc = _slot_product(words, 7, x7, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
            else:
                e, o = _halves(xt)  # slots 0,2 / 1,3
                x0, x2 = _halves(e)
                x1, x3 = _halves(o)
                acc = _slot_product(words, 0, x0, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
                acc = _slot_product(words, 1, x1, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
                acc = _slot_product(words, 2, x2, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
                acc = _slot_product(words, 3, x3, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
        else:
            for j in tl.static_range(P):
                k_mask, source = input_columns(perm_ptr, tile * BLOCK_K + offs_r * P + j, K, HAS_PERM)
                if SWAP:
                    xv = tl.load(x_ptr + offs_m[None, :] * stride_xm + source[:, None],
                                 mask=m_mask[None, :] & k_mask[:, None], other=0.0)  # (ROWS, BLOCK_M)
                else:
                    xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + source[None, :],
                                 mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_M, ROWS)
                acc = _slot_product(words, j, xv, acc, zeros_b, dtype, BITS, HALF_MAGIC, HALF_MAGIC_VALUE,
                                    DOT_IN_FP32, SWAP)
        if SWAP:
            total += acc * scale[:, None]
        else:
            total += acc * scale[None, :]
    if SWAP:
        result = tl.trans(total)
    else:
        result = total
    finish_output(result, out_ptr, bias_ptr, partial_ptr, ticket_ptr, offs_m, offs_n, m_mask, n_mask,
                  M, N, stride_om, pid_k, split_k, pid_m * tl.num_programs(0) + pid_n, HAS_BIAS, USE_SPLIT)
