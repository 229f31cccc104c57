"""Activation-aware scaling (AWQ): per-input-channel scales that make a layer easier to round.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(MLSys 2024), section 3.2. A linear layer computes ``Y = X Wᵀ`` with ``W`` (N outputs, K inputs)
and inputs ``X`` (tokens, K). For any positive ``s`` (K,)

    Y = (X diag(1/s)) (W diag(s))ᵀ

exactly, so the layer may be quantized as ``Q(W diag(s))`` and fed ``X / s``. Rounding errors of a
column are relative to its group's grid step, so multiplying the columns of *salient* inputs (those
whose activations are large, which carry most of the output) by ``s_c > 1`` shrinks their error
relative to the weight, and dividing the input by ``s_c`` gives that smaller error back unamplified.
The other columns of the group pay a little (the grid widens when the largest weight grows), so
there is an optimum, which AWQ searches on the calibration data: with the mean input magnitude
``m_c = mean_t |x_tc|``

    s(α) = m^α / sqrt(max(m^α) · min(m^α))      (normalised around 1; α = 0 gives s = 1)

for α on a grid in [0, 1] (:data:`ALPHAS`), keeping the α with the smallest output error

    err(α) = Σ_i || X W_iᵀ - (X / s) Q(W_i diag(s))ᵀ ||²  =  Σ_i tr(E_i H E_iᵀ) · n / 2,
    E_i = W_i - Q(W_i diag(s)) diag(1/s),    H = 2/n Xᵀ X   (K, K)

summed over the linears ``W_i`` that read the same input (q/k/v; gate/up). ``Q`` is round to nearest
on the run's grid (bits, group size, symmetry) with min/max groups, as in AWQ; the pipeline then
solves the scaled layer with GPTQ. Because α = 0 is on the grid, the error chosen is never above
that of no scaling. The error is computed from ``H`` (the Hessian the GPTQ pipeline collects
anyway), not from ``X``; ``m`` is accumulated beside it (:func:`accumulate_abs_mean`).

Folding ``1/s`` into whatever produced ``X`` (a norm's scale, or the output rows of the linear
before) is the model's business (``models/awq.py``). The solve that follows sees the inputs
``X / s``, whose Hessian is ``diag(1/s) H diag(1/s)``; the pipeline collects it afresh on the
scaled layer anyway (true-sequential GPTQ needs the inputs after the earlier groups' rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from neural_quantization.config import QuantizationConfig
from neural_quantization.core import grid

#: the α grid searched: 0, 0.05, …, 1 (AWQ's 20 steps, with both ends)
ALPHAS = tuple(i / 20 for i in range(21))

#: smallest mean input magnitude used, relative to the largest: inputs that never fire would
#: otherwise get scales near 0 (weights multiplied by ~0, the norm's scale divided by ~0)
MIN_RELATIVE_MAGNITUDE = 1e-4


@dataclass
class ScaleSearch:
    """The outcome of :func:`search_scales` for one group of linears reading the same input.

    scales: (K,) fp32, the ``s`` chosen (all ones when α = 0 won).
    alpha: the exponent chosen. error: ``err(alpha)``; error_unscaled: ``err(0)``, with ``s = 1``
    (both as ``Σ_i tr(E_i H E_iᵀ)``). errors: ``err`` for every α tried, in :data:`ALPHAS` order.
    """

    scales: torch.Tensor
    alpha: float
    error: float
    error_unscaled: float
    errors: list[float] = field(default_factory=list)


def accumulate_abs_mean(mean: torch.Tensor | None, n_tokens: int, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs (..., K) into the running mean ``m = mean_t |x_t|`` (K,) fp32.

    Returns ``(m, count)``; counts tokens like :func:`core.gptq.accumulate_hessian`.
    """
    x = inputs.reshape(-1, inputs.shape[-1])
    total = n_tokens + x.shape[0]
    batch_sum = x.abs().sum(dim=0, dtype=torch.float32)
    if mean is None:
        return batch_sum / total, total
    return mean.mul_(n_tokens / total).add_(batch_sum, alpha=1.0 / total), total


def activation_scales(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = m^α / sqrt(max · min)`` (K,) fp32: the scale of each input channel for exponent ``alpha``.

    ``m`` (K,) is floored at :data:`MIN_RELATIVE_MAGNITUDE` of its largest value, so with α ≤ 1 the
    scales span at most four orders of magnitude, centred (geometrically) on 1.
    """
    m = abs_mean.float()
    m = m.clamp(min=float(m.max()) * MIN_RELATIVE_MAGNITUDE).clamp(min=1e-30)
    s = m.pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def rtn_fake_quantize(weight: torch.Tensor, config: QuantizationConfig) -> torch.Tensor:
    """``weight`` (N, K) rounded to nearest on ``config``'s grid (min/max groups) and mapped back (fp32)."""
    w = weight.float()
    size = w.shape[1] if config.group_size == -1 else config.group_size
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], size):
        block = w[:, start : start + size]
        scale, zero = grid.minmax_params(block, config.bits, config.sym)
        out[:, start : start + size] = grid.fake_quantize(block, scale, zero, config.bits)
    return out


def scaled_output_error(
    weights: list[torch.Tensor], configs: list[QuantizationConfig], hessian: torch.Tensor, scales: torch.Tensor
) -> float:
    """``Σ_i tr(E_i H E_iᵀ)`` with ``E_i = W_i - Q(W_i diag(s)) diag(1/s)``: the output error of the
    linears ``W_i`` (N_i, K), each rounded on its own ``configs[i]`` grid after scaling its columns by
    ``scales`` (K,) and fed inputs divided by them. ``hessian`` (K, K) is ``2/n Xᵀ X`` of the
    unscaled inputs ``X``; the value is ``2/n`` times the squared error of the outputs."""
    h = hessian.float()
    s = scales.float().to(h.device)
    total = 0.0
    for weight, config in zip(weights, configs):
        w = weight.detach().float().to(h.device)
        error = w - rtn_fake_quantize(w * s, config) / s  # (N, K)
        total += float(((error @ h) * error).sum())
    return total


def search_scales(
    weights: list[torch.Tensor],
    configs: list[QuantizationConfig],
    hessian: torch.Tensor,
    abs_mean: torch.Tensor,
    alphas: tuple[float, ...] = ALPHAS,
) -> ScaleSearch:
    """AWQ's grid search: the ``s(α)`` (:func:`activation_scales`) with the smallest
    :func:`scaled_output_error` for the linears ``weights`` that read one input.

    weights: (N_i, K) each; configs: each one's grid; hessian (K, K) and abs_mean (K,): the
    statistics of their shared input (:func:`core.gptq.accumulate_hessian`,
    :func:`accumulate_abs_mean`). The first α of the grid wins ties, and ``alphas`` should start at
    0 (no scaling), so the result is never worse than not scaling.

    >>> g = torch.Generator().manual_seed(0)
    >>> w = torch.randn(8, 16, generator=g); x = torch.randn(256, 16, generator=g)
    >>> x[:, 3] *= 30   # one loud input channel
    >>> found = search_scales([w], [QuantizationConfig(bits=3, group_size=16)], 2 * x.T @ x / 256,
    ...                       x.abs().mean(0))
    >>> found.error <= found.error_unscaled and found.scales.argmax().item() == 3
    True
    """
    if not alphas or alphas[0] != 0:
        raise ValueError(f"alphas={alphas} must start at 0 (no scaling), the reference every α is compared with.")
    best: ScaleSearch | None = None
    errors = []
    for alpha in alphas:
        scales = activation_scales(abs_mean, alpha) if alpha else torch.ones_like(abs_mean, dtype=torch.float32)
        error = scaled_output_error(weights, configs, hessian, scales)
        errors.append(error)
        if best is None or error < best.error:
            best = ScaleSearch(scales=scales, alpha=alpha, error=error, error_unscaled=errors[0])
    best.error_unscaled, best.errors = errors[0], errors
    return best

