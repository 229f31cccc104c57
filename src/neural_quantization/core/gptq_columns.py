"""GPTQ's column loop inside one lazy-update block, as one Triton kernel launch.

The solver (``core/gptq.py``) quantizes a block of B columns (B = ``block_size``, 128) one column at
a time; every column costs a dozen small tensor operations, so on a GPU the eager loop is bound by
launch overhead (~80 µs a column, seconds per layer). The rows of ``W`` are independent given the
inverse-Hessian factor, so one program here owns ``BLOCK_N`` rows of the block, keeps its
(BLOCK_N, B) tile of weights in registers and runs the columns ``seg_start … seg_stop - 1`` of the
block in a loop; for column ``i`` of row ``n``:

    q      = clamp(round(w[n, i] / s[n]) + z[n], 0, maxq)        s, z: the grid of i's group
    e      = (w[n, i] - s[n] · (q - z[n])) / U[i, i]              U: upper Cholesky factor of H⁻¹
    w[n, :] -= e · U[i, :]                                      (U is upper triangular: only
                                                                  columns ≥ i change)

exactly the torch loop in ``core/gptq.py`` (same rounding: division correctly rounded, round half
to even), which stays the reference and the CPU path.

Tensors (fp32 unless noted; strides in elements, last dimension contiguous):

* ``w``      (N, B_len) the block's weights, updated in place (the solver re-reads them between
  segments to choose the next group's grid);
* ``err``    (N, B_len) the scaled errors ``e`` of the block, written for the segment's columns;
* ``codes``  (N, B_len) int32 view of the solver's code matrix at the block's columns;
* ``hinv``   (B_len, B_len) the block's diagonal block of ``U``;
* ``scales``, ``zeros`` (G, N) the grid of every group (zeros as fp32);
* ``group``  (B_len,) int32, the group of each column of the block (in processing order).

The solver launches one segment per run of columns whose grids are known before the segment
starts: a whole block when groups are as long as the block (or per-channel, or static), a group at
a time for shorter groups, since each group's grid is chosen from the weights as updated so far.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 16
#: Adding and removing 1.5 · 2**23 rounds an fp32 |x| < 2**22 to the nearest integer, ties to even
#: (what ``torch.round`` does), with plain IEEE arithmetic that every backend evaluates the same.
ROUND_MAGIC = tl.constexpr(12582912.0)
ROUND_LIMIT = tl.constexpr(2097152.0)


@triton.jit
def _gptq_columns_kernel(
    w_ptr, err_ptr, codes_ptr, hinv_ptr, scales_ptr, zeros_ptr, group_ptr,
    n_rows, block_len, seg_start, seg_stop,
    stride_w, stride_err, stride_codes, stride_hr, stride_hc, stride_grid,
    MAXQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    tile_ok = row_ok[:, None] & (cols < block_len)[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=tile_ok, other=0.0)
    err = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    codes = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.int32)
    for i in range(seg_start, seg_stop):
        group = tl.load(group_ptr + i)
        scale = tl.load(scales_ptr + group * stride_grid + rows, mask=row_ok, other=1.0)
        zero = tl.load(zeros_ptr + group * stride_grid + rows, mask=row_ok, other=0.0)
        is_col = cols[None, :] == i
        wi = tl.sum(tl.where(is_col, w, 0.0), axis=1)  # column i of the tile: (BLOCK_N,)
        ratio = tl.minimum(tl.maximum(tl.math.div_rn(wi, scale), -ROUND_LIMIT), ROUND_LIMIT)
        q = tl.minimum(tl.maximum((ratio + ROUND_MAGIC) - ROUND_MAGIC + zero, 0.0), MAXQ)
        diag = tl.load(hinv_ptr + i * stride_hr + i * stride_hc)
        e = tl.math.div_rn(wi - scale * (q - zero), diag)
        u_row = tl.load(hinv_ptr + i * stride_hr + cols * stride_hc, mask=cols < block_len, other=0.0)
        w = w - e[:, None] * u_row[None, :]
        err = tl.where(is_col, e[:, None], err)
        codes = tl.where(is_col, q.to(tl.int32)[:, None], codes)
    in_segment = tile_ok & (cols >= seg_start)[None, :] & (cols < seg_stop)[None, :]
    tl.store(w_ptr + rows[:, None] * stride_w + cols[None, :], w, mask=tile_ok)
    tl.store(err_ptr + rows[:, None] * stride_err + cols[None, :], err, mask=in_segment)
    tl.store(codes_ptr + rows[:, None] * stride_codes + cols[None, :], codes, mask=in_segment)


# Same parameters as core.gptq.quantize_columns_torch on purpose: this is its Triton specialisation.
def quantize_columns(
    block: torch.Tensor,
    errors: torch.Tensor,
    codes: torch.Tensor,
    hinv_block: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_of_column: torch.Tensor,
    start: int,
    stop: int,
    bits: int,
) -> None:
    """Quantize columns ``start … stop - 1`` of one block in place (see the module docstring).

    block, errors: (N, B_len) fp32; codes: (N, B_len) int32 (a column slice of the code matrix);
    hinv_block: (B_len, B_len) fp32, any strides; scales, zeros: (G, N) fp32; group_of_column: (B_len,) int32.
    """
    n_rows, block_len = block.shape
    for tensor in (block, errors, codes, scales, zeros):
        assert tensor.stride(-1) == 1, "last dimension must be contiguous"
    grid = (triton.cdiv(n_rows, ROWS_PER_PROGRAM),)
    _gptq_columns_kernel[grid](
        block, errors, codes, hinv_block, scales, zeros, group_of_column,
        n_rows, block_len, start, stop,
        block.stride(0), errors.stride(0), codes.stride(0), hinv_block.stride(0), hinv_block.stride(1),
        scales.stride(0),
        MAXQ=float((1 << bits) - 1), BLOCK_N=ROWS_PER_PROGRAM, BLOCK_B=triton.next_power_of_2(block_len),
        num_warps=4,
    )
