"""GPTQ: quantize a weight matrix column by column, compensating each rounding error.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023), Algorithm 1.

A linear layer computes ``Y = X W^T`` with ``W`` (N outputs, K inputs) and calibration inputs ``X``
(tokens, K). GPTQ looks for codes ``Q`` on the grid that minimise the change of the layer output

    || X W^T - X Q^T ||²  =  tr((W - Q) H (W - Q)^T) / 2,    H = 2 X^T X   (K, K)

It quantizes one input column ``k`` at a time (for all N rows at once) and spreads that column's
rounding error over the columns not yet quantized, in the proportions the inverse Hessian gives
(the Optimal Brain Surgeon update):

    err      = (w_k - q_k) / [H^-1]_kk
    w_{k+1:} -= err · [H^-1]_{k, k+1:}

Using the upper Cholesky factor ``U`` of ``H^-1`` in place of ``H^-1`` (and re-using its rows)
makes the sequence of updates exact and numerically stable. The updates are applied lazily: inside
a block of ``block_size`` columns immediately, to the columns after the block once per block as
one matrix product. The column loop inside a block is :func:`quantize_columns_torch`; on a GPU the
same loop runs as one Triton launch per block (``core/gptq_columns.py``), since the rows
are independent given ``U``.

Options that change the order or the grid:

* act-order (``desc_act``): columns are processed in order of decreasing ``diag(H)`` (the inputs
  with the most energy first, while there are most columns left to absorb their error).
* groups: each run of ``group_size`` processed columns shares one scale/zero per row, chosen when
  the solve reaches the group's first column (from the error-updated weights). With act-order the
  groups follow the processing order, so ``g_idx`` maps each original column to its group.
  ``static_groups`` instead fixes every group's grid from the original weights in the original
  column order before the solve, so ``g_idx`` stays ``k // group_size`` even with act-order.
* clipping (``clip``): a group's grid is its min/max range, or that range shrunk by the ratio
  that minimises the weights' rounding error ("mse") or the group's own term of the objective
  above, ``e H_gg eᵀ`` for the rounding error ``e`` of each row ("hessian"; ``core/grid.py``).
* damping: ``damp_percent · mean(diag(H))`` is added to the diagonal; when the Cholesky
  factorisation still fails, the damping is doubled until it succeeds (the value used is returned).

Asymmetric calibration (GPTAQ; Li et al., "GPTAQ: Efficient Finetuning-Free Quantization for
Asymmetric Calibration", ICML 2025). In a layer-by-layer pipeline the layer's inputs ``X̃`` come from
the already-quantized model, while the float model fed it ``X``. Fitting the float layer's *own*
outputs, ``|| X̃ Qᵀ - X Wᵀ ||²``, instead of ``|| X̃ (Q - W)ᵀ ||²``, lets the solve also undo the
error that reached the layer. With ``Δ = X - X̃``, ``H = 2/n X̃ᵀ X̃`` and the cross term
``C = 2/n Δᵀ X̃`` (K, K), that objective is, up to a constant,

    tr((Q - W*) H (Q - W*)ᵀ) / 2,    W* = W + W C (H + λI)^-1

(the least-squares fit of the float outputs from ``X̃``, regularised towards ``W`` by the same
damping ``λ`` the solve uses): GPTQ on the target ``W*`` with the Hessian ``H`` solves it
(:func:`accumulate_cross`, :func:`asymmetric_target`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from neural_quantization.config import QuantizationConfig
from neural_quantization.core import grid
from neural_quantization.core.quantized_weight import QuantizedWeight, hessian_weighted_error, num_groups

MAX_DAMP_PERCENT = 1.0


class HessianError(RuntimeError):
    """The Hessian could not be made positive definite even with strong damping."""


def accumulate_hessian(
    hessian: torch.Tensor | None, n_tokens: int, inputs: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running mean ``H = 2/n · Σ x x^T`` (fp32).

    inputs: (..., K) activations entering the linear layer; all leading dims are tokens.
    Returns the updated (K, K) Hessian and token count. The running mean keeps the magnitude of
    ``H`` independent of how many tokens were seen, so damping fractions mean the same thing
    for any calibration size.
    """
    x = inputs.reshape(-1, inputs.shape[-1])
    batch = x.shape[0]
    if hessian is None:
        hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    total = n_tokens + batch
    hessian.mul_(n_tokens / total)
    half_on_gpu = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    if half_on_gpu and _HALF_MM_TO_FP32[0]:
        # Products of fp16/bf16 numbers are exact in fp32, so tensor cores accumulating in fp32
        # give the fp32 result (up to summation order) without first copying x to fp32.
        try:
            hessian.add_(torch.mm(x.T, x, out_dtype=torch.float32), alpha=2.0 / total)
            return hessian, total
        except (TypeError, RuntimeError, NotImplementedError):  # torch without out_dtype for mm
            _HALF_MM_TO_FP32[0] = False
    # fp16/bf16 values are exact in TF32 (10-bit mantissa), so TF32 tensor cores are exact here too.
    x = x.float()
    with _tf32_matmul(half_on_gpu):
        hessian.addmm_(x.T, x, alpha=2.0 / total)
    return hessian, total


def accumulate_cross(
    cross: torch.Tensor | None, n_tokens: int, float_inputs: torch.Tensor, inputs: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Fold a batch into the running mean ``C = 2/n · Σ (x - x̃)ᵀ x̃`` (fp32), GPTAQ's cross term.

    float_inputs: (..., K) what the float model fed the layer (``x``); inputs: (..., K) what the
    quantized model feeds it (``x̃``), for the same tokens. Scaled like :func:`accumulate_hessian`
    (pass the same token count), so ``C`` and ``H`` combine directly. Returns ``(C, count)``.
    """
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    delta = float_inputs.reshape(-1, float_inputs.shape[-1]).float() - x
    batch = x.shape[0]
    if cross is None:
        cross = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    total = n_tokens + batch
    cross.mul_(n_tokens / total)
    cross.addmm_(delta.T, x, alpha=2.0 / total)
    return cross, total


def asymmetric_target(
    weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp_percent: float
) -> torch.Tensor:
    """GPTAQ's target ``W* = W + W C (H + λI)^-1`` (N, K) fp32, λ = damp · mean(diag H).

    weight: (N, K); hessian ``H`` and cross term ``C``: (K, K) from :func:`accumulate_hessian` and
    :func:`accumulate_cross` over the same tokens. Inputs that never fire (``diag H = 0``) are
    treated as in :func:`gptq_quantize`. The damping is doubled until the factorisation succeeds.
    """
    W = weight.detach().float()
    H = hessian.detach().float().to(W.device)  # not modified: _damped_cholesky works on a copy
    dead = torch.diag(H) == 0
    if bool(dead.any()):
        H = H.clone()
        H[dead, dead] = 1
    mean_diag = torch.diag(H).mean()
    damp = damp_percent
    while damp <= MAX_DAMP_PERCENT:
        lower = _damped_cholesky(H, damp, mean_diag)
        if lower is not None:
            return W + torch.cholesky_solve((W @ cross.to(W.device).float()).T, lower).T  # W C (H + λI)^-1
        damp *= 2
    raise HessianError("the Hessian is not positive definite even with strong damping; use more or more "
                       "varied calibration text, or turn asymmetric calibration (gptaq) off.")


def _damped_cholesky(hessian: torch.Tensor, damp: float, mean_diag: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor of ``H + damp · mean_diag · I``, or None where it does not exist."""
    damped = hessian.clone()
    damped.diagonal().add_(damp * mean_diag)
    lower, info = torch.linalg.cholesky_ex(damped)
    return lower if int(info) == 0 else None


_HALF_MM_TO_FP32 = [True]  # set to False once torch.mm(..., out_dtype=float32) turned out unsupported


@contextlib.contextmanager
def _tf32_matmul(enabled: bool) -> Iterator[None]:
    """Let CUDA fp32 matrix products use TF32 tensor cores inside the block (when ``enabled``)."""
    matmul = torch.backends.cuda.matmul
    if not enabled:
        yield
        return
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        previous = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:
        previous = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


class InverseFactorError(HessianError):
    """H + λI factored, but its inverse's factor did not (or was not finite): retry with 2 λ."""

    def __init__(self, damp: float):
        super().__init__(f"the inverse Hessian's factor failed at damp_percent={damp}")
        self.damp = damp


def inverse_hessian_cholesky(hessian: torch.Tensor | list[torch.Tensor],
                             damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)^-1`` with λ = damp · mean(diag H); raises damp on failure.

    Returns ``(U, damp_used)`` with ``U^T U = (H + λI)^-1``. ``hessian``: the (K, K) matrix, not
    modified; or a one-element list holding it, which hands it over: the call pops it, adds the
    damping in place and lets it go once factored, so at most two (K, K) matrices are alive at a
    time (damped H and its factor, factor and inverse, inverse and U) instead of three. That bounds
    the solver's memory for a wide layer (K = 14336: 0.8 GB per matrix in fp32). Same values. A
    handed-over H whose inverse then fails to factor raises :class:`InverseFactorError` (H is gone;
    the caller retries with a new copy and twice the damping, as the loop here does otherwise).
    """
    owned = isinstance(hessian, list)
    H = hessian.pop() if owned else hessian
    mean_diag = torch.diag(H).mean()
    diagonal = H.diagonal().clone() if owned else None  # (K,): puts H back for a retry
    damp = damp_percent
    while damp <= MAX_DAMP_PERCENT:
        if owned:
            H.diagonal().copy_(diagonal).add_(damp * mean_diag)
            lower, info = torch.linalg.cholesky_ex(H)
            lower = lower if int(info) == 0 else None
        else:  # H, and two of: damped H, factor, inverse
            lower = _damped_cholesky(H, damp, mean_diag)
        if lower is not None:
            if owned:
                H = None  # the damped copy was the last reference: freed before the inverse
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            # a sum is finite exactly when every entry is (or when huge finite entries overflow it,
            # which is refused as well): no (K, K) mask is allocated for the check
            if int(info) == 0 and bool(torch.isfinite(upper.sum())):
                return upper, damp
            if owned:  # H is gone: the caller builds it again for the next damping
                raise InverseFactorError(damp)
        damp *= 2
    raise HessianError(
        f"the Hessian is not positive definite even with damp_percent={MAX_DAMP_PERCENT}; "
        "the calibration inputs are degenerate: use more or more varied calibration text."
    )


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: QuantizationConfig) -> QuantizedWeight:
    """Quantize ``weight`` (N, K) given the Hessian ``hessian`` (K, K) of its inputs.

    Uses ``config.bits, group_size, sym, clip, desc_act, static_groups, damp_percent,
    block_size``. Pure: the inputs are not modified. Runs on the device of ``weight``.
    """
    bits, sym, clip = config.bits, config.sym, config.clip
    W = weight.detach().float().clone()  # (N, K), updated in place as errors are spread
    n_out, n_in = W.shape
    group = n_in if config.group_size == -1 else config.group_size
    n_groups = num_groups(n_in, config.group_size)

    # Inputs that never fire carry no information: fix their Hessian row and zero their weights.
    dead = torch.diag(hessian).to(W.device) == 0
    H = _solver_hessian(hessian, W.device, dead, None)  # (K, K) fp32 copy
    W[:, dead] = 0

    scales = torch.zeros(n_groups, n_out, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(n_groups, n_out, dtype=torch.float32, device=W.device)
    if config.static_groups:
        for g, start in enumerate(range(0, n_in, group)):
            block = slice(start, start + group)
            scale, zero = grid.choose_params(W[:, block], bits, sym, clip, H[block, block])
            scales[g], zeros[g] = scale.squeeze(1), zero.squeeze(1)

    if config.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm]  # rows, then columns (not H[perm][:, perm]): two (K, K) matrices alive, not three
        H = H[:, perm]
    else:
        perm = torch.arange(n_in, device=W.device)
    # Group of the column processed at position j (positions are in processing order).
    if config.static_groups:
        group_of_position = perm // group
    else:
        group_of_position = torch.arange(n_in, device=W.device) // group

    group_at = group_of_position.tolist()  # host copy: no device sync inside the column loop
    # What the grids chosen during the solve read of H: each group's diagonal block, in processing
    # order (the clip search's Hessian-weighted error); then H itself is handed to the inverse.
    group_hessians = {} if config.static_groups else {
        start: H[start:start + group, start:start + group].clone() for start in range(0, n_in, group)}
    damp = config.damp_percent
    while True:
        handed_over = [H]
        del H  # inverse_hessian_cholesky holds the only reference: freed once factored
        try:
            Hinv, damp_used = inverse_hessian_cholesky(handed_over, damp)  # (K, K) upper triangular
            break
        except InverseFactorError as failed:  # rare: build H again and damp it twice as much
            damp = failed.damp * 2
            H = _solver_hessian(hessian, W.device, dead, perm if config.desc_act else None)
    codes = torch.zeros(n_out, n_in, dtype=torch.int32, device=W.device)
    solve_columns, group_table = _column_solver(W, config.block_size, group_of_position, group_at)

    for i1 in range(0, n_in, config.block_size):
        i2 = min(i1 + config.block_size, n_in)
        W1 = W[:, i1:i2].clone()  # (N, B) current block, updated column by column
        Err1 = torch.zeros_like(W1)  # (N, B) scaled errors of the block's columns
        Hinv1 = Hinv[i1:i2, i1:i2]
        for s1, s2 in _segments(i1, i2, group, fixed_grids=config.static_groups):
            if not config.static_groups and s1 % group == 0:
                # The group's grid, from the weights as GPTQ has updated them so far.
                upcoming = torch.cat([W1[:, s1 - i1 :], W[:, i2 : s1 + group]], dim=1)[:, :group]
                size = upcoming.shape[1]  # the group's columns, in processing order from s1
                scale, zero = grid.choose_params(upcoming, bits, sym, clip, group_hessians[s1][:size, :size])
                scales[group_at[s1]], zeros[group_at[s1]] = scale.squeeze(1), zero.squeeze(1)
            solve_columns(W1, Err1, codes[:, i1:i2], Hinv1, scales, zeros, group_table[i1:i2], s1 - i1, s2 - i1, bits)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of everything after the block

    del Hinv, group_hessians
    inverse_perm = torch.argsort(perm)
    g_idx = group_of_position[inverse_perm].to(torch.int32)
    result = QuantizedWeight(
        codes=codes[:, inverse_perm].contiguous(),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx,
        bits=bits,
        group_size=config.group_size,
        damp_percent=damp_used,
    )
    result.loss = hessian_weighted_error(weight.to(W.device), result.dequantize(), hessian.to(W.device))
    return result


def _solver_hessian(hessian: torch.Tensor, device: torch.device, dead: torch.Tensor,
                    perm: torch.Tensor | None) -> torch.Tensor:
    """The solver's own fp32 copy of ``hessian`` on ``device``: dead inputs' diagonal set to 1, then
    permuted by ``perm`` (act-order) where given."""
    H = hessian.detach().float().to(device).clone()
    H[dead, dead] = 1
    if perm is not None:
        H = H[perm]
        H = H[:, perm]
    return H


def _segments(i1: int, i2: int, group: int, fixed_grids: bool) -> list[tuple[int, int]]:
    """Split the block ``[i1, i2)`` where a group starts whose grid is chosen during the solve."""
    cuts = [i1] + ([] if fixed_grids else [p for p in range(i1 + 1, i2) if p % group == 0]) + [i2]
    return list(zip(cuts[:-1], cuts[1:]))


def quantize_columns_torch(
    block: torch.Tensor,
    errors: torch.Tensor,
    codes: torch.Tensor,
    hinv_block: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_of_column: list[int],
    start: int,
    stop: int,
    bits: int,
) -> None:
    """Columns ``start … stop - 1`` of one block, one at a time (Algorithm 1's inner loop), in place.

    block, errors: (N, B) fp32; codes: (N, B) int32 view of the code matrix; hinv_block: (B, B) the
    block's part of the upper Cholesky factor ``U`` of ``H^-1``; scales, zeros: (G, N) grid table;
    group_of_column: the group of each column of the block. ``core/gptq_columns.py`` is
    the same loop as one GPU kernel.
    """
    for i in range(start, stop):
        g = group_of_column[i]
        scale, zero = scales[g].unsqueeze(1), zeros[g].unsqueeze(1)
        w = block[:, i : i + 1]  # (N, 1)
        q = grid.quantize(w, scale, zero, bits)
        codes[:, i] = q.squeeze(1)
        err = (w - grid.dequantize(q, scale, zero)) / hinv_block[i, i]  # (N, 1)
        block[:, i:] -= err @ hinv_block[i : i + 1, i:]
        errors[:, i : i + 1] = err


#: Longest block the column kernel keeps in registers; longer blocks use the torch loop.
KERNEL_MAX_BLOCK = 256


def _column_solver(W: torch.Tensor, block_size: int, group_of_position: torch.Tensor, group_at: list[int]):
    """The column loop to use for ``W``'s device, and the group table in the form it reads.

    On CUDA with Triton installed: the one-launch-per-segment kernel (``NQ_GPTQ_COLUMN_KERNEL=0``
    turns it off); elsewhere the torch loop.
    """
    if W.is_cuda and block_size <= KERNEL_MAX_BLOCK and os.environ.get("NQ_GPTQ_COLUMN_KERNEL", "1") != "0":
        try:
            from neural_quantization.core.gptq_columns import quantize_columns
        except ImportError:  # Triton is an optional dependency
            pass
        else:
            return quantize_columns, group_of_position.to(device=W.device, dtype=torch.int32)
    return quantize_columns_torch, group_at
