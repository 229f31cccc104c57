"""Dequantize once, then cuBLAS: for large M (prefill), where the matmul is compute bound.

``dequantize_kernel`` writes the weight transposed, ``Wt`` (K, N) in the activation dtype, in kernel
order (rows sorted by group for act-order), one (BLOCK_K, BLOCK_N) tile per program:

    Wt[k, n] = scales[g(k), n] · (q[k, n] - zero[g(k), n])   rounded once, as the reference does

Stores run along N (coalesced). The caller then computes ``x[:, perm] @ Wt`` with ``torch.matmul``:
it reads and writes 2·K·N extra bytes, which pays off only when M is large enough for the product
itself to dominate.
"""

from __future__ import annotations

import triton
import triton.language as tl

from neural_quantization.kernels.triton.common import extract_codes, load_zero_points_2d


@triton.jit
def dequantize_kernel(
    qweight_ptr, scales_ptr, qzeros_ptr, out_ptr, N, K, group_size,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // PER_WORD
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    n_mask = offs_n < N
    n_words = (K + PER_WORD - 1) // PER_WORD
    packed_n = (N + PER_WORD - 1) // PER_WORD
    rows = tile * ROWS + offs_r
    words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                    mask=(rows < n_words)[:, None] & n_mask[None, :], other=0)
    groups = tl.minimum(rows * PER_WORD, K - 1) // group_size
    zeros = load_zero_points_2d(qzeros_ptr, groups, offs_n, n_mask, packed_n, BITS, SYMMETRIC)
    scales = tl.load(scales_ptr + groups[:, None] * N + offs_n[None, :], mask=n_mask[None, :],
                     other=0.0).to(tl.float32)
    for j in tl.static_range(PER_WORD):
        k = rows * PER_WORD + j
        w = (extract_codes(words, j, BITS) - zeros).to(tl.float32) * scales
        tl.store(out_ptr + k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=(k < K)[:, None] & n_mask[None, :])
