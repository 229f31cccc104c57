"""Quantized matmul entry points, kernel backend selection and the ``torch.library`` custom op.

``quant_linear`` is what :class:`~neural_quantization.nn.qlinear.QuantLinear` calls. Backends:

* ``torch``: the reference in ``kernels/reference.py`` (dequantize, then matmul); runs anywhere.
* ``auto`` (default): the fastest kernel for the device and shape: the Triton kernels on CUDA for
  4- and 8-bit weights with fp16/bf16 activations, the reference otherwise (CPU, 2/3 bits, fp32).
* ``triton``: the Triton kernels; on the CPU only under the Triton interpreter
  (``TRITON_INTERPRET=1``, for tests), otherwise an error.
* ``marlin``: a deployment profile (checked where checkpoints are exported); in process it runs
  like ``auto``.

The kernels read the layer in "kernel order" (see ``kernels/layout.py``): a one-time
:func:`prepare` sorts act-order checkpoints by group and detects symmetric zeros. Pass its result as
``layout=`` to keep the call path free of device synchronization (CUDA graphs, torch.compile);
``QuantLinear`` does this by itself on its first eager CUDA forward. Without ``layout`` the layout
is recomputed on every call (correct, but it synchronizes).

The fast path is the custom op ``torch.ops.neural_quantization.gptq_matmul`` with a fake (meta)
implementation, so quantized models trace under ``torch.compile`` and replay in CUDA graphs.
"""

from __future__ import annotations

import math

import torch

from neural_quantization.formats.packing import unpack
from neural_quantization.kernels.reference import quant_linear_reference

BACKENDS = ("auto", "torch", "triton", "marlin")
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _triton_module():
    """The ``kernels.triton`` package, or None where triton is not installed."""
    try:
        from neural_quantization.kernels import triton as triton_kernels
    except ImportError:
        return None
    return triton_kernels


def kernels_available(device_type: str) -> bool:
    module = _triton_module()
    return module is not None and module.available(device_type)


def prepare(qweight, qzeros, scales, g_idx, bits: int, in_features: int):
    """Load-time repack for the kernels: a ``KernelLayout``, or None where only the reference runs.

    Synchronizes with the device: call it eagerly (not inside a graph capture or compile trace).
    """
    if _triton_module() is None:
        return None
    from neural_quantization.kernels.layout import prepare_kernel_layout

    return prepare_kernel_layout(qweight, qzeros, scales, g_idx, bits, in_features)


def _use_kernels(x: torch.Tensor, bits: int, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is unknown; use one of {BACKENDS}")
    if backend == "torch":
        return False
    runnable = bits in (4, 8) and x.dtype in KERNEL_DTYPES
    if backend == "triton":
        if not kernels_available(x.device.type):
            raise RuntimeError(
                "kernel_backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
                "use kernel_backend='auto' to fall back to the reference where it cannot run."
            )
        return runnable
    return runnable and x.device.type == "cuda" and kernels_available("cuda")


# Same parameters as reference.quant_linear_reference on purpose: the reference is this function's oracle.
def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    in_features: int,
    backend: str = "auto",
    layout=None,
) -> torch.Tensor:
    """``y = x W^T + bias`` for x (..., K) with W stored in the GPTQ layout.

    ``layout``: the result of :func:`prepare` for these tensors (kernel-order qweight, act-order
    permutation, group length, symmetry), or None to compute it here.
    """
    if not _use_kernels(x, bits, backend):
        return quant_linear_reference(x, qweight, qzeros, scales, g_idx, bias, bits, in_features)
    if layout is None:
        layout = prepare(qweight, qzeros, scales, g_idx, bits, in_features)
        if layout is None:
            return quant_linear_reference(x, qweight, qzeros, scales, g_idx, bias, bits, in_features)
    return torch.ops.neural_quantization.gptq_matmul(
        x, layout.qweight, qzeros, scales, layout.perm, bias, bits, layout.group_size, in_features,
        layout.symmetric, "kernels",
    )


def prepared_plan(kernel_qweight, qzeros, scales, perm, bias, bits, group_size, in_features, symmetric):
    """The lean eager call path of one prepared layer (``dispatch.PreparedMatmul``), or None without triton.

    Calling it is ``quant_linear_prepared(x, ...)`` with the kernels, minus the custom-op and
    Triton per-call overhead; use it for fp16/bf16 CUDA inputs outside ``torch.compile`` traces.
    """
    if _triton_module() is None:
        return None
    from neural_quantization.kernels.dispatch import PreparedMatmul

    return PreparedMatmul(kernel_qweight, qzeros, scales, perm, bias, bits, group_size, in_features, symmetric)


# Flat tensor arguments on purpose (here, gptq_matmul, dispatch.launch): a torch custom op's schema cannot take a dataclass.
def quant_linear_prepared(
    x: torch.Tensor,
    kernel_qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    symmetric: bool,
    backend: str = "auto",
) -> torch.Tensor:
    """``quant_linear`` on an already prepared layer (the fields of a ``KernelLayout``).

    Nothing here synchronizes or allocates persistent memory, so it is safe inside CUDA graph
    capture and ``torch.compile``. The ``torch`` backend computes the reference on the same layout.
    """
    kernels = _use_kernels(x, bits, backend)
    return torch.ops.neural_quantization.gptq_matmul(
        x, kernel_qweight, qzeros, scales, perm, bias, bits, group_size, in_features, symmetric,
        "kernels" if kernels else "torch",
    )


def reference_kernel_order(x, qweight, qzeros, scales, perm, bias, bits, group_size, in_features):
    """The reference on the kernel layout: ``x[..., perm] @ Wk^T`` with groups ``k // group_size``."""
    num_groups, out_features = scales.shape
    codes = unpack(qweight, bits, in_features, dim=0).float()  # (K, N) in kernel order
    zeros = (unpack(qzeros, bits, out_features, dim=1) + 1).float()
    groups = torch.clamp(torch.arange(in_features, device=qweight.device) // group_size, max=num_groups - 1)
    weight = (scales.float()[groups] * (codes - zeros[groups])).T.to(x.dtype)  # (N, K)
    if perm is not None:
        x = x.index_select(-1, perm.long())
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("neural_quantization::gptq_matmul", mutates_args=())
def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    symmetric: bool,
    backend: str,
) -> torch.Tensor:
    """``y = x[..., perm] @ W^T + bias`` (…, N) with W in kernel order (``kernels/layout.py``).

    ``backend``: "kernels" runs our kernels (Triton, and the CUDA ones where they built) where they
    can run (else the reference), "torch" the reference. The split-K counters the kernels use are internal and restored to
    zero by every launch, so the op is functional.
    """
    out_features = qweight.shape[1]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if backend == "torch" or not kernels_available(x.device.type) or x.dtype not in KERNEL_DTYPES:
        out = reference_kernel_order(x2d, qweight, qzeros, scales, perm, bias, bits, group_size, in_features)
    else:
        from neural_quantization.kernels.dispatch import run

        out = run(x2d, qweight, qzeros, scales, perm, bias, bits, group_size, in_features, symmetric)
    return out.reshape(*lead, out_features)


@gptq_matmul.register_fake
def _gptq_matmul_fake(x, qweight, qzeros, scales, perm, bias, bits, group_size, in_features, symmetric, backend):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def weight_bytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Bytes a kernel must read for one layer: packed codes + fp16 scales + packed zeros."""
    groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    words_k = math.ceil(in_features * bits / 32)
    words_zeros = math.ceil(out_features * bits / 32)
    return 4 * words_k * out_features + 2 * groups * out_features + 4 * groups * words_zeros
