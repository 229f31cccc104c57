"""Export a quantized model as a compressed-tensors ``pack-quantized`` checkpoint (vLLM, transformers).

This is the layout llm-compressor writes for W4A16 / W8A16 and vLLM serves with its Marlin kernels
(``CompressedTensorsWNA16``). For a linear layer ``W`` (N = out_features, K = in_features, b bits,
G = K / group_size groups, 1 per channel) it stores

===================  =======  ===========================  ============================================
name                 dtype    shape                        content
===================  =======  ===========================  ============================================
weight_packed        int32    (N, ceil(K·b / 32))          codes packed along K (the input dim), as a
                                                           little-endian bit stream: for 4 bits word j
                                                           of row n holds k = 8j … 8j+7, k = 8j + i in
                                                           bits 4i … 4i+3. The stored value is the
                                                           *signed* code plus ``2**(b-1)`` (uint4b8 /
                                                           uint8b128 in vLLM's terms).
weight_scale         float16  (N, G)                       one scale per (row, group); note (N, G), the
                                                           transpose of GPTQ's ``scales`` (G, N)
weight_zero_point    int32    (ceil(N·b / 32), G)          only for asymmetric grids: signed zero point
                                                           plus ``2**(b-1)``, packed along N (dim 0)
weight_shape         int64    (2,)                         ``[N, K]``
bias                 (model)  (N,)                         where the layer has one
===================  =======  ===========================  ============================================

and the weight is ``W[n, k] = weight_scale[n, k // group_size] · (q_signed[n, k] - zp_signed[n, g])``.

Mapping from our grid (``w = scale · (q - zero)``, ``q ∈ [0, 2**b - 1]``): the signed code is
``q - 2**(b-1)`` and the signed zero point ``zero - 2**(b-1)``, so the *stored* values are exactly
our ``q`` and ``zero``; symmetric grids have ``zero = 2**(b-1)`` (signed zero point 0), which is why
compressed-tensors drops ``weight_zero_point`` for them. Scales are fp16 values already, so the
export is exact: dequantizing it gives bit-for-bit the weights our QuantLinear computes with.

``quantization_config`` (in ``config.json``)::

    {"quant_method": "compressed-tensors", "format": "pack-quantized",
     "quantization_status": "compressed",
     "config_groups": {"group_0": {"targets": ["Linear"],
         "weights": {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
                     "group_size": 128, "dynamic": false, ["actorder": "weight"]},
         "input_activations": null, "output_activations": null, "format": "pack-quantized"}},
     "ignore": ["lm_head"], "kv_cache_scheme": null, "global_compression_ratio": null,
     "neural_quantization": {...our record of the run...}}

Conventions were checked against the ``compressed-tensors`` package (0.20:
``compressors/pack_quantized/{base,helpers}.py``, ``quantization/quant_args.py``,
``quantization/lifecycle/forward_helpers.py``) and vLLM's
``compressed_tensors/schemes/compressed_tensors_wNa16.py``; see ``docs/formats.md``.

Limits (checked before quantizing, :func:`check_export_config`):

* 4 or 8 bits only: vLLM's WNA16 scheme supports ``num_bits`` 4 and 8, and the 2/3-bit dense
  packing changed between compressed-tensors releases.
* act-order with a non-trivial ``g_idx`` (``desc_act`` without ``static_groups``) is refused:
  compressed-tensors ≥ 0.20 removed ``actorder: "group"`` (the ``weight_g_idx`` tensor), so such
  a checkpoint would not load with the current transformers stack. ``desc_act`` with
  ``static_groups`` keeps groups contiguous and is written as ``actorder: "weight"``.
* ``group_size`` must divide every quantized layer's ``in_features`` (compressed-tensors and vLLM
  both reshape K into whole groups); checked when exporting.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neural_quantization.config import QuantizationConfig
from neural_quantization.export.checkpoint import unique_state_items
from neural_quantization.formats.packing import pack
from neural_quantization.nn.qlinear import QuantLinear

SUPPORTED_BITS = (4, 8)


class ExportError(ValueError):
    """A model or configuration that the requested export format cannot represent; says how to fix it."""


def check_export_config(config: QuantizationConfig) -> None:
    """Raise :class:`ExportError` when ``config`` cannot be written as compressed-tensors (call before quantizing)."""
    if config.dynamic:
        raise ExportError(
            "per-module widths (--dynamic) are written only as GPTQ checkpoints (quantization_config.dynamic, which "
            "vLLM and GPTQModel read); use --format gptq, or drop --dynamic."
        )
    if config.bits not in SUPPORTED_BITS:
        raise ExportError(
            f"compressed-tensors export supports {SUPPORTED_BITS[0]} or {SUPPORTED_BITS[1]} bits (vLLM's WNA16 "
            f"kernels), not bits={config.bits}; use --bits 4 or --bits 8, or --format gptq."
        )
    if config.desc_act and not config.static_groups and config.group_size != -1:
        raise ExportError(
            "compressed-tensors export cannot store act-order groups (g_idx): compressed-tensors >= 0.20 removed "
            "actorder='group'. Add --static-groups (act-order with contiguous groups, written as actorder='weight'), "
            "drop --desc-act, or use --format gptq."
        )


def shape_problem(in_features: int, group_size: int) -> str | None:
    """Why a layer with ``in_features`` inputs cannot be written in groups of ``group_size`` (or None)."""
    if group_size != -1 and in_features % group_size:
        return (f"group_size={group_size} does not divide in_features={in_features}; compressed-tensors and "
                "vLLM need whole groups. Choose a group size that divides every layer's input size (e.g. 32 or 64).")
    return None


def _is_trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    k = g_idx.numel()
    size = k if group_size == -1 else group_size
    return bool(torch.equal(g_idx.cpu().long(), torch.arange(k) // size))


def layer_tensors(layer: QuantLinear, sym: bool) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one :class:`QuantLinear` (without its bias)."""
    qw = layer.quantized_weight()
    if qw.bits not in SUPPORTED_BITS:
        raise ExportError(f"compressed-tensors export supports 4 or 8 bits, this layer has {qw.bits}.")
    if not _is_trivial_g_idx(qw.g_idx, qw.group_size):
        raise ExportError(
            "this layer's groups are reordered (act-order g_idx), which compressed-tensors >= 0.20 cannot store; "
            "quantize with --static-groups or without --desc-act."
        )
    problem = shape_problem(layer.in_features, qw.group_size)
    if problem:
        raise ExportError(problem)
    mid = 1 << (qw.bits - 1)
    if sym and not bool((qw.zeros == mid).all()):
        raise ExportError("a symmetric export needs every zero point at 2**(bits-1); this layer's grid is asymmetric.")
    tensors = {
        "weight_packed": pack(qw.codes.cpu(), qw.bits, dim=1),  # (N, K·b/32): stored = signed code + 2**(b-1)
        "weight_scale": layer.scales.detach().cpu().T.contiguous().to(torch.float16),  # (N, G)
        "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if not sym:
        # signed zero point (zero - 2**(b-1)) stored with the same offset: the stored value is `zero`
        tensors["weight_zero_point"] = pack(qw.zeros.T.contiguous().cpu(), qw.bits, dim=0)  # (N·b/32, G)
    return tensors


def quantization_config(config: QuantizationConfig, ignore: list[str], record: dict[str, Any] | None) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json``."""
    channel = config.group_size == -1
    weights: dict[str, Any] = {
        "num_bits": config.bits,
        "type": "int",
        "symmetric": config.sym,
        "group_size": None if channel else config.group_size,
        "strategy": "channel" if channel else "group",
        "dynamic": False,
    }
    if config.desc_act:
        weights["actorder"] = "weight"  # columns were processed by activation order, groups stay contiguous
    out: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    if record:
        out["neural_quantization"] = record
    return out


def _unquantized_linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)]


def compressed_state_dict(model: nn.Module, sym: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: QuantLinear buffers replaced by their compressed-tensors form.

    Shared (tied) tensors are stored once, under their first name, like ``save_pretrained`` does.
    """
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in quantized.items():
        for key, tensor in layer_tensors(layer, sym).items():
            tensors[f"{name}.{key}"] = tensor
    skip = {f"{name}.{buf}" for name in quantized for buf in ("qweight", "qzeros", "scales", "g_idx")}
    for name, tensor in unique_state_items(model):
        if name not in skip:
            tensors[name] = tensor.detach().cpu().contiguous()
    return tensors


def export_compressed_tensors(
    model: nn.Module,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (quantized by this package) as a compressed-tensors checkpoint directory, atomically.

    The directory holds ``model.safetensors``, ``config.json`` with the compressed-tensors
    ``quantization_config`` (our run's record under ``neural_quantization``), the generation config
    and the tokenizer. Load it with ``AutoModelForCausalLM.from_pretrained(dir)`` (needs the
    ``compressed-tensors`` package) or ``vllm serve dir``.
    """
    from neural_quantization.export.checkpoint import write_model_directory
    from neural_quantization.export.directories import check_output_dir, staged_directory

    target = check_output_dir(output_dir, overwrite)
    ours = getattr(model.config, "quantization_config", None)
    if not ours or "neural_quantization" not in ours:
        raise ExportError("the model has no quantization_config from neural_quantization; quantize it first.")
    record = ours["neural_quantization"]
    config = QuantizationConfig.from_dict(record["config"])
    check_export_config(config)

    tensors = compressed_state_dict(model, config.sym)
    model_config = copy.deepcopy(model.config)
    model_config.quantization_config = quantization_config(config, _unquantized_linear_names(model), record)

    with staged_directory(target) as staging:
        write_model_directory(staging, tensors, model_config, model, tokenizer)
    return target
