"""Split-K GEMV for one activation row per program (decode, M = 1): CUDA-core FMAs.

Grid ``(cdiv(N, BLOCK_N), split_k, M)`` (BLOCK_M must be 1). Program ``(n, s, m)`` owns output
columns ``n·BLOCK_N …`` of row m and walks ``tiles_per_split`` tiles of ``ROWS`` packed words
(``ROWS · P`` input positions, P = 32 / BITS codes per word) starting at tile ``s·tiles_per_split``.
It reads the GPTQ layout as it is (no repack). (A version holding several rows in 3-D register
tiles spilled at 255 registers on H100 with Triton 3.6; several rows go to ``dot_slices``.)

Per tile the program loads a (ROWS, BLOCK_N) block of int32 words (16-byte loads along N). With
``BLOCK_N = 128 · num_warps`` each thread owns 4 columns and *all* ROWS rows of the tile, so the
sum over the tile's rows never leaves the thread. Codes are never unpacked into K order: for each
code slot j of the words the matching activations ``x[m, k0 + P·r + j]`` (a (BLOCK_M, ROWS) strided
load from L1) multiply the codes of slot j in place.

Dequantization without int→float conversion or zero subtraction per weight. A code q is moved
into the top mantissa bits of the fp32 number 1.0 by one shift and one mask-or, giving
``f = 1 + q / D`` exactly. For 4-bit codes one shift serves the two codes of a byte: the odd code
lands in bits 19..22 (``1 + q/16``) and the even one in bits 15..18 (``1 + q/256``), whose
activation is pre-multiplied by 16 so both contribute ``x·q/16``. Per tile and row of x

    A = Σ α_k x_k f_k = Σ α_k x_k + Σ x_k q_k / D        (α = 16 for even 4-bit slots, else 1)
    Σ x_k (q_k - z) s = s · (D · (A - Σ α_k x_k) - z · Σ x_k)

so the zero point and the group scale are applied once per tile and column, not per weight. The
products are exact in fp32 (11-bit activations × 9-bit factors) and the cancellation costs about
5 of fp32's 24 bits, far below fp16 rounding. Needs every tile inside one group
(``group_size % (ROWS · P) == 0`` or a single group), which the dispatcher guarantees.
Split-K partials are reduced in the same launch by ``common.finish_output``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from neural_quantization.kernels.triton.common import finish_output, input_columns, load_zero_points, split_tiles

ONE_F32 = tl.constexpr(0x3F800000)


@triton.jit
def _shift_to(words, shift: tl.constexpr):
    """``words << shift`` for shift ≥ 0, ``words >> -shift`` otherwise (only bits < 23 are used)."""
    if shift >= 0:
        return words << shift
    else:
        return words >> (-shift)


@triton.jit
def _x_slot(x_ptr, row, perm_ptr, k, K, HAS_PERM: tl.constexpr):
    """Activations x[row, perm[k]] (ROWS,) in fp32, zero where k ≥ K."""
    k_mask, source = input_columns(perm_ptr, k, K, HAS_PERM)
    return tl.load(x_ptr + row + source, mask=k_mask, other=0.0).to(tl.float32)


@triton.jit
def gemv_rows_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, bias_ptr, out_ptr, partial_ptr, ticket_ptr,
    M, N, K, stride_xm, stride_om, group_size, tiles_per_split, split_k,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    P: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = ROWS * P
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)  # BLOCK_M = 1: one activation row per program (2-D tiles keep registers low)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    n_mask = offs_n < N
    n_words = (K + P - 1) // P
    packed_n = (N + P - 1) // P
    tile_begin, tile_end = split_tiles(pid_k, tiles_per_split, K, BLOCK_K)
    x_row = row * stride_xm

    total = tl.zeros((BLOCK_N,), tl.float32)
    for tile in range(tile_begin, tile_end):
        rows = tile * ROWS + offs_r
        words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                        mask=(rows < n_words)[:, None] & n_mask[None, :], other=0)
        k_row = tile * BLOCK_K + offs_r * P  # first input position of each word
        acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
        s_alpha = 0.0
        s_x = 0.0
        if BITS == 4:
            for b in tl.static_range(4):
                t = _shift_to(words, 15 - 8 * b)
                f_lo = ((t & 0x00078000) | ONE_F32).to(tl.float32, bitcast=True)  # 1 + q_{2b} / 256
                f_hi = ((t & 0x00780000) | ONE_F32).to(tl.float32, bitcast=True)  # 1 + q_{2b+1} / 16
                x_lo = _x_slot(x_ptr, x_row, perm_ptr, k_row + 2 * b, K, HAS_PERM) * 16.0
                x_hi = _x_slot(x_ptr, x_row, perm_ptr, k_row + 2 * b + 1, K, HAS_PERM)
                acc += x_lo[:, None] * f_lo + x_hi[:, None] * f_hi
                lo_sum = tl.sum(x_lo, axis=0)
                hi_sum = tl.sum(x_hi, axis=0)
                s_alpha += lo_sum + hi_sum
                s_x += lo_sum * 0.0625 + hi_sum
            D: tl.constexpr = 16.0
        else:
            for j in tl.static_range(4):
                t = _shift_to(words, 15 - 8 * j)
                f = ((t & 0x007F8000) | ONE_F32).to(tl.float32, bitcast=True)  # 1 + q_j / 256
                xj = _x_slot(x_ptr, x_row, perm_ptr, k_row + j, K, HAS_PERM)
                acc += xj[:, None] * f
                x_sum = tl.sum(xj, axis=0)
                s_alpha += x_sum
                s_x += x_sum
            D: tl.constexpr = 256.0
        group = (tile * BLOCK_K) // group_size
        scale = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zeros = load_zero_points(qzeros_ptr, group, offs_n, n_mask, packed_n, BITS, SYMMETRIC, BLOCK_N).to(tl.float32)
        tile_sum = tl.sum(acc, axis=0)  # Σ over the tile's rows, inside each thread
        total += scale * (D * (tile_sum - s_alpha) - zeros * s_x)
    offs_m = row + tl.arange(0, 1)
    finish_output(total[None, :], out_ptr, bias_ptr, partial_ptr, ticket_ptr, offs_m, offs_n, offs_m < M, n_mask,
                  M, N, stride_om, pid_k, split_k, row * tl.num_programs(0) + pid_n, HAS_BIAS, USE_SPLIT)
