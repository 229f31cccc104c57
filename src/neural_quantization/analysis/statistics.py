"""Where quantization hurts, measured: weight and activation statistics of the linear layers.

Weight statistics of one linear ``W`` (N, K), all on float32:

* ``max_over_std`` = max |W| / σ(W): how far the largest weight sits from the bulk (a Gaussian
  matrix of 10⁶ entries gives ≈ 5; outlier features give tens to hundreds);
* ``kurtosis`` = E[(W - μ)⁴] / σ⁴ - 3 (excess kurtosis; 0 for a Gaussian, large for heavy tails);
* ``top1pct_column_energy`` = share of ‖W‖²_F in the 1 % of input channels (columns) with the
  largest norm (≈ 0.01 when the energy is spread evenly; what act-order and rotation fight).

Activation statistics of the input ``X`` (tokens, K) of a linear, accumulated over calibration
batches (:class:`ActivationStatistics`): per input channel the max |x|; the *outlier channels* are
those whose max exceeds ``outlier_factor`` (default 20) times the median channel max, the
definition of an outlier dimension in LLM.int8() style analyses; per token position the max |x|
over channels, to find *massive activations* (a position whose max exceeds ``massive_factor``
(default 100) times the median position's, typically the first token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

OUTLIER_FACTOR = 20.0
MASSIVE_FACTOR = 100.0


def weight_statistics(weight: torch.Tensor) -> dict[str, float]:
    """``max_over_std``, ``kurtosis`` (excess) and ``top1pct_column_energy`` of ``weight`` (N, K)."""
    w = weight.detach().float()
    centered = w - w.mean()
    std = centered.pow(2).mean().sqrt().clamp_min(1e-30)
    kurtosis = float(centered.pow(4).mean() / std.pow(4) - 3.0)
    energy = w.pow(2).sum(dim=0)  # per input channel
    top = max(1, round(0.01 * energy.numel()))
    share = float(energy.topk(top).values.sum() / energy.sum().clamp_min(1e-30))
    return {"max_over_std": float(w.abs().max() / std), "kurtosis": kurtosis, "top1pct_column_energy": share}


@dataclass
class ActivationStatistics:
    """Running per-channel and per-position maxima of a linear layer's inputs (see the module docstring)."""

    channel_max: torch.Tensor | None = None  # (K,)
    position_max: torch.Tensor | None = None  # (T,) over the positions seen
    tokens: int = 0
    extra: dict = field(default_factory=dict)

    def update(self, x: torch.Tensor) -> None:
        """Add one batch of inputs ``x`` (B, T, K) (or (T, K))."""
        x = x.detach().float()
        if x.dim() == 2:
            x = x[None]
        channel = x.abs().amax(dim=(0, 1)).cpu()
        position = x.abs().amax(dim=(0, 2)).cpu()
        self.channel_max = channel if self.channel_max is None else torch.maximum(self.channel_max, channel)
        if self.position_max is None:
            self.position_max = position
        else:
            length = max(self.position_max.numel(), position.numel())
            merged = torch.zeros(length)
            merged[: self.position_max.numel()] = self.position_max
            merged[: position.numel()] = torch.maximum(merged[: position.numel()], position)
            self.position_max = merged
        self.tokens += x.shape[0] * x.shape[1]

    def summary(self, outlier_factor: float = OUTLIER_FACTOR, massive_factor: float = MASSIVE_FACTOR) -> dict:
        """Outlier channels, the max/median ratio of channel maxima, and massive positions."""
        if self.channel_max is None:
            return {"tokens": 0}
        median = float(self.channel_max.median().clamp_min(1e-30))
        outliers = torch.nonzero(self.channel_max > outlier_factor * median).flatten().tolist()
        pos_median = float(self.position_max.median().clamp_min(1e-30))
        massive = torch.nonzero(self.position_max > massive_factor * pos_median).flatten().tolist()
        return {
            "tokens": self.tokens,
            "channel_max_over_median": float(self.channel_max.max()) / median,
            "outlier_channels": outliers,
            "position_max_over_median": float(self.position_max.max()) / pos_median,
            "massive_positions": massive,
            "largest_position": int(self.position_max.argmax()),
        }


def recurring_outlier_channels(per_layer: dict[str, list[int]], min_share: float = 0.25) -> list[dict]:
    """Channels that are outliers in at least ``min_share`` of the layers that read the residual
    stream (the "outlier dimensions"): ``[{"channel", "layers", "share"}]``, most frequent first."""
    counts: dict[int, int] = {}
    for channels in per_layer.values():
        for c in set(channels):
            counts[c] = counts.get(c, 0) + 1
    total = max(1, len(per_layer))
    rows = [{"channel": c, "layers": n, "share": n / total} for c, n in counts.items() if n / total >= min_share]
    return sorted(rows, key=lambda r: (-r["layers"], r["channel"]))
