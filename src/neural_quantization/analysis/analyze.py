"""``analyze``: weight statistics, activation statistics on calibration text and per-layer sensitivity
on held-out text, with verdicts, as one report (JSON, Markdown and, with matplotlib, a PNG heatmap).

What each number means is in ``analysis/statistics.py`` and ``analysis/sensitivity.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neural_quantization.analysis.sensitivity import layer_sensitivity
from neural_quantization.analysis.statistics import ActivationStatistics, recurring_outlier_channels, weight_statistics
from neural_quantization.nn.modules import find_decoder_layers, find_linear_layers

ANALYSIS_BITS = (2, 3, 4, 8)


class AnalysisError(ValueError):
    """Analysis settings that cannot work; the message says how to fix them."""


@torch.no_grad()
def activation_statistics(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict[str, ActivationStatistics]:
    """Per linear (``layers.<i>.<name>``) the running input statistics over ``windows`` (n, T)."""
    _, layers = find_decoder_layers(model)
    stats: dict[str, ActivationStatistics] = {}
    hooks = []
    for index, layer in enumerate(layers):
        for name, linear in find_linear_layers(layer).items():
            key = f"layers.{index}.{name}"
            stats[key] = ActivationStatistics()
            hooks.append(linear.register_forward_pre_hook(lambda m, args, key=key: stats[key].update(args[0])))
    device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start:start + batch_size].to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def analyze(
    model: nn.Module,
    calibration_windows: torch.Tensor,
    eval_windows: torch.Tensor,
    bits: Sequence[int] = (4, 3),
    group_size: int = 128,
    sym: bool = True,
    batch_size: int = 4,
) -> dict[str, Any]:
    """The whole report for a float ``model`` (see the module docstring); windows are (n, T) token ids."""
    if not bits or any(b not in ANALYSIS_BITS for b in bits):
        raise AnalysisError(f"bits={list(bits)}; analyze widths from {ANALYSIS_BITS}, e.g. --bits 4 3.")
    if calibration_windows.dim() != 2 or eval_windows.dim() != 2 or eval_windows.shape[1] < 2:
        raise AnalysisError("calibration and evaluation windows must be (n, T) token ids with T >= 2.")
    start = time.perf_counter()
    model.eval()
    _, layers = find_decoder_layers(model)
    weights = {f"layers.{i}.{name}": weight_statistics(linear.weight)
               for i, layer in enumerate(layers) for name, linear in find_linear_layers(layer).items()}
    activations = {key: s.summary() for key, s in activation_statistics(model, calibration_windows, batch_size).items()}
    # the residual stream is what q/k/v and gate/up read: their outlier channels are its outlier dimensions
    residual_readers = {k: v.get("outlier_channels", []) for k, v in activations.items()
                        if k.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}
    sensitivity = layer_sensitivity(model, eval_windows, bits, group_size, sym, batch_size)
    linears = [{"name": key, **weights[key], **{f"act_{k}": v for k, v in activations[key].items()}} for key in weights]
    prefix, _ = find_decoder_layers(model)
    return {
        "model": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        "layers": len(layers),
        "layers_prefix": prefix,
        "layer_shapes": [[[m.in_features, m.out_features] for m in find_linear_layers(layer).values()]
                         for layer in layers],
        "linears": linears,
        "outlier_dimensions": recurring_outlier_channels(residual_readers),
        "massive_activation_positions": sorted({p for v in activations.values() for p in v.get("massive_positions", [])}),
        "sensitivity": sensitivity,
        "calibration_windows": list(calibration_windows.shape),
        "seconds": time.perf_counter() - start,
    }


def write_analysis(report: dict[str, Any], json_path: str | Path) -> list[Path]:
    """``json_path``, its ``.md`` and (with matplotlib) ``.png``; returns the paths written."""
    json_path = Path(json_path)
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md = json_path.with_suffix(".md")
    md.write_text(markdown(report), encoding="utf-8")
    written = [json_path, md]
    png = _heatmap(report, json_path.with_suffix(".png"))
    if png is not None:
        written.append(png)
    return written


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: verdict table per layer and width, ranking, outlier dimensions."""
    sens = report["sensitivity"]
    bits = [str(b) for b in sens["bits"]]
    lines = [f"# Quantization analysis: {report['model']}", "",
             f"Sensitivity: {sens['method']}, group size {sens['group_size']}, held-out windows {sens['windows']}; "
             f"took {sens['seconds']:.1f} s (whole analysis {report['seconds']:.1f} s).", "",
             "Thresholds: " + ", ".join(f"{k} = {v}" for k, v in sens["thresholds"].items()), "",
             "| layer | " + " | ".join(f"KL @{b} bits (share of uniform) | verdict" for b in bits) + " |",
             "|---|" + "---|---|" * len(bits)]
    for row in sens["layers"]:
        cells = []
        for b in bits:
            entry = row["widths"][b]
            cells.append(f"{entry['kl']:.4f} ({entry['share_of_uniform_kl']:.0%}) | {entry['verdict']}")
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
    lines += ["", "Every layer at once: " + ", ".join(
        f"{b} bits: KL {sens['uniform'][b]['kl']:.4f}, perplexity {sens['uniform'][b]['ppl_increase_pct']:+.2f} %"
        for b in bits), "", f"Ranking (most sensitive first, at {min(sens['bits'])} bits): {sens['ranking']}", ""]
    dims = report["outlier_dimensions"]
    lines.append("Outlier dimensions of the residual stream (outliers in at least a quarter of the q/k/v and "
                 "gate/up inputs): " + (", ".join(f"{d['channel']} ({d['layers']} layers)" for d in dims[:20]) or "none"))
    lines.append("")
    lines.append(f"Massive-activation positions: {report['massive_activation_positions'] or 'none'}")
    return "\n".join(lines) + "\n"


def _heatmap(report: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sens = report["sensitivity"]
    bits = [str(b) for b in sens["bits"]]
    grid = [[row["widths"][b]["kl"] for row in sens["layers"]] for b in bits]
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(sens["layers"])), 1 + 0.6 * len(bits)))
    image = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_yticks(range(len(bits)), [f"{b} bits" for b in bits])
    ax.set_xlabel("decoder layer (only it quantized)")
    ax.set_title("KL divergence to the float model (nats)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
