"""GPTQ (or RTN) on a diffusion pipeline's denoiser, calibrated on its sampling trajectories.

:func:`quantize_pipeline` = find the denoiser (``diffusion/pipeline.py``), collect each linear
layer's Hessian over the float pipeline's trajectories (``diffusion/calibration.py``), then solve
every layer with the same solver as for language models (``core/gptq.gptq_quantize``, or
``core/rtn.rtn_quantize`` with ``method="rtn"``) and swap in :class:`QuantLinear`. For every
layer both objectives are recorded, ``tr((W - Q) H (W - Q)ᵀ)`` of the chosen method and of RTN on
the same grid, so the report shows what calibration bought per layer.

Quantized: the denoiser's ``nn.Linear`` layers (attention projections, feed-forward, time and
caption embeddings, ``proj_in``/``proj_out`` where they are linear). Not quantized: convolutions
(in a UNet, the ResNet 3×3 convolutions hold most weights; DiTs are almost all linears), the text
encoders and the VAE: the report says how many weights that leaves in float.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from neural_quantization.config import QuantizationConfig
from neural_quantization.core.gptq import gptq_quantize
from neural_quantization.core.quantized_weight import hessian_weighted_error
from neural_quantization.core.rtn import rtn_quantize
from neural_quantization.diffusion.calibration import DEFAULT_PROMPTS, denoiser_linears, trajectory_hessians
from neural_quantization.diffusion.pipeline import denoiser_name
from neural_quantization.nn.modules import set_submodule
from neural_quantization.nn.qlinear import QuantLinear


@dataclass
class LayerResult:
    name: str
    in_features: int
    out_features: int
    loss: float  # the chosen method's objective
    rtn_loss: float  # RTN's on the same grid and Hessian


@dataclass
class PipelineQuantization:
    """What was quantized, how, and the per-layer objectives."""

    denoiser: str
    method: str
    bits: int
    group_size: int
    sym: bool
    prompts: int
    steps: int
    denoiser_calls: int
    quantized_weights: int
    float_weights: int  # denoiser parameters left in float (convolutions, norms, embeddings)
    seconds: float
    layers: list[LayerResult] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The ``quantization.json`` fields (``diffusion/pipeline.py``)."""
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "method": self.method,
                "modules": {layer.name: [self.bits, self.group_size] for layer in self.layers},
                "calibration": {"prompts": self.prompts, "steps": self.steps, "denoiser_calls": self.denoiser_calls},
                "quantized_weights": self.quantized_weights, "float_weights": self.float_weights}

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "layers"},
                "layers": [asdict(layer) for layer in self.layers]}


def diffusion_config(bits: int = 4, group_size: int = 64, method: str = "gptq", **overrides: Any) -> QuantizationConfig:
    """A :class:`QuantizationConfig` for a denoiser: the solver's settings (act-order with static
    groups, the clip search); GPTAQ and the language-model calibration fields do not apply."""
    return QuantizationConfig(bits=bits, group_size=group_size, method=method, gptaq=False, **overrides)


@torch.no_grad()
def quantize_denoiser(denoiser: nn.Module, hessians: dict[str, torch.Tensor], config: QuantizationConfig
                      ) -> list[LayerResult]:
    """Quantize every linear of ``denoiser`` named in ``hessians`` in place; returns the objectives."""
    results = []
    for name, hessian in hessians.items():
        linear = denoiser.get_submodule(name)
        weight = linear.weight.detach().float()
        rtn = rtn_quantize(weight, config, hessian)
        chosen = gptq_quantize(weight, hessian, config) if config.method == "gptq" else rtn
        results.append(LayerResult(name, linear.in_features, linear.out_features,
                                   hessian_weighted_error(weight, chosen.dequantize(), hessian),
                                   hessian_weighted_error(weight, rtn.dequantize(), hessian)))
        layer = QuantLinear.from_quantized(linear, chosen, config.kernel_backend)
        set_submodule(denoiser, name, layer)
    return results


@dataclass
class TrajectoryCalibration:
    """The float pipeline's calibration pass: every denoiser linear's Hessian (name -> (K, K) fp32)
    over the sampling trajectories of ``prompts`` prompts × ``steps`` steps. It depends only on the
    float pipeline, so several quantizations of copies of it (GPTQ and its RTN baseline, W8 and W4)
    share one pass."""

    hessians: dict[str, torch.Tensor]
    prompts: int
    steps: int
    denoiser_calls: int
    seconds: float


def calibrate_pipeline(pipe: Any, prompts: list[str] | None = None, steps: int = 20, seed: int = 0,
                       guidance_scale: float = 5.0, height: int | None = None, width: int | None = None,
                       skip: tuple[str, ...] = (), batch_size: int = 4) -> TrajectoryCalibration:
    """Sample ``prompts`` (default: the shipped ones) with the float ``pipe`` and collect the Hessians."""
    started = time.perf_counter()
    name = denoiser_name(pipe)
    linears = denoiser_linears(getattr(pipe, name), skip)
    if not linears:
        raise ValueError(f"the {name} has no linear layers left to quantize (skip={list(skip)}).")
    prompts = list(prompts or DEFAULT_PROMPTS)
    hessians, calls = trajectory_hessians(pipe, linears, prompts, steps, seed, guidance_scale, height, width,
                                          batch_size)
    return TrajectoryCalibration(hessians, len(prompts), steps, calls, time.perf_counter() - started)


def quantize_pipeline(pipe: Any, config: QuantizationConfig | None = None, prompts: list[str] | None = None,
                      steps: int = 20, seed: int = 0, guidance_scale: float = 5.0, height: int | None = None,
                      width: int | None = None, skip: tuple[str, ...] = (), batch_size: int = 4,
                      calibration: TrajectoryCalibration | None = None) -> PipelineQuantization:
    """Quantize ``pipe``'s denoiser in place (see the module docstring) and return the report.

    ``calibration`` (from :func:`calibrate_pipeline` on this pipeline or an identical float copy)
    replaces the sampling pass; the sampling arguments are then not used."""
    config = config or diffusion_config()
    if config.bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={config.bits}: a denoiser is quantized to 2, 3, 4 or 8 bits.")
    started = time.perf_counter()
    name = denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    if calibration is None:
        calibration = calibrate_pipeline(pipe, prompts, steps, seed, guidance_scale, height, width, skip, batch_size)
        calibration_seconds = 0.0  # counted in this call's own time
    else:
        calibration_seconds = calibration.seconds  # done once, before: counted in every run it serves
    linears = denoiser_linears(denoiser, skip)
    missing = sorted(set(linears) - set(calibration.hessians))
    if missing:
        raise ValueError(f"the calibration holds no Hessian for {len(missing)} linear layers of this {name} "
                         f"(first: {missing[0]}); calibrate this pipeline (or a float copy of it) with the same skip.")
    hessians = {layer: calibration.hessians[layer] for layer in linears}
    quantized_weights = sum(linear.weight.numel() for linear in linears.values())
    results = quantize_denoiser(denoiser, hessians, config)
    float_weights = sum(p.numel() for p in denoiser.parameters())
    return PipelineQuantization(name, config.method, config.bits, config.group_size, config.sym, calibration.prompts,
                                calibration.steps, calibration.denoiser_calls, quantized_weights, float_weights,
                                round(time.perf_counter() - started + calibration_seconds, 2), results)
