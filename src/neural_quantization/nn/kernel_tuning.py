"""The kernel shapes of a quantized model, and tuning them ahead (``neural-quantize tune MODEL_DIR``).

Every :class:`QuantLinear` runs the kernels at its own shape; where :func:`fuse_projections` fuses
q/k/v and gate/up (``neural_quantization.generate`` does on a GPU), the fused layer runs at the
concatenated width instead. :func:`model_layer_shapes` lists both, so a model tuned ahead is fast
whether it runs in plain transformers (separate projections) or through ``generate`` (fused).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from neural_quantization.kernels import tuning
from neural_quantization.kernels.layout import groups_ascending, supports, zeros_symmetric
from neural_quantization.nn.fused_projections import fusable, shared_input_groups
from neural_quantization.nn.qlinear import QuantLinear


def layer_shape(layer: QuantLinear) -> tuning.LayerShape:
    """The kernel shape of one layer: sizes, bits, group, symmetry (every stored zero is the
    midpoint) and act-order (``g_idx`` not ascending), as ``kernels/layout.py`` decides them."""
    return tuning.LayerShape(layer.in_features, layer.out_features, layer.bits, layer.group_size,
                             zeros_symmetric(layer.qzeros, layer.bits, layer.out_features),
                             not groups_ascending(layer.g_idx))


def model_layer_shapes(model: nn.Module, fused: bool = True) -> list[tuning.LayerShape]:
    """The distinct kernel shapes of ``model``'s QuantLinears (4- and 8-bit: those the kernels run),
    and, with ``fused``, the shapes of the groups :func:`fuse_projections` would fuse."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    shapes = {name: layer_shape(layer) for name, layer in layers.items() if supports(layer.bits)}
    found = list(dict.fromkeys(shapes.values()))
    if fused and shapes:
        for names in shared_input_groups(model):
            members = [layers[name] for name in names]
            if all(name in shapes for name in names) and fusable(members):
                first = shapes[names[0]]
                width = sum(member.out_features for member in members)
                found.append(tuning.LayerShape(first.in_features, width, first.bits, first.group_size,
                                               all(shapes[name].symmetric for name in names), first.act_order))
    return list(dict.fromkeys(found))


def tune_model(model: nn.Module, token_counts: Sequence[int] = tuning.DEFAULT_TOKEN_COUNTS,
               dtypes: Sequence[torch.dtype] = (torch.float16,), fused: bool = True, retune: bool = False,
               device: str | torch.device = "cuda", log: Callable[[str], None] | None = None) -> list[dict]:
    """Tune the kernels for every shape of ``model`` at these token counts and save the choices
    (``kernels/tuning.tune_shapes``; returns its rows)."""
    shapes = model_layer_shapes(model, fused)
    if not shapes:
        raise ValueError("the model has no 4- or 8-bit quantized linear layers for the kernels to run; "
                         "pass a checkpoint written by `neural-quantize quantize` (or GPTQModel / llm-compressor)")
    return tuning.tune_shapes(shapes, token_counts, dtypes, device, retune, log)
