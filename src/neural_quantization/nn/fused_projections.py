"""Projections that read the same input (q/k/v, gate/up) run as one matmul: load-time fusion.

A decoder block computes ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` from one tensor ``h`` and
``gate_proj(x)``, ``up_proj(x)`` from one ``x``. Run separately, each is a kernel launch that
reads its input again, and at decode batch sizes a small layer costs mostly latency (the k and v
projections of a 7B model have 1024 columns each). :func:`fuse_projections` concatenates the
GPTQ tensors of such a group along the output dimension, once::

    qweight (K/8, N1 + N2 + …)   scales (G, N1 + …)   qzeros (G, (N1 + …)·b/32)   bias (N1 + …)

and gives every member its columns back as views of the fused tensors: the weights exist once,
and ``state_dict()`` holds the same tensors under the same names as before (saving copies the
views out). The members share ``g_idx``: a group is fused only if every member has the same one
(true for linears quantized from one input's Hessian, act-order included).

At run time the first member called with an input computes the fused product and keeps it; each
member called after it *with the same tensor object* returns its columns of that product (views:
no copy, no launch). A member called with any other input computes the fused product for that
input and slices it, which is correct but wasteful, so only linears seen reading the same tensor
are grouped: :func:`fuse_projections` finds them with one probe forward of one token, by the same
rule as the quantizer's groups of linears that share an input (``nn/modules.py:
group_by_shared_input``).

Limits: in eager mode a member whose input was modified in place since the fused product was
computed recomputes it (the tensor's version counter); inside ``torch.compile`` the sharing is
decided at trace time by tensor identity. Moving the model (``.to``) or loading a state dict with
``assign=True`` replaces the members' buffers: the group then dissolves at the next eager forward
and every member runs alone; call :func:`fuse_projections` again to refuse them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neural_quantization.nn.modules import group_by_shared_input
from neural_quantization.nn.qlinear import QuantLinear

#: the buffers a member exposes as column views of the fused tensors
_COLUMN_BUFFERS = ("qweight", "qzeros", "scales", "bias")


class SharedInputGroup:
    """QuantLinears that read one input, computed by one fused QuantLinear (``self.fused``).

    The fused layer is not a submodule of the model (the members keep the checkpoint's names); it
    owns the concatenated tensors, the members' buffers are views of them. ``bounds[i]`` is
    member ``i``'s column range in the fused output.
    """

    def __init__(self, members: list[QuantLinear]) -> None:
        first = members[0]
        total = sum(member.out_features for member in members)
        fused = QuantLinear(first.in_features, total, first.bits, first.group_size, bias=first.bias is not None,
                            bias_dtype=first.bias.dtype if first.bias is not None else torch.float16,
                            kernel_backend=first.kernel_backend, device="meta")
        fused.qweight = torch.cat([member.qweight for member in members], dim=1)
        fused.qzeros = torch.cat([member.qzeros for member in members], dim=1)
        fused.scales = torch.cat([member.scales for member in members], dim=1)
        fused.g_idx = first.g_idx
        if first.bias is not None:
            fused.bias = torch.cat([member.bias for member in members])
        self.fused = fused
        self.members = members
        self.bounds: list[tuple[int, int]] = []
        self.views: list[dict[str, torch.Tensor]] = []
        per_word = 32 // first.bits
        start = 0
        for index, member in enumerate(members):
            stop = start + member.out_features
            views = {
                "qweight": fused.qweight[:, start:stop],
                "qzeros": fused.qzeros[:, start // per_word:stop // per_word],
                "scales": fused.scales[:, start:stop],
            }
            if fused.bias is not None:
                views["bias"] = fused.bias[start:stop]
            for name, view in views.items():
                setattr(member, name, view)
            member.reset_kernels()
            member._shared_input = (self, index)
            self.bounds.append((start, stop))
            self.views.append(views)
            start = stop
        self._pending: list[Any] | None = None  # [input, fused output, input version, members served]

    def intact(self, index: int) -> bool:
        """Whether member ``index`` still holds the views it was given (not moved or reassigned).

        Its columns of the fused product are right exactly then, whatever happened to the others.
        """
        member = self.members[index]
        return all(member._buffers.get(name) is view for name, view in self.views[index].items())

    def dissolve(self) -> None:
        """Every member runs alone again, on contiguous copies of its own columns."""
        for member in self.members:
            for name in _COLUMN_BUFFERS:
                tensor = member._buffers.get(name)
                if tensor is not None and not tensor.is_contiguous():
                    setattr(member, name, tensor.contiguous())
            member._shared_input = None
            member.reset_kernels()
        self._pending = None

    def forward_member(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s output for ``x``: its columns of the fused product of ``x``."""
        compiling = torch.compiler.is_compiling()
        if not compiling and not self.intact(index):
            self.dissolve()
            return self.members[index](x)
        pending = self._pending
        if pending is None or pending[0] is not x or (not compiling and pending[2] != x._version):
            pending = [x, self.fused(x), None if compiling else x._version, 0]
            self._pending = pending
        start, stop = self.bounds[index]
        out = pending[1][..., start:stop]
        pending[3] += 1
        if pending[3] >= len(self.members):
            self._pending = None  # every member had its columns: drop the references
        return out


def fusable(members: list[QuantLinear]) -> bool:
    first = members[0]
    per_word = 32 // first.bits
    return all(
        member.in_features == first.in_features and member.bits == first.bits
        and member.group_size == first.group_size and member.kernel_backend == first.kernel_backend
        and member.out_features % per_word == 0
        and member.qweight.device == first.qweight.device and member.scales.dtype == first.scales.dtype
        and (member.bias is None) == (first.bias is None)
        and (member.bias is None or member.bias.dtype == first.bias.dtype)
        and member._shared_input is None
        and torch.equal(member.g_idx, first.g_idx)
        for member in members
    )


def shared_input_groups(model: nn.Module, probe_inputs: dict[str, Any] | None = None) -> list[list[str]]:
    """Names of the QuantLinears that read the same tensor, in call order (groups of two or more).

    One forward of ``probe_inputs`` (default: one token, id 0, on the layers' device), grouped by
    ``models.discovery.group_by_shared_input``; the layers compute with the reference during the
    probe (no kernel preparation or tuning for shapes that fusion replaces).
    """
    layers = {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    if not layers:
        return []
    device = next(iter(layers.values())).qweight.device
    inputs = probe_inputs or {"input_ids": torch.zeros(1, 1, dtype=torch.long, device=device)}
    backends = {name: layer.kernel_backend for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.kernel_backend = "torch"
        with torch.no_grad():
            groups = group_by_shared_input(layers, lambda: model(**inputs))
    finally:
        for name, layer in layers.items():
            layer.kernel_backend = backends[name]
    return [group for group in groups if len(group) > 1]


@torch.no_grad()
def fuse_projections(model: nn.Module, probe_inputs: dict[str, Any] | None = None) -> list[list[str]]:
    """Fuse every group of QuantLinears that read the same input (see the module docstring).

    Returns the fused groups' names (e.g. ``[[…q_proj, …k_proj, …v_proj], [… gate_proj, … up_proj], …]``).
    Groups whose members differ in width, group size, ``g_idx``, device, bias or dtype, or whose
    widths do not fill whole ``qzeros`` words, are left as they are. Run it before the first
    forward that prepares kernels (or capture/compile after it).
    """
    fused = []
    for names in shared_input_groups(model, probe_inputs):
        members = [model.get_submodule(name) for name in names]
        if fusable(members):
            SharedInputGroup(members)
            fused.append(names)
    return fused
