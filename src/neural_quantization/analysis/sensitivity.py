"""Per-layer sensitivity: the damage to the whole model when only one decoder layer is quantized.

For decoder layer ``i`` and width ``b``, every linear of layer ``i`` is rounded to nearest on the
``b``-bit grid (group size as configured), all other layers stay in float, and the model is run on
held-out windows. Measured against the float model on the same windows:

* ``kl`` = mean over predicted tokens of KL(p_float ‖ p_quantized) (nats);
* ``ppl_increase_pct`` = 100 · (exp(NLL_quantized − NLL_float) − 1) on the windows' next tokens.

The same is measured with *every* layer quantized at ``b`` (``uniform``), so a layer's share of the
uniform damage can be read off. Verdicts (thresholds stated in the report):

* ``cliff``: the layer alone causes at least ``CLIFF_SHARE`` (50 %) of the uniform model's KL, or
  more than ``CLIFF_KL`` (1 nat);
* ``sensitive``: its KL is at least ``SENSITIVE_FACTOR`` (3) times the median layer's at that width;
* ``safe`` otherwise.

The weights are restored exactly after each measurement (kept as copies of the layer's float weights).
The sweep uses round to nearest, not GPTQ: the ranking it gives is the input to mixed precision;
GPTQ lowers every layer's damage but keeps no Hessian between layers here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from neural_quantization.config import QuantizationConfig
from neural_quantization.core.rtn import rtn_quantize
from neural_quantization.nn.modules import find_decoder_layers, find_linear_layers

CLIFF_SHARE = 0.5
CLIFF_KL = 1.0
SENSITIVE_FACTOR = 3.0
THRESHOLDS = {"cliff_share_of_uniform_kl": CLIFF_SHARE, "cliff_kl_nats": CLIFF_KL,
              "sensitive_times_median_layer_kl": SENSITIVE_FACTOR}


@torch.no_grad()
def _log_probs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(n, T-1, V) float32 log-probabilities of the next token at every position but the last."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        out.append(torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1).cpu())
    return torch.cat(out)


def compare(reference: torch.Tensor, quantized: torch.Tensor, windows: torch.Tensor) -> dict[str, float]:
    """Mean KL(reference ‖ quantized) and the perplexity increase on the windows' next tokens."""
    kl = (reference.exp() * (reference - quantized)).sum(-1).mean()
    targets = windows[:, 1:, None]
    nll_ref = -reference.gather(-1, targets).mean()
    nll_q = -quantized.gather(-1, targets).mean()
    return {"kl": float(kl), "ppl_increase_pct": float(100.0 * (torch.exp(nll_q - nll_ref) - 1.0))}


def _round_layer(layer: nn.Module, config: QuantizationConfig) -> dict[str, torch.Tensor]:
    """Round every linear of ``layer`` in place; return the float weights to restore."""
    saved = {}
    for name, linear in find_linear_layers(layer).items():
        saved[name] = linear.weight.data.clone()
        linear.weight.data = rtn_quantize(linear.weight.data, config).dequantize().to(linear.weight.dtype)
    return saved


def _restore(layer: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    linears = find_linear_layers(layer)
    for name, weight in saved.items():
        linears[name].weight.data = weight


def layer_sensitivity(
    model: nn.Module,
    windows: torch.Tensor,
    bits: Sequence[int] = (4, 3),
    group_size: int = 128,
    sym: bool = True,
    batch_size: int = 4,
) -> dict:
    """The sweep of the module docstring: ``{"layers": [...], "uniform": {...}, "ranking": [...], ...}``.

    windows: (n, T) token ids of held-out text. Returns per layer and width ``kl``,
    ``ppl_increase_pct``, ``share_of_uniform_kl`` and ``verdict``; ``ranking`` orders the layers by
    their KL at the narrowest width, most sensitive first; ``seconds`` is the sweep's time.
    """
    start = time.perf_counter()
    _, layers = find_decoder_layers(model)
    reference = _log_probs(model, windows, batch_size)
    configs = {b: QuantizationConfig(bits=b, group_size=group_size, sym=sym, method="rtn", clip="minmax") for b in bits}
    uniform = {}
    for b, config in configs.items():
        saved = [_round_layer(layer, config) for layer in layers]
        uniform[b] = compare(reference, _log_probs(model, windows, batch_size), windows)
        for layer, weights in zip(layers, saved):
            _restore(layer, weights)
    rows = []
    for index, layer in enumerate(layers):
        row = {"layer": index, "linears": sorted(find_linear_layers(layer)), "widths": {}}
        for b, config in configs.items():
            saved = _round_layer(layer, config)
            row["widths"][str(b)] = compare(reference, _log_probs(model, windows, batch_size), windows)
            _restore(layer, saved)
        rows.append(row)
    for b in bits:
        kls = [row["widths"][str(b)]["kl"] for row in rows]
        median = statistics.median(kls)
        for row in rows:
            entry = row["widths"][str(b)]
            entry["share_of_uniform_kl"] = entry["kl"] / uniform[b]["kl"] if uniform[b]["kl"] > 0 else 0.0
            entry["verdict"] = verdict(entry["kl"], entry["share_of_uniform_kl"], median)
    narrow = str(min(bits))
    ranking = sorted(range(len(rows)), key=lambda i: -rows[i]["widths"][narrow]["kl"])
    return {"method": "rtn (round to nearest, min/max grid), one decoder layer at a time",
            "group_size": group_size, "sym": sym, "bits": list(bits), "windows": list(windows.shape),
            "thresholds": dict(THRESHOLDS), "uniform": {str(b): v for b, v in uniform.items()},
            "layers": rows, "ranking": ranking, "seconds": time.perf_counter() - start}


def verdict(kl: float, share_of_uniform: float, median_kl: float) -> str:
    """``cliff`` / ``sensitive`` / ``safe`` by the thresholds of the module docstring."""
    if share_of_uniform >= CLIFF_SHARE or kl > CLIFF_KL:
        return "cliff"
    if median_kl > 0 and kl >= SENSITIVE_FACTOR * median_kl:
        return "sensitive"
    return "safe"


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (ties broken by position)."""
    def ranks(values: Sequence[float]) -> torch.Tensor:
        order = torch.tensor(values, dtype=torch.float64).argsort()
        r = torch.empty_like(order, dtype=torch.float64)
        r[order] = torch.arange(len(values), dtype=torch.float64)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


