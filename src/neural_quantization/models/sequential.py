"""The layer-by-layer quantization pipeline.

::

    capture the inputs of every decoder layer (hidden states of layer 0; masks, positions,
        rotary tables of each layer) with one cheap forward that stops before any layer runs
    for each decoder layer, on the compute device:
        find its linear layers and the order they run in, grouped by shared input
            (q/k/v, then o, then gate/up, then down for a Llama-style block)
        for each group, in order (true-sequential):
            run the layer on the calibration inputs up to that group, with hooks that fold the
                group's input activations into one Hessian H = 2/n Σ x xᵀ
            solve each linear of the group (GPTQ or RTN) and swap it for a QuantLinear
        run the quantized layer once more: its outputs are the next layer's inputs
        move the layer back to where it came from

With activation-aware scaling (``config.awq``) each decoder layer first gets AWQ's per-input-channel
scales, searched on its calibration inputs and folded into its norms and linears so that it
computes the same function (``models/awq.py``); the groups are then solved as above on the scaled
layer.

With asymmetric calibration (``config.gptaq``) a float copy of each layer runs beside it on a
second stream of activations (the float model's), and each group's hooks also fold the cross term
``C = 2/n Σ (x - x̃)ᵀ x̃`` of the float inputs ``x`` and the quantized model's ``x̃``; each linear is
then solved towards GPTAQ's target (``core/gptq.py``).

Only one decoder layer is on the compute device at a time. Because later groups and later layers
see the outputs of the already-quantized ones, each solve compensates the errors made before it.

Where layers come from and go (memory, or streamed from the checkpoint on disk), the work directory
that makes a run resumable, and where activations wait between layers are ``models/layer_storage.py``.
With several devices each layer is replicated on every device, the calibration batches are dealt
round-robin to the replicas (their Hessians averaged), and a group's linears are solved in parallel.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neural_quantization.config import QuantizationConfig
from neural_quantization.core.gptq import accumulate_cross, accumulate_hessian, asymmetric_target, gptq_quantize
from neural_quantization.core.rtn import rtn_quantize
from neural_quantization.models.awq import scale_block_inputs
from neural_quantization.nn.modules import (
    find_decoder_layers,
    find_linear_layers,
    group_by_shared_input,
    module_device,
    move_all_but,
    set_submodule,
    untie_output_embeddings,
)
from neural_quantization.models.layer_storage import LayerStorage, WorkDir
from neural_quantization.nn.qlinear import QuantLinear, swap_in_quant_linears


@dataclass
class LinearReport:
    """What happened to one linear layer."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    method: str  # "gptq" or "rtn"
    loss: float | None  # tr((W-Q) H (W-Q)^T), None where no Hessian was collected
    damp_percent: float | None
    seconds: float
    note: str = ""
    awq: dict[str, Any] | None = None  # config.awq: the scaling of its input (models/awq.py), else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "method": self.method,
            "loss": self.loss,
            "damp_percent": self.damp_percent,
            "seconds": round(self.seconds, 4),
            "note": self.note,
            "awq": self.awq,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearReport:
        return cls(**{**data, "shape": tuple(data["shape"])})


@dataclass
class LayerInputs:
    """Calibration inputs of one decoder layer: hidden states and keyword arguments, per batch.

    replica: with several devices, the index of the block replica (device) that runs each batch;
    its keyword arguments live on that device. None: one block runs every batch.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    replica: list[int] | None = None

    def replica_of(self, batch: int) -> int:
        return 0 if self.replica is None else self.replica[batch]


class _StopForward(Exception):
    """Raised inside a forward once everything needed from it has been recorded."""


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Run the model's embedding part on each batch and record what every decoder layer receives.

    Each layer's ``forward`` is temporarily replaced by a recorder that stores its keyword
    arguments (attention mask, position ids, rotary tables, …, which differ between e.g. sliding
    and full attention layers) and passes the hidden states through untouched; the last one stops
    the forward. Returns (hidden states entering layer 0 per batch, kwargs per layer per batch).
    """
    first_hidden: list[torch.Tensor] = []
    layer_kwargs: list[list[dict[str, Any]]] = [[] for _ in layers]
    last = len(layers) - 1

    def recorder(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "cache")}
            kwargs["use_cache"] = False
            layer_kwargs[index].append(kwargs)
            if index == 0:
                first_hidden.append(hidden)
            if index == last:
                raise _StopForward
            return hidden

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
    return first_hidden, layer_kwargs


@torch.no_grad()
def linear_groups(block: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """The block's linear layers in execution order, grouped when they read the same input tensor.

    Found by running the block once on a single calibration sequence with hooks that note which
    linear runs when and on which input object: a Llama block gives
    ``[[q_proj, k_proj, v_proj], [o_proj], [gate_proj, up_proj], [down_proj]]``.
    Linears that never run (e.g. unused experts) are appended as a last group.
    """
    groups = group_by_shared_input(
        linears, lambda: block(hidden[:1].to(module_device(block)), **_slice_batch(kwargs, hidden.shape[0]))
    )
    seen = {name for group in groups for name in group}
    unused = [n for n in linears if n not in seen]
    if unused:
        groups.append(unused)
    return groups


def _slice_batch(kwargs: dict, batch: int) -> dict:
    """Take the first sequence of every batched tensor argument (masks, positions)."""

    def first(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch and batch > 1:
            return value[:1]
        if isinstance(value, tuple):
            return tuple(first(v) for v in value)
        if isinstance(value, dict):
            return {k: first(v) for k, v in value.items()}
        return value

    return {k: first(v) for k, v in kwargs.items()}


@torch.no_grad()
def collect_hessians(
    blocks: nn.Module | list[nn.Module],
    linears: dict[str, nn.Linear],
    group: list[str],
    inputs: LayerInputs,
    shared_input: bool,
) -> dict[str, torch.Tensor | None]:
    """Run the block on every calibration batch and return the Hessian of each linear in ``group``.

    With ``shared_input`` (true-sequential groups) one Hessian serves the whole group, and the
    forward stops as soon as the group's first linear has read its input. Otherwise every linear
    gets its own Hessian and the forward stops after the last of them. ``blocks`` may be replicas
    of the block on several devices (``inputs.replica`` says which runs each batch): each folds its
    batches into its own Hessian, and the token-weighted mean of those lands on the first device.
    ``linears`` are the first replica's; the others' are found by name.
    """
    replicas = blocks if isinstance(blocks, list) else [blocks]
    hooked = group[:1] if shared_input else group
    state = [{name: (None, 0) for name in hooked} for _ in replicas]
    remaining: set[str] = set()

    def hook(replica: int, name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            hessian, count = state[replica][name]
            state[replica][name] = accumulate_hessian(hessian, count, args[0])
            remaining.discard(name)
            if not remaining:
                raise _StopForward

        return pre_hook

    handles = [
        (linears[name] if r == 0 else block.get_submodule(name)).register_forward_pre_hook(hook(r, name))
        for r, block in enumerate(replicas)
        for name in hooked
    ]
    devices = [module_device(block) for block in replicas]
    try:
        for batch, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            r = inputs.replica_of(batch)
            remaining.update(hooked)
            try:
                replicas[r](hidden.to(devices[r]), **kwargs)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    merged = {name: _mean_hessian([part[name] for part in state], devices[0]) for name in hooked}
    if shared_input:
        return {name: merged[group[0]] for name in group}
    return merged


def _mean_hessian(parts: list[tuple[torch.Tensor | None, int]], device: torch.device) -> torch.Tensor | None:
    """Token-weighted mean of running-mean Hessians ``(H_d, n_d)``, on ``device``."""
    parts = [(h, n) for h, n in parts if h is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0][0].to(device)
    total = sum(n for _, n in parts)
    merged = torch.zeros_like(parts[0][0], device=device)
    for hessian, count in parts:
        merged.add_(hessian.to(device), alpha=count / total)
    return merged


@torch.no_grad()
def collect_asymmetric_hessians(
    blocks: list[nn.Module],
    float_blocks: list[nn.Module],
    group: list[str],
    inputs: LayerInputs,
    float_hidden: list[torch.Tensor],
    shared_input: bool,
) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
    """Like :func:`collect_hessians`, also with GPTAQ's cross term: ``(H, C)`` per linear of ``group``.

    For each calibration batch the float block runs first on the float model's hidden states
    ``float_hidden`` (the same masks and positions) and its hooks keep what each linear of the group
    reads (``x``); then the block being quantized runs on ``inputs`` and its hooks fold ``x̃`` into
    ``H = 2/n Σ x̃ᵀ x̃`` and ``(x - x̃)`` into ``C = 2/n Σ (x - x̃)ᵀ x̃``. ``blocks`` / ``float_blocks``:
    one replica per device (``inputs.replica`` says which runs each batch); the token-weighted means
    land on the first device.
    """
    hooked = group[:1] if shared_input else group
    state = [{name: (None, None, 0) for name in hooked} for _ in blocks]
    float_inputs: dict[str, torch.Tensor] = {}
    pending: set[str] = set()

    def keep(name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            float_inputs[name] = args[0]
            pending.discard(name)
            if not pending:
                raise _StopForward

        return pre_hook

    def fold(replica: int, name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            hessian, cross, count = state[replica][name]
            cross, _ = accumulate_cross(cross, count, float_inputs.pop(name), args[0])
            hessian, count = accumulate_hessian(hessian, count, args[0])
            state[replica][name] = (hessian, cross, count)
            pending.discard(name)
            if not pending:
                raise _StopForward

        return pre_hook

    handles = [f.get_submodule(name).register_forward_pre_hook(keep(name)) for f in float_blocks for name in hooked]
    handles += [block.get_submodule(name).register_forward_pre_hook(fold(r, name))
                for r, block in enumerate(blocks) for name in hooked]
    devices = [module_device(block) for block in blocks]
    try:
        for batch, (hidden, float_h, kwargs) in enumerate(zip(inputs.hidden, float_hidden, inputs.kwargs)):
            r = inputs.replica_of(batch)
            for module, states in ((float_blocks[r], float_h), (blocks[r], hidden)):
                pending.update(hooked)
                try:
                    module(states.to(devices[r]), **kwargs)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
    for name in hooked:
        hessian = _mean_hessian([(part[name][0], part[name][2]) for part in state], devices[0])
        cross = _mean_hessian([(part[name][1], part[name][2]) for part in state], devices[0])
        pairs[name] = (hessian, cross) if hessian is not None else None
    return {name: pairs[group[0]] for name in group} if shared_input else pairs


@torch.no_grad()
def quantize_linear(
    name: str,
    linear: nn.Linear,
    hessian: torch.Tensor | None,
    config: QuantizationConfig,
    target: torch.Tensor | None = None,
) -> tuple[QuantLinear, LinearReport]:
    """Solve one linear layer and build its replacement; RTN where no Hessian is available.

    target: the weight GPTQ fits instead of ``linear.weight`` (GPTAQ's ``W*``, (N, K) fp32); the
    reported loss is then measured against it.
    """
    start = time.perf_counter()
    note = ""
    method = config.method
    if method == "gptq" and hessian is None:
        method, note = "rtn", "no calibration tokens reached this layer; rounded to nearest instead"
        if config.clip == "hessian":  # no Hessian to weight the clip search by: the plain min/max grid
            config, note = config.replace(method="rtn", clip="minmax"), note + " (min/max grid)"
    if method == "gptq":
        quantized = gptq_quantize(linear.weight if target is None else target, hessian, config)
        if target is not None:
            note = "asymmetric calibration (GPTAQ): fitted to the float model's outputs"
    else:
        quantized = rtn_quantize(linear.weight, config, hessian)
    if config.group_size != -1 and linear.in_features % config.group_size:
        note = (note + "; " if note else "") + (
            f"in_features={linear.in_features} is not a multiple of group_size={config.group_size}: "
            "the last group is shorter; some serving kernels (e.g. Marlin) require divisibility"
        )
    qlinear = QuantLinear.from_quantized(linear, quantized, kernel_backend=config.kernel_backend)
    if linear.weight.device.type == "cuda":
        torch.cuda.synchronize(linear.weight.device)
    report = LinearReport(
        name=name,
        shape=(linear.out_features, linear.in_features),
        method=method,
        loss=quantized.loss,
        damp_percent=quantized.damp_percent,
        seconds=time.perf_counter() - start,
        note=note,
    )
    return qlinear, report


@torch.no_grad()
def run_block(
    blocks: nn.Module | list[nn.Module], inputs: LayerInputs, activations_device: torch.device | None = None
) -> list[torch.Tensor]:
    """The block's output for every calibration batch, computed by the batch's replica and kept
    on ``activations_device`` (default: that replica's device)."""
    replicas = blocks if isinstance(blocks, list) else [blocks]
    devices = [module_device(block) for block in replicas]
    outputs = []
    for batch, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        r = inputs.replica_of(batch)
        out = _layer_output(replicas[r](hidden.to(devices[r]), **kwargs))
        outputs.append(out if activations_device is None else out.to(activations_device))
    return outputs


# A solver for one linear layer: (name, linear, Hessian or None, config) ->
# (layer the calibration runs on through the rest of its block, layer kept in the model, reports).
# The two layers differ only for the nested cascade, which calibrates through its narrow read.
LinearSolver = Callable[
    [str, nn.Linear, "torch.Tensor | None", QuantizationConfig], tuple[nn.Module, nn.Module, list[LinearReport]]
]


def solve_linear(
    name: str,
    linear: nn.Linear,
    hessian: torch.Tensor | None,
    config: QuantizationConfig,
    target: torch.Tensor | None = None,
) -> tuple[nn.Module, nn.Module, list[LinearReport]]:
    """The default :data:`LinearSolver`: GPTQ or RTN; the QuantLinear is kept, and the calibration
    runs on through an ``nn.Linear`` holding its dequantized weight (the same numbers as the
    QuantLinear's reference path, without unpacking per batch or tuning GPU kernels mid-run).
    ``target``: GPTAQ's weight to fit (:func:`quantize_linear`)."""
    qlinear, report = quantize_linear(name, linear, hessian, config, target)
    return dequantized_linear(qlinear, linear.weight.dtype), qlinear, [report]


def dequantized_linear(qlinear: QuantLinear, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` computing with ``qlinear``'s dequantized weight (and bias) in ``dtype``."""
    used = nn.Linear(qlinear.in_features, qlinear.out_features, bias=False, device="meta")
    used.weight = nn.Parameter(qlinear.dequantize_weight(dtype), requires_grad=False)
    if qlinear.bias is not None:
        used.bias = nn.Parameter(qlinear.bias.to(dtype), requires_grad=False)
    return used


@torch.no_grad()
def quantize_decoder_layers(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: QuantizationConfig,
    device: torch.device,
    on_layer_done: Callable[[int, int], None] | None = None,
    solve: LinearSolver = solve_linear,
    storage: LayerStorage | None = None,
    devices: list[torch.device] | None = None,
) -> list[LinearReport]:
    """Quantize every linear layer inside the decoder blocks of ``model``, in place.

    input_ids: (num_samples, seq_len) calibration tokens (unused for RTN, which needs no data).
    Returns the reports of every linear layer, in the order they were quantized;
    ``on_layer_done(i, n)`` is called after each decoder layer (for progress bars). ``solve`` turns
    one linear layer and its Hessian into its replacements (see :data:`LinearSolver`). ``storage``
    says where layers come from and go (streamed weights, work directory for resuming, where
    activations wait; see ``models/layer_storage.py``); by default layers move to ``device`` in turn.
    ``devices``: several devices (``device`` first) share the work: the calibration batches are
    dealt round-robin to replicas of the layer, one per device, whose Hessians are averaged, and
    the linears of a group are solved on different devices at once.
    """
    layers_name, layers = find_decoder_layers(model)
    storage = storage or LayerStorage()
    work_dir = storage.work_dir
    devices = list(devices or [device])
    calibrate = config.method != "rtn"
    asymmetric = calibrate and config.gptaq
    reports: list[LinearReport] = []

    rest_home = model.get_input_embeddings().weight.device
    if calibrate:
        move_all_but(model, layers, device)
        batches = list(input_ids.split(config.calibration_batch_size))
        hidden, layer_kwargs = capture_layer_inputs(model, layers, batches, device)
        replica_of_batch = [b % len(devices) for b in range(len(batches))]
        hidden = [h.to(storage.activations_device or devices[r]) for h, r in zip(hidden, replica_of_batch)]
        float_hidden = list(hidden) if asymmetric else None  # the float model's stream: equal at layer 0

    for index, block in enumerate(layers):
        prefix = f"{layers_name}.{index}."
        if calibrate:
            inputs = LayerInputs(
                hidden=hidden,
                kwargs=[_to_device(k, devices[r]) for k, r in zip(layer_kwargs[index], replica_of_batch)],
                replica=replica_of_batch,
            )
        float_blocks = None  # GPTAQ: an untouched copy of the layer, one replica per device
        if work_dir is not None and work_dir.has_layer(index):
            # Resume: the finished layer from the work directory, replayed for the next layer's inputs.
            if asymmetric:
                float_block = copy.deepcopy(block)
                storage.load(index, prefix, float_block, device)
                float_blocks = replicate(float_block, devices)
            layer_reports = restore_layer(block, work_dir, index, prefix, config, storage, device)
            if calibrate:
                hidden = replay_block(block, inputs, storage.activations_device, devices)
        else:
            storage.load(index, prefix, block, device)
            if calibrate:
                # AWQ's scales first: the float copy (GPTAQ) must read the scaled inputs too
                scaling = scale_block(block, prefix, inputs, config) if config.awq else {}
                float_blocks = replicate(copy.deepcopy(block), devices) if asymmetric else None
                layer_reports, hidden = quantize_block(
                    block, prefix, inputs, config, solve, storage.activations_device, devices,
                    float_blocks=float_blocks, float_hidden=float_hidden,
                )
                for report in layer_reports:
                    report.awq = scaling.get(report.name)
            else:
                layer_reports = []
                for name, linear in find_linear_layers(block).items():
                    qlinear, report = quantize_linear(prefix + name, linear, None, config)
                    set_submodule(block, name, qlinear)
                    layer_reports.append(report)
            if work_dir is not None:
                work_dir.write_layer(index, {prefix + k: v for k, v in block.state_dict().items()},
                                     [r.to_dict() for r in layer_reports])
        if float_blocks is not None:  # the float model's next hidden states, then the float copies go
            float_inputs = LayerInputs(hidden=float_hidden, kwargs=inputs.kwargs, replica=replica_of_batch)
            float_hidden = run_block(float_blocks, float_inputs, storage.activations_device)
            del float_blocks, float_inputs
        reports.extend(layer_reports)
        storage.release(index, block)
        if calibrate:
            layer_kwargs[index] = []  # free this layer's masks and rotary tables
            del inputs
        if on_layer_done:
            on_layer_done(index + 1, len(layers))
    if calibrate and config.quantize_lm_head:
        hidden = [h.to(device) for h in hidden]
        reports.append(quantize_lm_head(model, layers, batches, hidden, config, device))
    if calibrate:
        move_all_but(model, layers, rest_home)
    return reports


@torch.no_grad()
def scale_block(block: nn.Module, prefix: str, inputs: LayerInputs, config: QuantizationConfig) -> dict[str, dict]:
    """Fold AWQ's scales into ``block`` (on one device), searched on its calibration ``inputs``;
    returns what was done to each linear, by full name (see :func:`models.awq.scale_block_inputs`)."""
    device = module_device(block)
    first = inputs.hidden[0]
    probe = (first[:1].to(device), _to_device(_slice_batch(inputs.kwargs[0], first.shape[0]), device))
    batches = ((hidden.to(device), _to_device(kwargs, device)) for hidden, kwargs in zip(inputs.hidden, inputs.kwargs))
    done = scale_block_inputs(block, probe, batches, lambda name: config.for_module(prefix + name))
    return {prefix + name: {**entry, "source": entry["source"] and prefix + entry["source"]}
            for name, entry in done.items()}


def replicate(block: nn.Module, devices: list[torch.device]) -> list[nn.Module]:
    """``block`` (on ``devices[0]``) and one copy of it on each further device."""
    return [block] + [copy.deepcopy(block).to(d) for d in devices[1:]]


@torch.no_grad()
def quantize_block(
    block: nn.Module,
    prefix: str,
    inputs: LayerInputs,
    config: QuantizationConfig,
    solve: LinearSolver,
    activations_device: torch.device | None,
    devices: list[torch.device] | None = None,
    float_blocks: list[nn.Module] | None = None,
    float_hidden: list[torch.Tensor] | None = None,
) -> tuple[list[LinearReport], list[torch.Tensor]]:
    """GPTQ every linear of one decoder block; returns the reports and the block's outputs.

    With several ``devices`` the block is replicated (see :func:`quantize_decoder_layers`); the
    solved layers then replace the originals in every replica, and the kept ones end up in
    ``block`` on the first device. ``float_blocks`` (untouched copies of the block, one per device)
    and ``float_hidden`` (the float model's hidden states entering it) turn on asymmetric
    calibration: each linear is solved towards GPTAQ's target.
    """
    devices = devices or [module_device(block)]
    replicas = replicate(block, devices)
    linears = find_linear_layers(block)
    if config.true_sequential:
        groups = linear_groups(block, linears, inputs.hidden[0], inputs.kwargs[0])
    else:
        groups = [list(linears)]
    reports: list[LinearReport] = []
    kept: dict[str, nn.Module] = {}
    for group in groups:
        targets: dict[str, torch.Tensor | None] = {}
        if float_blocks is None:
            hessians = collect_hessians(replicas, linears, group, inputs, shared_input=config.true_sequential)
        else:
            pairs = collect_asymmetric_hessians(replicas, float_blocks, group, inputs, float_hidden,
                                                shared_input=config.true_sequential)
            hessians = {name: pair[0] if pair is not None else None for name, pair in pairs.items()}
            for name, pair in pairs.items():
                damp = config.for_module(prefix + name).damp_percent
                targets[name] = asymmetric_target(linears[name].weight, *pair, damp) if pair is not None else None
            del pairs
        solved = _solve_group(prefix, group, replicas, hessians, config, solve, targets)
        for name, (used, kept[name], linear_reports) in zip(group, solved):
            for replica in replicas:
                set_submodule(replica, name, _on_device(used, module_device(replica)))
            reports.extend(linear_reports)
        del hessians
    outputs = run_block(replicas, inputs, activations_device)
    for name, layer in kept.items():
        set_submodule(block, name, layer.to(devices[0]))
    return reports, outputs


def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` itself when it is on ``device``, else a copy there."""
    current = next(itertools.chain(module.parameters(), module.buffers())).device
    return module if current == device else copy.deepcopy(module).to(device)


def _solve_group(
    prefix: str,
    group: list[str],
    replicas: list[nn.Module],
    hessians: dict[str, torch.Tensor | None],
    config: QuantizationConfig,
    solve: LinearSolver,
    targets: dict[str, torch.Tensor | None] | None = None,
) -> list[tuple[nn.Module, nn.Module, list[LinearReport]]]:
    """Solve the linears of one group; with several replicas (and the default solver), linear ``j``
    on replica ``j mod n``, one thread per device. Results come back in ``group`` order.
    ``targets``: GPTAQ's weights to fit, by name (see :func:`quantize_linear`)."""

    targets = targets or {}

    def extra(name: str) -> dict[str, torch.Tensor]:  # the solver's keyword for a GPTAQ target, if any
        return {"target": targets[name]} if targets.get(name) is not None else {}

    def solve_on(j: int, name: str) -> tuple[nn.Module, nn.Module, list[LinearReport]]:
        replica = replicas[j % len(replicas)]
        device = module_device(replica)
        hessian = hessians[name].to(device) if hessians[name] is not None else None
        target = {k: v.to(device) for k, v in extra(name).items()}
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return solve(prefix + name, replica.get_submodule(name), hessian, config.for_module(prefix + name), **target)

    if len(replicas) == 1 or len(group) == 1 or solve is not solve_linear:
        return [solve(prefix + name, replicas[0].get_submodule(name), hessians[name], config.for_module(prefix + name),
                      **extra(name)) for name in group]
    for replica in replicas:
        _warm_up_solver(module_device(replica), config)
    with ThreadPoolExecutor(max_workers=len(replicas)) as pool:
        return list(pool.map(solve_on, range(len(group)), group))


def _width(config: QuantizationConfig) -> tuple[int, int]:
    return config.bits, config.group_size


_WARM_SOLVERS: set[tuple] = set()


def _warm_up_solver(device: torch.device, config: QuantizationConfig) -> None:
    """Run one tiny solve on ``device`` first, in this thread: torch's lazily initialised linear
    algebra backends and Triton's per-device kernel compilation are not safe to start from two
    threads at once."""
    key = (str(device), config.bits, config.block_size, config.group_size, config.sym)
    if key in _WARM_SOLVERS:
        return
    k = config.block_size if config.group_size == -1 else max(config.block_size, config.group_size)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        gptq_quantize(torch.randn(16, k, device=device), torch.eye(k, device=device), config)
    _WARM_SOLVERS.add(key)


def restore_layer(
    block: nn.Module,
    work_dir: WorkDir,
    index: int,
    prefix: str,
    config: QuantizationConfig,
    storage: LayerStorage,
    device: torch.device,
) -> list[LinearReport]:
    """Load finished layer ``index`` from the work directory into ``block`` (QuantLinear layers), on ``device``."""
    tensors, report_dicts = work_dir.read_layer(index)
    state = {name[len(prefix) :]: tensor for name, tensor in tensors.items()}
    swap_in_quant_linears(block, state, config.bits, config.group_size, config.kernel_backend,
                          widths=lambda name: _width(config.for_module(prefix + name)))
    storage.restore(index, block, state, device)
    return [LinearReport.from_dict(r) for r in report_dicts]


@torch.no_grad()
def replay_block(
    block: nn.Module,
    inputs: LayerInputs,
    activations_device: torch.device | None,
    devices: list[torch.device] | None = None,
) -> list[torch.Tensor]:
    """The outputs of a restored block, computed as the original run computed them (dequantized weights)."""
    quantized = {name: m for name, m in block.named_modules() if isinstance(m, QuantLinear)}
    dtype = inputs.hidden[0].dtype  # the original run dequantized to the layer's dtype, as here
    for name, qlinear in quantized.items():
        set_submodule(block, name, dequantized_linear(qlinear, dtype))
    try:
        return run_block(replicate(block, devices or [module_device(block)]), inputs, activations_device)
    finally:
        for name, qlinear in quantized.items():
            set_submodule(block, name, qlinear)


@torch.no_grad()
def quantize_lm_head(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: list[torch.Tensor],
    final_hidden: list[torch.Tensor],
    config: QuantizationConfig,
    device: torch.device,
) -> LinearReport:
    """Quantize the output projection on the (quantized) model's final hidden states.

    The final norm sits between the last decoder layer and ``lm_head`` and differs by architecture,
    so instead of finding it, the model's own forward runs with every decoder layer replaced by a
    function that returns the stored final hidden states: the model then applies its final norm and
    the hook on ``lm_head`` collects the Hessian. A tied ``lm_head`` is untied (the embedding keeps
    its float weights) and ``tie_word_embeddings`` is set to False in the config.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"cannot quantize lm_head of type {type(head).__name__}; leave quantize_lm_head off.")
    head_name = next(name for name, module in model.named_modules() if module is head)
    hessian, count = None, 0

    def pre_hook(module: nn.Module, args: tuple) -> None:
        nonlocal hessian, count
        hessian, count = accumulate_hessian(hessian, count, args[0])
        raise _StopForward

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        for batch, hidden in zip(batches, final_hidden):
            for layer in layers:
                layer.forward = lambda *args, _h=hidden, **kwargs: _h
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for layer in layers:
            layer.__dict__.pop("forward", None)
    untie_output_embeddings(model)
    qlinear, report = quantize_linear(head_name, head, hessian, config)
    set_submodule(model, head_name, qlinear)
    return report
