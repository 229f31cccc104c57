"""Cascade quantization of a whole model: sequential (8 → 4 in stages) and nested (one checkpoint, two widths).

Sequential (``cascade_mode="sequential"``, stages e.g. [8, 4])::

    for each width b in the stages:
        if a previous stage ran: turn every QuantLinear back into an nn.Linear holding its
            dequantized weight (dequantize_model_linears): that model is this stage's starting point
        run the layer-by-layer pipeline (models/sequential.py) at b bits: the calibration
            activations are recomputed through the previous stage's model, and each GPTQ solve
            targets the previous stage's (dequantized) weight

Each stage's per-layer ``loss`` is ``tr((W_prev - Q) H (W_prev - Q)^T)`` with ``W_prev`` the weight
that stage started from (the float weight for stage 1) and ``H`` the Hessian of that stage.

Nested (``cascade_mode="nested"``, stages [wide, narrow]): the same layer-by-layer pipeline, with
:func:`neural_quantization.core.cascade.nested_gptq_quantize` as the per-layer solve. While a
decoder layer is being calibrated its linears compute with the *narrow* weights, so later groups and
later layers see (and compensate) the narrow model's errors, exactly as in direct narrow GPTQ; the
residual solve of each linear uses the same Hessian. When the layer is done its linears are
replaced by the wide QuantLinears that are saved. Stage 1 of the report is the narrow read, stage 2
the wide read (the stored model); their losses are both against the original float weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neural_quantization.config import QuantizationConfig
from neural_quantization.core.cascade import narrow_view, nested_gptq_quantize
from neural_quantization.core.quantized_weight import QuantizedWeight
from neural_quantization.formats.gptq import to_gptq_tensors
from neural_quantization.nn.modules import set_submodule
from neural_quantization.models.sequential import (
    LinearReport,
    quantize_decoder_layers,
)
from neural_quantization.nn.qlinear import QuantLinear

FP16_BYTES = 2


@dataclass
class StageReport:
    """One stage of a cascade, every number measured.

    compression_ratio: fp16 bytes of the quantized linears / bytes of their packed tensors at this
        stage's width (qweight + qzeros + scales + g_idx), measured on the tensors themselves.
    layers: per-linear reports (``loss`` as described in the module docstring).
    degradation_pct: average perplexity degradation over the evaluated languages, filled in only
        where an evaluation of this stage's model ran (None otherwise).
    """

    stage: int
    bits: int
    mode: str
    role: str
    compression_ratio: float
    packed_bytes: int
    fp16_bytes: int
    seconds: float
    layers: list[LinearReport] = field(default_factory=list)
    degradation_pct: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_loss(self) -> float | None:
        losses = [r.loss for r in self.layers if r.loss is not None]
        return sum(losses) / len(losses) if losses else None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "stage": self.stage,
            "bits": self.bits,
            "mode": self.mode,
            "role": self.role,
            "compression_ratio": self.compression_ratio,
            "packed_bytes": self.packed_bytes,
            "fp16_bytes": self.fp16_bytes,
            "seconds": round(self.seconds, 4),
            "mean_loss": self.mean_loss,
            "degradation_pct": self.degradation_pct,
            "layers": [r.to_dict() for r in self.layers],
        }
        out.update(self.extra)
        return out


def packed_sizes(layers: list[QuantLinear] | list[dict[str, torch.Tensor]]) -> int:
    """Bytes of qweight + qzeros + scales + g_idx over QuantLinear modules (or dicts of those tensors)."""
    total = 0
    for layer in layers:
        get = layer.__getitem__ if isinstance(layer, dict) else lambda n, m=layer: getattr(m, n)
        total += sum(get(n).numel() * get(n).element_size() for n in ("qweight", "qzeros", "scales", "g_idx"))
    return total


def quantized_linears(model: nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def _fp16_bytes(layers: list[QuantLinear]) -> int:
    return sum(m.in_features * m.out_features * FP16_BYTES for m in layers)


@torch.no_grad()
def dequantize_model_linears(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every QuantLinear of ``model`` by an ``nn.Linear`` holding its dequantized weight.

    ``dtype`` defaults to the input embeddings' dtype. The weights are exactly those the
    QuantLinear computed with (``scale · (code - zero)`` in fp32, rounded once to ``dtype``).
    Returns the number of layers replaced.
    """
    dtype = dtype or model.get_input_embeddings().weight.dtype
    names = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        q = model.get_submodule(name)
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.qweight.device, dtype=dtype)
        linear.weight.copy_(q.dequantize_weight(dtype))
        if q.bias is not None:
            linear.bias.copy_(q.bias.to(dtype))
        set_submodule(model, name, linear)
    return len(names)


def narrow_quantlinear(layer: QuantLinear, bits: int) -> QuantLinear:
    """The narrow read of a nested QuantLinear (a new module; exact, see core/cascade.py)."""
    if bits == layer.bits:
        return layer
    narrow = narrow_view(layer.quantized_weight(), bits)
    out = QuantLinear(
        layer.in_features, layer.out_features, bits, layer.group_size, bias=layer.bias is not None,
        bias_dtype=layer.bias.dtype if layer.bias is not None else torch.float16,
        kernel_backend=layer.kernel_backend, device=layer.qweight.device,
    )
    for name, tensor in to_gptq_tensors(narrow).items():
        getattr(out, name).copy_(tensor.to(layer.qweight.device))
    if layer.bias is not None:
        out.bias.copy_(layer.bias)
    return out


def narrow_model(model: nn.Module, bits: int) -> int:
    """Replace, in place, every nested QuantLinear of ``model`` by its ``bits``-bit read; returns the count."""
    names = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        set_submodule(model, name, narrow_quantlinear(model.get_submodule(name), bits))
    return len(names)


def sequential_cascade(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: QuantizationConfig,
    device: torch.device,
    on_layer_done: Callable[[int, int], None] | None = None,
) -> list[StageReport]:
    """Quantize ``model`` in place through ``config.cascade_stages`` in turn; one report per stage."""
    stages: list[StageReport] = []
    for index, bits in enumerate(config.cascade_stages):
        start = time.perf_counter()
        if index:
            dequantize_model_linears(model)
        stage_config = config.replace(bits=bits, cascade_stages=None)  # one direct run per stage
        reports = quantize_decoder_layers(model, input_ids, stage_config, device, on_layer_done)
        seconds = time.perf_counter() - start
        layers = quantized_linears(model)
        packed, fp16 = packed_sizes(layers), _fp16_bytes(layers)
        stages.append(StageReport(
            stage=index + 1, bits=bits, mode="sequential",
            role="from the float model" if index == 0 else f"from the stage-{index} model ({stages[-1].bits} bits)",
            compression_ratio=fp16 / packed, packed_bytes=packed, fp16_bytes=fp16, seconds=seconds, layers=reports,
        ))
    return stages


@torch.no_grad()
def _solve_nested(
    name: str, linear: nn.Linear, hessian: torch.Tensor | None, config: QuantizationConfig
) -> tuple[tuple[QuantizedWeight, LinearReport], tuple[QuantizedWeight, LinearReport]]:
    wide, narrow = config.cascade_stages
    note = ""
    h = hessian
    if h is None:  # no calibration token reached it: identity Hessian (GPTQ then equals rounding to nearest)
        h = torch.eye(linear.in_features, device=linear.weight.device)
        note = "no calibration tokens reached this layer; solved with an identity Hessian (round to nearest)"
    start = time.perf_counter()
    narrow_qw, wide_qw = nested_gptq_quantize(linear.weight, h, config, wide, narrow)
    seconds = time.perf_counter() - start
    if hessian is None:
        narrow_qw.loss = wide_qw.loss = None
    shape = (linear.out_features, linear.in_features)
    reports = [
        LinearReport(name=name, shape=shape, method=f"gptq-nested-{b}", loss=qw.loss, damp_percent=qw.damp_percent,
                     seconds=seconds / 2, note=note)
        for b, qw in ((narrow, narrow_qw), (wide, wide_qw))
    ]
    return (narrow_qw, reports[0]), (wide_qw, reports[1])


# Same signature as sequential_cascade on purpose: the pipeline calls either mode alike.
@torch.no_grad()
def nested_cascade(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: QuantizationConfig,
    device: torch.device,
    on_layer_done: Callable[[int, int], None] | None = None,
) -> list[StageReport]:
    """Quantize ``model`` in place to a nested checkpoint (wide QuantLinears); reports [narrow, wide].

    It is :func:`models.sequential.quantize_decoder_layers` with a solver that returns the narrow
    layer to calibrate on through the block and the wide layer to keep (see the module docstring
    for which weights the calibration runs through). Stage seconds: the narrow stage gets
    the pipeline (captures, Hessians, forwards) and half of each solve; the wide stage the other half
    (the two solves of a linear are one call and cost about the same).
    """
    wide, narrow = config.cascade_stages
    narrow_tensors: list[dict[str, torch.Tensor]] = []

    def solve(name: str, linear: nn.Linear, hessian: torch.Tensor | None, cfg: QuantizationConfig):
        (narrow_qw, narrow_rep), (wide_qw, wide_rep) = _solve_nested(name, linear, hessian, cfg)
        narrow_tensors.append({key: t.cpu() for key, t in to_gptq_tensors(narrow_qw).items()})
        # Calibrate on through the narrow model; keep the wide layer for the checkpoint.
        return (
            QuantLinear.from_quantized(linear, narrow_qw, cfg.kernel_backend),
            QuantLinear.from_quantized(linear, wide_qw, cfg.kernel_backend),
            [narrow_rep, wide_rep],
        )

    start = time.perf_counter()
    reports = quantize_decoder_layers(model, input_ids, config, device, on_layer_done, solve=solve)
    total = time.perf_counter() - start
    narrow_reports = [r for r in reports if r.method == f"gptq-nested-{narrow}"]
    wide_reports = [r for r in reports if r.method == f"gptq-nested-{wide}"]

    wide_modules = quantized_linears(model)
    fp16 = _fp16_bytes(wide_modules)
    wide_seconds = sum(r.seconds for r in wide_reports)
    narrow_packed, wide_packed = packed_sizes(narrow_tensors), packed_sizes(wide_modules)
    layout = {"read": "load_quantized(dir, bits=%d)" % narrow}
    return [
        StageReport(stage=1, bits=narrow, mode="nested", role=f"high {narrow} bits of the stored {wide}-bit codes",
                    compression_ratio=fp16 / narrow_packed, packed_bytes=narrow_packed, fp16_bytes=fp16,
                    seconds=total - wide_seconds, layers=narrow_reports, extra=layout),
        StageReport(stage=2, bits=wide, mode="nested", role=f"stored {wide}-bit codes (residual solve)",
                    compression_ratio=fp16 / wide_packed, packed_bytes=wide_packed, fp16_bytes=fp16,
                    seconds=wide_seconds, layers=wide_reports, extra={"read": f"load_quantized(dir, bits={wide})"}),
    ]


def run_cascade(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: QuantizationConfig,
    device: torch.device,
    on_layer_done: Callable[[int, int], None] | None = None,
) -> list[StageReport]:
    """Dispatch on ``config.cascade_mode``; the model is left holding the final / stored stage."""
    if not config.cascade_stages:
        raise ValueError("run_cascade needs config.cascade_stages, e.g. [8, 4].")
    if config.cascade_mode == "nested":
        return nested_cascade(model, input_ids, config, device, on_layer_done)
    return sequential_cascade(model, input_ids, config, device, on_layer_done)
