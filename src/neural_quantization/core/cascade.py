"""Nested cascade quantization: one set of codes that reads at two widths.

The nested grid
---------------

Take a narrow width ``n`` (e.g. 4) and a wide width ``w`` (e.g. 8), ``f = 2**(w - n)`` (16). Each
group of each output row has one narrow grid ``(s_n, z_n)`` and narrow codes ``c ∈ [0, 2**n - 1]``:

    narrow weight   = s_n · (c - z_n)

The wide grid refines every narrow cell into ``f`` points, centred on the cell:

    wide code   q = c · f + r,        r ∈ [0, f - 1]        (c = q >> (w - n): the high bits)
    wide scale  s_w = s_n / f
    wide zero   z_w = z_n · f + f/2
    wide weight = s_w · (q - z_w) = s_n · (c - z_n) + s_w · (r - f/2)

so the wide weight is the narrow weight plus an offset in ``[-s_n/2, s_n/2 - s_w]``: the points of
the wide grid inside the narrow rounding cell. Reading the wide tensors at the narrow width is
exact integer/fp16 arithmetic:

    c = q >> (w - n),   s_n = s_w · f,   z_n = z_w >> (w - n)      (z_w >> 4 = (16 z_n + 8) >> 4 = z_n)

To keep ``s_n = s_w · f`` exact in fp16 (the checkpoint stores ``s_w`` in fp16), the narrow scale is
chosen as ``f · fp16(s / f)`` where ``s`` is the usual min/max (or MSE-clipped) narrow scale
(:func:`nested_grid`): a relative change of at most 2^-11, and exact even where ``s / f`` is an fp16
subnormal. Worked example (4/8 bits, symmetric): a group with ``max|w| = 0.15`` gets
``s_n ≈ 0.02``, ``z_n = 8``; the wide view has ``s_w = s_n / 16 ≈ 0.00125``, ``z_w = 136``; a narrow
code ``c = 11`` with residual ``r = 3`` is the wide code ``179`` and the weights
``0.02 · (11 - 8) = 0.06`` (narrow) and ``0.06 + 0.00125 · (3 - 8) = 0.05375`` (wide).

The wide tensors are an ordinary asymmetric GPTQ checkpoint (``z_w`` is not ``2**(w-1)``, so the
checkpoint says ``sym: false``): any GPTQ loader reads the wide model.

The two solves
--------------

1. **Narrow (coarse) codes**: GPTQ (Frantar et al. 2023) at ``n`` bits on the original weight ``W``
   and its Hessian ``H``, exactly as :func:`~neural_quantization.core.gptq.gptq_quantize` does
   (same column order, groups, damping, error feedback), with the fp16-exact narrow scale above.
2. **Residual (fine) codes**: a second GPTQ pass on the same ``W`` and ``H`` whose grid for weight
   ``(row, k)`` is the ``f`` wide points inside the cell of its narrow code:
   ``q = clamp(round(w / s_w) + z_w, c·f, c·f + f - 1)``. The narrow codes are fixed; each column's
   rounding error is spread over the columns not yet solved, through ``H^-1`` as in GPTQ, so the
   residuals compensate each other. Weights that GPTQ's first pass pushed outside their narrow
   cell clip at the cell's edge; that is the price of nesting, measured against direct wide GPTQ.
3. **Refinement**: GPTQ's error feedback assumes the next columns can absorb any correction; inside
   a cell of ``f`` points they often cannot, and with a poorly conditioned ``H`` the clipped
   corrections can even make the wide loss exceed the narrow one (seen with small calibration
   sets). So the residual codes then go through ``refine_sweeps`` sweeps of exact coordinate
   descent on ``tr((W - Q) H (W - Q)^T)``: for each column ``k`` the loss is a parabola in the
   column's values with vertex ``q_k + (D H)_{:,k} / H_kk`` (``D = W - Q``), and the best code in
   the cell is that vertex rounded and clipped. Each step can only lower the loss, and the descent
   starts from the better of the GPTQ residuals and the cell centres (``r = f/2``, which reproduce
   the narrow weights), so the wide loss is never above the narrow loss.

Both results carry ``loss = tr((W - Q) H (W - Q)^T)`` against the original ``W``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from neural_quantization.config import QuantizationConfig
from neural_quantization.core import grid
from neural_quantization.core.gptq import inverse_hessian_cholesky
from neural_quantization.core.quantized_weight import QuantizedWeight, hessian_weighted_error, num_groups


def refinement(wide: int, narrow: int) -> int:
    """``f = 2**(wide - narrow)``: wide grid points per narrow cell (16 for 8/4 bits)."""
    if not wide > narrow >= 1:
        raise ValueError(f"a nested grid needs wide > narrow >= 1 bits; got wide={wide}, narrow={narrow}.")
    return 1 << (wide - narrow)


def nested_layout(wide: int, narrow: int) -> dict:
    """The description written into a nested checkpoint's ``quantization_config``."""
    f = refinement(wide, narrow)
    shift = wide - narrow
    return {
        "bits": [wide, narrow],
        "stored_bits": wide,
        "narrow_bits": narrow,
        "shift": shift,
        "scale_factor": f,
        "zero_offset": f // 2,
        "read_narrow": f"codes >> {shift}; scales * {f}; zeros >> {shift} (zeros as zero points, i.e. stored qzeros + 1)",
    }


def nested_grid(
    w: torch.Tensor, narrow: int, wide: int, sym: bool, clip: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The narrow grid ``(scale, zero)`` of the rows of ``w`` whose scale / f is exact in fp16.

    Same choice as :func:`grid.choose_params`, then ``scale := f · fp16(scale / f)``. Returns
    ((rows, 1), (rows, 1)) fp32 tensors; ``scale / f`` is the wide scale stored in the checkpoint.
    """
    f = refinement(wide, narrow)
    scale, zero = grid.choose_params(w, narrow, sym, clip)
    wide_scale = grid._round_scale_fp16(scale / f)
    return wide_scale * f, zero


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, config: QuantizationConfig):
    """Copies of W and H with dead inputs fixed, the column order, and the Cholesky factor of H^-1."""
    W = weight.detach().float().clone()  # (N, K)
    H = hessian.detach().float().to(W.device).clone()  # (K, K)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if config.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(W.shape[1], device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp_used = inverse_hessian_cholesky(H, config.damp_percent)
    return W, Hinv, perm, damp_used


RoundColumn = Callable[[int, torch.Tensor, int, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _gptq_columns(W: torch.Tensor, Hinv: torch.Tensor, block_size: int, round_column: RoundColumn) -> torch.Tensor:
    """The GPTQ column loop (lazy block updates), with the rounding rule supplied by the caller.

    W: (N, K) in processing order, updated in place as errors are spread; Hinv: (K, K) upper
    Cholesky factor of H^-1. ``round_column(col, W1, i, W, i2)`` returns the codes (N,) and the
    dequantized values (N, 1) of column ``col`` = ``W1[:, i]`` (``W1`` the current block, ``i2``
    its end). Returns the codes (N, K) in processing order.
    """
    n_out, n_in = W.shape
    codes = torch.zeros(n_out, n_in, dtype=torch.int32, device=W.device)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()  # (N, B)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q, deq = round_column(i1 + i, W1, i, W, i2)
            codes[:, i1 + i] = q
            err = (W1[:, i : i + 1] - deq) / Hinv1[i, i]  # (N, 1)
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes


def refine_in_cells(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codes: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    sweeps: int,
) -> torch.Tensor:
    """Coordinate descent on ``tr((W - Q) H (W - Q)^T)`` over integer codes boxed in ``[low, high]``.

    weight (N, K), hessian (K, K), codes/low/high (N, K) int32, scale/zero (N, K) per-weight grid
    (``Q = scale · (codes - zero)``). Column by column, the codes move to the rounded and clipped
    vertex of the loss parabola in that column; the loss never increases. Columns with
    ``H_kk = 0`` (inputs that never fire) are left as they are. Returns the new codes.
    """
    H = hessian.float()
    codes = codes.clone()
    D = weight.float() - scale * (codes.float() - zero)  # (N, K)
    G = D @ H  # (N, K): gradient / 2 of the loss with respect to D
    diag = torch.diag(H)
    for _ in range(sweeps):
        for k in range(weight.shape[1]):
            if diag[k] <= 0:
                continue
            s, z = scale[:, k], zero[:, k]
            current = s * (codes[:, k].float() - z)
            target = current + G[:, k] / diag[k]  # the vertex of the parabola, in weight units
            q = torch.round(target / s) + z
            q = torch.minimum(torch.maximum(q, low[:, k].float()), high[:, k].float())
            delta = s * (q - z) - current  # change of Q's column k; D changes by -delta
            if bool((delta != 0).any()):
                codes[:, k] = q.to(torch.int32)
                G -= delta.unsqueeze(1) * H[k].unsqueeze(0)
    return codes


def nested_gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: QuantizationConfig,
    wide: int,
    narrow: int,
    refine_sweeps: int = 2,
) -> tuple[QuantizedWeight, QuantizedWeight]:
    """Solve ``weight`` (N, K) at ``narrow`` bits, then its residual at ``wide`` bits (see module doc).

    Uses ``config.group_size, sym, clip, desc_act, damp_percent, block_size`` (not ``bits``).
    Returns ``(narrow_qw, wide_qw)`` with ``narrow_view(wide_qw, narrow) == narrow_qw`` exactly.
    """
    f = refinement(wide, narrow)
    n_out, n_in = weight.shape
    group = n_in if config.group_size == -1 else config.group_size
    n_groups = num_groups(n_in, config.group_size)

    # 1. narrow codes: GPTQ with groups in processing order, grids from the error-updated weights.
    W, Hinv, perm, damp = _prepare(weight, hessian, config)
    scales = torch.zeros(n_groups, n_out, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(n_groups, n_out, dtype=torch.float32, device=W.device)
    current: dict[str, torch.Tensor] = {}

    def round_narrow(col: int, W1: torch.Tensor, i: int, Wall: torch.Tensor, i2: int):
        if col % group == 0:
            upcoming = torch.cat([W1[:, i:], Wall[:, i2 : col + group]], dim=1)[:, :group]
            current["scale"], current["zero"] = nested_grid(upcoming, narrow, wide, config.sym, config.clip)
            scales[col // group], zeros[col // group] = current["scale"].squeeze(1), current["zero"].squeeze(1)
        q = grid.quantize(W1[:, i : i + 1], current["scale"], current["zero"], narrow)
        return q.squeeze(1), grid.dequantize(q, current["scale"], current["zero"])

    narrow_codes = _gptq_columns(W, Hinv, config.block_size, round_narrow)  # processing order
    group_of_position = torch.arange(n_in, device=W.device) // group
    inverse_perm = torch.argsort(perm)
    g_idx = group_of_position[inverse_perm].to(torch.int32)
    narrow_qw = QuantizedWeight(
        codes=narrow_codes[:, inverse_perm].contiguous(), scales=scales, zeros=zeros.to(torch.int32),
        g_idx=g_idx, bits=narrow, group_size=config.group_size, damp_percent=damp,
    )

    # 2. residual codes: GPTQ on the same W and H, each weight restricted to its narrow cell.
    W, Hinv, perm, damp = _prepare(weight, hessian, config)
    wide_scales = scales / f  # exact: scales are f · (fp16 values)
    wide_zeros = zeros * f + f // 2
    cell_low = narrow_codes * f  # (N, K) processing order: the cell's first wide code

    def round_wide(col: int, W1: torch.Tensor, i: int, Wall: torch.Tensor, i2: int):
        g = int(group_of_position[col])
        scale, zero = wide_scales[g].unsqueeze(1), wide_zeros[g].unsqueeze(1)  # (N, 1)
        low = cell_low[:, col : col + 1]
        q = torch.round(W1[:, i : i + 1] / scale) + zero
        q = torch.minimum(torch.maximum(q, low.float()), (low + f - 1).float()).to(torch.int32)
        return q.squeeze(1), grid.dequantize(q, scale, zero)

    wide_codes = _gptq_columns(W, Hinv, config.block_size, round_wide)[:, inverse_perm].contiguous()
    wide_qw = QuantizedWeight(
        codes=wide_codes, scales=wide_scales, zeros=wide_zeros.to(torch.int32),
        g_idx=g_idx.clone(), bits=wide, group_size=config.group_size, damp_percent=damp,
    )

    h = hessian.to(W.device).float()
    w = weight.to(W.device).float()
    dead = torch.diag(h) == 0
    w = torch.where(dead.unsqueeze(0), torch.zeros_like(w), w) if bool(dead.any()) else w
    narrow_qw.loss = hessian_weighted_error(weight.to(W.device), narrow_qw.dequantize(), h)
    gptq_loss = hessian_weighted_error(weight.to(W.device), wide_qw.dequantize(), h)
    if refine_sweeps > 0:
        # 3. coordinate descent inside the cells, from the better of GPTQ's residuals and the centres.
        low = narrow_qw.codes * f
        if gptq_loss > narrow_qw.loss:
            wide_qw.codes = low + f // 2
        g = g_idx.long()
        wide_qw.codes = refine_in_cells(
            w, h, wide_qw.codes, low, low + f - 1, wide_scales[g].T, wide_zeros[g].T, refine_sweeps
        )
    wide_qw.loss = hessian_weighted_error(weight.to(W.device), wide_qw.dequantize(), h)
    return narrow_qw, wide_qw


def narrow_view(wide_qw: QuantizedWeight, narrow: int) -> QuantizedWeight:
    """Read a nested wide :class:`QuantizedWeight` at ``narrow`` bits (exact; see the module doc).

    Raises ValueError when the zero points are not those of a nested grid (``z_w mod f == f/2``):
    an ordinary wide checkpoint has no narrow model inside it.
    """
    f = refinement(wide_qw.bits, narrow)
    shift = wide_qw.bits - narrow
    if bool((wide_qw.zeros % f != f // 2).any()):
        raise ValueError(
            f"these {wide_qw.bits}-bit tensors are not a nested grid (zero points are not {f}·z + {f // 2}); "
            f"only checkpoints quantized with cascade_mode='nested' can be read at {narrow} bits."
        )
    return QuantizedWeight(
        codes=wide_qw.codes >> shift,
        scales=wide_qw.scales * f,
        zeros=wide_qw.zeros >> shift,
        g_idx=wide_qw.g_idx.clone(),
        bits=narrow,
        group_size=wide_qw.group_size,
    )
