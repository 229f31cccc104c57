"""``QuantLinear``: a drop-in replacement for ``nn.Linear`` holding GPTQ-packed weights.

Its buffers are exactly the tensors of the checkpoint (``qweight``, ``qzeros``, ``scales``,
``g_idx``, optional ``bias``; layout in ``formats/gptq.py``), so ``state_dict()`` of a quantized
model *is* the checkpoint, and loading it back gives bit-identical outputs. The matmul goes through
``kernels.ops.quant_linear`` with the layer's ``kernel_backend``.

Kernel layout (lazy, load-time): the first eager forward on a CUDA device calls
:meth:`QuantLinear.prepare_kernels`, which computes the kernel order once (act-order checkpoints
are sorted by group, see ``kernels/layout.py``) and keeps it in non-persistent buffers, so
``state_dict()`` stays the GPTQ checkpoint. Run one eager forward (or call ``prepare_kernels``)
before capturing CUDA graphs or compiling; loading a state dict drops the prepared layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from neural_quantization.core.quantized_weight import QuantizedWeight, num_groups
from neural_quantization.formats.gptq import from_gptq_tensors, to_gptq_tensors
from neural_quantization.formats.packing import packed_length
from neural_quantization.kernels import ops
from neural_quantization.kernels.reference import dequantize_gptq


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` (out_features, in_features) stored as b-bit GPTQ codes."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        bias_dtype: torch.dtype = torch.float16,
        kernel_backend: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.kernel_backend = kernel_backend
        groups = num_groups(in_features, group_size)
        self.register_buffer(
            "qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "qzeros", torch.zeros(groups, packed_length(out_features, bits), dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_quantized(
        cls, linear: nn.Linear, quantized: QuantizedWeight, kernel_backend: str = "auto"
    ) -> QuantLinear:
        """Build from the ``nn.Linear`` it replaces (for shape, bias, device) and its quantized weight."""
        device = linear.weight.device
        layer = cls(
            linear.in_features,
            linear.out_features,
            quantized.bits,
            quantized.group_size,
            bias=linear.bias is not None,
            bias_dtype=linear.weight.dtype,
            kernel_backend=kernel_backend,
            device=device,
        )
        for name, tensor in to_gptq_tensors(quantized).items():
            getattr(layer, name).copy_(tensor.to(device))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        return from_gptq_tensors(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.group_size, self.in_features
        )

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out_features, in_features) this layer computes with."""
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.in_features, dtype)

    _kernel_layout = None  # (group_size, symmetric, act_order) once prepared, False if unsupported
    _kernel_plan = None  # kernels.ops.prepared_plan: the lean eager call path once prepared
    _shared_input = None  # (SharedInputGroup, index) once fused with its siblings (nn/fused_projections.py)

    def prepare_kernels(self) -> None:
        """Compute the kernels' layout of this layer now (synchronizes; call outside graph capture).

        Act-order layers get a group-sorted copy of ``qweight`` and the permutation of input
        columns as non-persistent buffers (``kernel_qweight``, ``kernel_perm``); other layers read
        the checkpoint tensors directly. Layers the kernels cannot run keep using the reference.
        """
        layout = ops.prepare(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.in_features)
        if layout is None:
            self._kernel_layout = False
            return
        act_order = layout.perm is not None
        if act_order:
            self.register_buffer("kernel_qweight", layout.qweight, persistent=False)
            self.register_buffer("kernel_perm", layout.perm, persistent=False)
        self._kernel_layout = (layout.group_size, layout.symmetric, act_order)
        self._kernel_plan = ops.prepared_plan(
            self.kernel_qweight if act_order else self.qweight, self.qzeros, self.scales,
            self.kernel_perm if act_order else None, self.bias, self.bits, layout.group_size, self.in_features,
            layout.symmetric,
        )

    def reset_kernels(self) -> None:
        """Forget the prepared kernel layout and the CPU path's dense weight (both are rebuilt on use)."""
        self._kernel_layout = None
        self._kernel_plan = None
        for name in ("kernel_qweight", "kernel_perm"):
            self._buffers.pop(name, None)
        self.__dict__.pop("_dense_cache", None)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.reset_kernels()
        if self._shared_input is not None:  # the tensors were copied into the fused layer's columns
            self._shared_input[0].fused.reset_kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._shared_input is not None:  # fused with the layers reading the same input
            group, index = self._shared_input
            return group.forward_member(index, x)
        if not x.is_cuda and not torch.compiler.is_compiling() and self.kernel_backend in ("auto", "torch"):
            # CPU reference path, also for layers prepared for GPU kernels and moved back: the
            # numbers of ops.quant_linear's reference, without unpacking the weight every call.
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self._cached_dense_weight(x.dtype), bias)
        if (
            self._kernel_layout is None
            and x.is_cuda
            and self.kernel_backend != "torch"
            and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()
        ):
            self.prepare_kernels()
        plan = self._kernel_plan
        if (
            plan is not None
            and x.is_cuda
            and x.dtype in ops.KERNEL_DTYPES
            and self.kernel_backend != "torch"
            and plan.scales is self.scales
            and plan.qzeros is self.qzeros
            and plan.bias is self.bias
            and not torch.compiler.is_compiling()
        ):
            return plan(x)  # lean eager / graph-capture path (the custom op below is for torch.compile)
        if self._kernel_layout:
            group_size, symmetric, act_order = self._kernel_layout
            return ops.quant_linear_prepared(
                x,
                self.kernel_qweight if act_order else self.qweight,
                self.qzeros,
                self.scales,
                self.kernel_perm if act_order else None,
                self.bias,
                self.bits,
                group_size,
                self.in_features,
                symmetric,
                self.kernel_backend,
            )
        return ops.quant_linear(
            x,
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            self.bias,
            self.bits,
            self.in_features,
            "torch" if self._kernel_layout is False else self.kernel_backend,
        )

    def _cached_dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in ``dtype``, kept until a buffer changes (CPU evaluation speed).

        Costs the memory of a float weight; the CPU path is for tests and evaluation, not serving.
        """
        key = (dtype, self.qweight.device, self.qweight.data_ptr(), self.qweight._version,
               self.scales.data_ptr(), self.scales._version, self.qzeros._version, self.g_idx._version)
        cache = self.__dict__.get("_dense_cache")
        if cache is None or cache[0] != key:
            cache = (key, self.dequantize_weight(dtype))
            self.__dict__["_dense_cache"] = cache
        return cache[1]

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"group_size={self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {group}, "
            f"bias={self.bias is not None}, kernel_backend={self.kernel_backend}"
        )


def swap_in_quant_linears(
    root: nn.Module, state: dict[str, torch.Tensor], bits: int, group_size: int, kernel_backend: str = "auto",
    widths: Callable[[str], tuple[int, int]] | None = None,
) -> list[str]:
    """Replace each ``nn.Linear`` of ``root`` that ``state`` holds GPTQ tensors for by an empty QuantLinear.

    state: tensors named relative to ``root`` (``mlp.up_proj.qweight`` …). The new layers are on the
    ``meta`` device; ``root.load_state_dict(state, assign=True)`` then gives them the tensors.
    widths: ``name -> (bits, group_size)`` for checkpoints with per-module widths (``dynamic``);
    without it every layer has ``bits`` and ``group_size``. Returns the names of the replaced layers.
    """
    from neural_quantization.nn.modules import set_submodule

    names = [key[: -len(".qweight")] for key in state if key.endswith(".qweight")]
    for name in names:
        linear = root.get_submodule(name)
        bias = state.get(f"{name}.bias")
        layer_bits, layer_group = widths(name) if widths is not None else (bits, group_size)
        set_submodule(
            root,
            name,
            QuantLinear(
                linear.in_features, linear.out_features, layer_bits, layer_group, bias=bias is not None,
                bias_dtype=bias.dtype if bias is not None else torch.float16, kernel_backend=kernel_backend,
                device="meta",
            ),
        )
    return names
