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
one matrix product.

Options that change the order or the grid:

* act-order (``desc_act``): columns are processed in order of decreasing ``diag(H)`` (the inputs
  with the most energy first, while there are most columns left to absorb their error).
* groups: each run of ``group_size`` processed columns shares one scale/zero per row, chosen when
  the solve reaches the group's first column (from the error-updated weights). With act-order the
  groups follow the processing order, so ``g_idx`` maps each original column to its group.
  ``static_groups`` instead fixes every group's grid from the original weights in the original
  column order before the solve, so ``g_idx`` stays ``k // group_size`` even with act-order.
* damping: ``damp_percent · mean(diag(H))`` is added to the diagonal; when the Cholesky
  factorisation still fails, the damping is doubled until it succeeds (the value used is returned).
"""

from __future__ import annotations

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
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    batch = x.shape[0]
    if hessian is None:
        hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    total = n_tokens + batch
    hessian.mul_(n_tokens / total)
    hessian.addmm_(x.T, x, alpha=2.0 / total)
    return hessian, total


def inverse_hessian_cholesky(hessian: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)^-1`` with λ = damp · mean(diag H); raises damp on failure.

    Returns ``(U, damp_used)`` with ``U^T U = (H + λI)^-1``.
    """
    k = hessian.shape[0]
    mean_diag = torch.diag(hessian).mean()
    eye = torch.eye(k, dtype=hessian.dtype, device=hessian.device)
    damp = damp_percent
    while damp <= MAX_DAMP_PERCENT:
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp
        damp *= 2
    raise HessianError(
        f"the Hessian is not positive definite even with damp_percent={MAX_DAMP_PERCENT}; "
        "the calibration inputs are degenerate: use more or more varied calibration text."
    )


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: QuantizationConfig) -> QuantizedWeight:
    """Quantize ``weight`` (N, K) given the Hessian ``hessian`` (K, K) of its inputs.

    Uses ``config.bits, group_size, sym, mse_clip, desc_act, static_groups, damp_percent,
    block_size``. Pure: the inputs are not modified. Runs on the device of ``weight``.
    """
    bits, sym, mse = config.bits, config.sym, config.mse_clip
    W = weight.detach().float().clone()  # (N, K), updated in place as errors are spread
    H = hessian.detach().float().to(W.device).clone()  # (K, K)
    n_out, n_in = W.shape
    group = n_in if config.group_size == -1 else config.group_size
    n_groups = num_groups(n_in, config.group_size)

    # Inputs that never fire carry no information: fix their Hessian row and zero their weights.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.zeros(n_groups, n_out, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(n_groups, n_out, dtype=torch.float32, device=W.device)
    if config.static_groups:
        for g, start in enumerate(range(0, n_in, group)):
            scale, zero = grid.choose_params(W[:, start : start + group], bits, sym, mse)
            scales[g], zeros[g] = scale.squeeze(1), zero.squeeze(1)

    if config.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(n_in, device=W.device)
    # Group of the column processed at position j (positions are in processing order).
    if config.static_groups:
        group_of_position = perm // group
    else:
        group_of_position = torch.arange(n_in, device=W.device) // group

    group_at = group_of_position.tolist()  # host copy: no device sync inside the column loop
    Hinv, damp_used = inverse_hessian_cholesky(H, config.damp_percent)  # (K, K) upper triangular
    codes = torch.zeros(n_out, n_in, dtype=torch.int32, device=W.device)
    scale = zero = None

    for i1 in range(0, n_in, config.block_size):
        i2 = min(i1 + config.block_size, n_in)
        W1 = W[:, i1:i2].clone()  # (N, B) current block, updated column by column
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = group_at[col]
            if config.static_groups:
                scale, zero = scales[g].unsqueeze(1), zeros[g].unsqueeze(1)
            elif col % group == 0:
                # The group's grid, from the weights as GPTQ has updated them so far.
                upcoming = torch.cat([W1[:, i:], W[:, i2 : col + group]], dim=1)[:, :group]
                scale, zero = grid.choose_params(upcoming, bits, sym, mse)
                scales[g], zeros[g] = scale.squeeze(1), zero.squeeze(1)
            w = W1[:, i : i + 1]  # (N, 1)
            q = grid.quantize(w, scale, zero, bits)
            codes[:, col] = q.squeeze(1)
            err = (w - grid.dequantize(q, scale, zero)) / Hinv1[i, i]  # (N, 1)
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of everything after the block

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
