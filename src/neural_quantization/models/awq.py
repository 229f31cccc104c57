"""Fold AWQ's activation-aware scales into a decoder layer, so it computes the same function.

``core/awq.py`` chooses, for a group of linears that read one input ``X``, per-input-channel scales
``s`` (K,) with which the readers are rounded as ``Q(W diag(s))`` and fed ``X / s``. This module
makes that so inside the model, in place, before the layer is solved:

* readers:                      ``W ← W diag(s)``
* and ``1/s`` folded into what produced ``X``, either
    - a norm ``y = n(x) · (c + g) + b`` (``c`` = 1 for Gemma's ``1 + g`` norms, else 0):
      ``g ← (c + g) / s - c``, ``b ← b / s``  (q/k/v after the attention norm; gate/up after the
      MLP norm), or
    - the linear before it, when what lies between is linear in each channel (attention's weighted
      sum of values; ``act(gate) · up``): its output rows ``W_p ← diag(1/s) W_p``, ``b_p ← b_p / s``
      (o_proj reading v_proj's values where the head counts match; down_proj reading up_proj's).

The scaled layer is an ordinary layer of the same architecture (its GPTQ checkpoint needs nothing
new from any loader) that computes, in exact arithmetic, the same function as before.

Nothing here is looked up by module name. The groups are found by running the block once
(``nn.modules.group_by_shared_input``), the module that produced each group's input by tracing
tensors on the same run, and whether ``1/s`` may be folded into a candidate is decided by
experiment: on a float32 copy of the block, random positive scales (0.37 to 2.7) are folded in
and the block's output must not move (:data:`MAX_FOLD_CHANGE`). The gate projection (behind a
SiLU), the query projection (behind a softmax) or v_proj under grouped-query attention (one value
head shared by several output heads, so the channels do not match) fail that test; a group with no
candidate that passes is left unscaled, and its report says why. After the real scales are folded,
the copy's output is compared with the original once more.

The scales are searched in reverse execution order (down, gate/up, o, q/k/v): a fold changes only
its own group's input and the output rows of its source, so every search sees its readers' weights
as they will be solved, and the statistics of every group's input can be collected in one run of
the block before anything changes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neural_quantization.config import QuantizationConfig
from neural_quantization.core.awq import accumulate_abs_mean, search_scales
from neural_quantization.core.gptq import accumulate_hessian
from neural_quantization.models.rotation import is_norm, norm_offset, tensor_key
from neural_quantization.nn.modules import find_linear_layers, group_by_shared_input

#: largest relative change of the block's output (fp32) accepted from a fold; exact folds give ~1e-6
MAX_FOLD_CHANGE = 1e-4


class AwqError(RuntimeError):
    """Folding the scales changed what the layer computes (a bug, or an architecture this does not know)."""


@dataclass
class Fold:
    """Where the scales of one group of linears go.

    readers: the linears reading the group's input (names relative to the block).
    source: the norm or linear whose output is that input and absorbs ``1/s``; None when none can.
    kind: "norm" or "linear" (None without a source). offset: ``c`` of a norm ``(c + g)``.
    note: why the group has no source.
    """

    readers: list[str]
    source: str | None = None
    kind: str | None = None
    offset: float = 0.0
    note: str = ""


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor inside (tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _change(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).abs().max() / reference.abs().max().clamp(min=1e-12))


@torch.no_grad()
def apply_fold(block: nn.Module, fold: Fold, scales: torch.Tensor) -> None:
    """Multiply the readers' columns by ``scales`` (K,) and divide the source's output by them, in
    place (float64 arithmetic, stored back in each tensor's dtype)."""
    modules = dict(block.named_modules())

    def transform(tensor: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        s = scales.to(tensor.device, torch.float64)
        tensor.copy_(fn(tensor.detach().double(), s).to(tensor.dtype))

    for name in fold.readers:
        transform(modules[name].weight, lambda w, s: w * s)  # (N, K) · (K,)
    source = modules[fold.source]
    if fold.kind == "norm":
        transform(source.weight, lambda g, s: (g + fold.offset) / s - fold.offset)
    else:
        transform(source.weight, lambda w, s: w / s[:, None])  # output rows
    if getattr(source, "bias", None) is not None:
        transform(source.bias, lambda b, s: b / s)


def _fold_tensors(block: nn.Module, fold: Fold) -> list[torch.Tensor]:
    modules = dict(block.named_modules())
    owners = [modules[name] for name in fold.readers] + [modules[fold.source]]
    return [t for m in owners for t in (m.weight, getattr(m, "bias", None)) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def find_folds(
    block: nn.Module,
    check: nn.Module,
    probe: tuple[torch.Tensor, dict[str, Any]],
    reference: torch.Tensor,
) -> list[Fold]:
    """One :class:`Fold` per group of linears of ``block`` reading one input, in execution order.

    probe: ``(hidden, kwargs)`` for one calibration sequence on ``block``'s device. ``check`` is a
    float32 copy of the block and ``reference`` its output on the probe (cast to float32); each
    candidate source is tried on ``check`` with random scales and kept only where the output stays
    within :data:`MAX_FOLD_CHANGE` (see the module docstring). ``check`` is left as it was.
    """
    hidden, kwargs = probe
    linears = find_linear_layers(block)
    groups = group_by_shared_input(linears, lambda: block(hidden, **kwargs))
    names = {module: name for name, module in block.named_modules()}
    produced: dict[tuple, str] = {}
    read: dict[str, tuple] = {}
    kept: list[torch.Tensor] = []  # every traced tensor stays alive, so no memory address is reused

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        out = _output(output)
        if isinstance(out, torch.Tensor):
            produced.setdefault(tensor_key(out), names[module])
            kept.append(out)

    def pre(module: nn.Module, args: tuple) -> None:
        read.setdefault(names[module], tensor_key(args[0]))
        kept.append(args[0])

    leaves = [m for m in block.modules() if not list(m.children())]
    handles = [m.register_forward_hook(post) for m in leaves]
    handles += [linears[group[0]].register_forward_pre_hook(pre) for group in groups]
    try:
        block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    kept.clear()

    check_modules = dict(check.named_modules())
    check_args = (_cast(hidden, torch.float32), _cast(kwargs, torch.float32))
    generator = torch.Generator().manual_seed(0)
    folds = []
    for index, group in enumerate(groups):
        width = linears[group[0]].in_features
        candidates = []
        producer = produced.get(read.get(group[0]))
        if producer is not None and is_norm(check_modules[producer], width):
            candidates.append((producer, "norm"))
        earlier = [name for g in groups[:index] for name in g if linears[name].out_features == width]
        candidates += [(name, "linear") for name in reversed(earlier)]  # the nearest first
        fold = Fold(readers=list(group), note=f"no norm or linear before {group[0]} whose output can take 1/s "
                                              f"(tried: {', '.join(c for c, _ in candidates) or 'none'})")
        for source, kind in candidates:
            trial = Fold(readers=list(group), source=source, kind=kind,
                         offset=norm_offset(check_modules[source]) if kind == "norm" else 0.0)
            saved = [t.clone() for t in _fold_tensors(check, trial)]
            apply_fold(check, trial, torch.empty(width).uniform_(-1, 1, generator=generator).exp())
            change = _change(_output(check(check_args[0], **check_args[1])), reference)
            for tensor, original in zip(_fold_tensors(check, trial), saved):
                tensor.copy_(original)
            if change < MAX_FOLD_CHANGE:
                fold = trial
                break
        folds.append(fold)
    return folds


@torch.no_grad()
def collect_input_statistics(
    block: nn.Module, readers: list[str], batches: Iterable[tuple[torch.Tensor, dict[str, Any]]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``block`` on every calibration batch ``(hidden, kwargs)`` and return, for each linear
    named in ``readers``, ``(H, m)``: the Hessian ``2/n Σ x xᵀ`` (K, K) and mean magnitude
    ``mean |x|`` (K,) of its input, both fp32."""
    state: dict[str, list] = {name: [None, 0, None, 0] for name in readers}

    def hook(name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            entry = state[name]
            entry[0], entry[1] = accumulate_hessian(entry[0], entry[1], args[0])
            entry[2], entry[3] = accumulate_abs_mean(entry[2], entry[3], args[0])

        return pre_hook

    handles = [block.get_submodule(name).register_forward_pre_hook(hook(name)) for name in readers]
    try:
        for hidden, kwargs in batches:
            block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (entry[0], entry[2]) for name, entry in state.items() if entry[0] is not None}


@torch.no_grad()
def scale_block_inputs(
    block: nn.Module,
    probe: tuple[torch.Tensor, dict[str, Any]],
    batches: Iterable[tuple[torch.Tensor, dict[str, Any]]],
    config_of: Callable[[str], QuantizationConfig],
) -> dict[str, dict[str, Any]]:
    """Search AWQ's scales for every group of linears in ``block`` and fold them in, in place.

    probe: ``(hidden, kwargs)`` of one calibration sequence, on the block's device (finds the
    groups and checks the folds); batches: every calibration batch ``(hidden, kwargs)`` on the
    block's device (the statistics); config_of: the grid each linear (name relative to the block)
    is quantized on. Returns, per linear, what was done: ``alpha``, ``source`` (the module that
    absorbed ``1/s``), ``rtn_error`` and ``rtn_error_unscaled`` (core/awq.py's objective for its
    group with and without the scales), or ``alpha`` None and a ``note`` saying why not.
    Raises :class:`AwqError` if the folded block's output moved (the model in memory is then no
    longer the original: reload it and quantize without --awq).
    """
    hidden, kwargs = probe
    check = copy.deepcopy(block).float()
    check_args = (_cast(hidden, torch.float32), _cast(kwargs, torch.float32))
    reference = _output(check(check_args[0], **check_args[1]))
    folds = find_folds(block, check, probe, reference)
    statistics = collect_input_statistics(block, [f.readers[0] for f in folds if f.source], batches)
    linears = find_linear_layers(block)
    report: dict[str, dict[str, Any]] = {}
    for fold in reversed(folds):
        if fold.source is None or fold.readers[0] not in statistics:
            note = fold.note or "no calibration tokens reached this group"
            report.update({name: {"alpha": None, "source": None, "note": note} for name in fold.readers})
            continue
        hessian, magnitude = statistics.pop(fold.readers[0])
        found = search_scales([linears[name].weight for name in fold.readers],
                              [config_of(name) for name in fold.readers], hessian, magnitude)
        if found.alpha:
            apply_fold(block, fold, found.scales)
            apply_fold(check, fold, found.scales)
        entry = {"alpha": found.alpha, "source": fold.source, "rtn_error": found.error,
                 "rtn_error_unscaled": found.error_unscaled}
        report.update({name: dict(entry) for name in fold.readers})
        del hessian, magnitude
    change = _change(_output(check(check_args[0], **check_args[1])), reference)
    if not change < MAX_FOLD_CHANGE:
        raise AwqError(f"after folding AWQ's scales the layer's output changed by {change:.2e} (relative); this "
                       "architecture routes a scaled tensor somewhere the fold does not reach. The model in memory "
                       "is no longer the original: reload it and quantize without --awq.")
    return report
