"""The GPTQ tensor layout of one quantized linear layer (``checkpoint_format: "gptq"``).

For a linear layer with ``K = in_features``, ``N = out_features``, ``b = bits``,
``G = ceil(K / group_size)`` groups (1 for per-channel), each layer stores:

=========  =======  ===========================  =================================================
name       dtype    shape                        content
=========  =======  ===========================  =================================================
qweight    int32    (packed_length(K, b), N)     codes ``q[k, n]`` packed along K (the input dim):
                                                 for 4 bits, row ``r`` holds k = 8r … 8r+7,
                                                 k = 8r + j in bits 4j…4j+3 (see packing.py)
qzeros     int32    (G, packed_length(N, b))     ``zero[g, n] - 1`` packed along N (the output dim)
scales     float16  (G, N)                       ``scale[g, n]``
g_idx      int32    (K,)                         group of input column k (``k // group_size``
                                                 unless act-order reordered the groups)
bias       float16  (N,)                         only where the original layer had a bias
=========  =======  ===========================  =================================================

(:func:`gptq_tensor_shapes` gives these shapes and dtypes for a layer, :func:`gptq_layer_bytes`
their total size) and the weight it represents is

    W[n, k] = scales[g_idx[k], n] · (q[k, n] - (stored_zero[g_idx[k], n] + 1))

**Zero-point convention.** GPTQ checkpoints in the original ``gptq`` format (AutoGPTQ, GPTQModel
with ``checkpoint_format: gptq``, what vLLM's and transformers' GPTQ loaders read) store the zero
point *minus one* and add the one back when loading. Symmetric 4-bit groups therefore store 7 in
every nibble (``qzeros`` words of ``0x77777777``) and dequantize with zero 8. Our grid keeps every
zero ≥ 1 (see ``core/grid.py``) so ``zero - 1`` never wraps.

**``gptq_v2``** (GPTQModel's own format) stores the zero point itself, without the minus one:
``W = scales · (q - stored_zero)``. Asymmetric checkpoints are written in it
(:func:`checkpoint_format`): GPTQModel refuses asymmetric ``gptq`` (v1) checkpoints that it did not
produce, while it, vLLM (``checkpoint_format: gptq_v2``, since late 2025) and transformers (through
GPTQModel) read v2 natively. Symmetric checkpoints stay v1, which every GPTQ reader knows.
In memory (``QuantLinear``, the kernels) the tensors are always v1: :func:`zeros_from_v2` and
:func:`zeros_to_v2` convert ``qzeros`` at load and save.
"""

from __future__ import annotations

import math

import torch

from neural_quantization.config import dynamic_override
from neural_quantization.core.quantized_weight import QuantizedWeight, num_groups
from neural_quantization.formats.packing import pack, packed_length, unpack

TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def module_width(quant: dict, name: str) -> tuple[int, int]:
    """``(bits, group_size)`` of module ``name`` in a checkpoint's ``quantization_config``: the
    top-level values, or the first matching ``dynamic`` entry's (GPTQModel's and vLLM's per-module
    overrides, :func:`neural_quantization.config.dynamic_override`)."""
    override = dynamic_override(quant.get("dynamic"), name)
    return override.get("bits", quant["bits"]), override.get("group_size", quant.get("group_size", -1))


def checkpoint_format(sym: bool) -> str:
    """The ``checkpoint_format`` we write: ``gptq`` (v1) for symmetric grids, ``gptq_v2`` for
    asymmetric ones (see the module docstring for which readers need which)."""
    return "gptq" if sym else "gptq_v2"


def zeros_to_v2(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """v1 ``qzeros`` (zero − 1 packed along N) → v2 (the zero itself). Needs zeros ≤ 2**bits − 1,
    which a v1 tensor always holds (its stored values are ≤ 2**bits − 1 − 1 for our grids)."""
    zeros = unpack(qzeros, bits, out_features, dim=1) + 1
    if int(zeros.max()) > (1 << bits) - 1:
        raise ValueError(f"a v1 zero point of {int(zeros.max())} does not fit {bits} bits in gptq_v2")
    return pack(zeros, bits, dim=1)


def zeros_from_v2(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """v2 ``qzeros`` (the zero itself) → the v1 tensors ``QuantLinear`` and the kernels read.

    Raises ValueError for a zero point of 0, which v1 cannot hold (it would be stored as −1 and
    read back as 2**bits); our grids never produce one."""
    zeros = unpack(qzeros, bits, out_features, dim=1)
    if int(zeros.min()) < 1:
        count = int((zeros < 1).sum())
        raise ValueError(f"{count} zero points are 0; the v1 layout our kernels read needs zero points >= 1")
    return pack(zeros - 1, bits, dim=1)


def gptq_tensor_shapes(
    bits: int, group_size: int, in_features: int, out_features: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of the four GPTQ tensors of one (K in, N out) layer (table above).

    Padding included: the packed dimensions hold whole words, so for 3 bits ``qweight`` has
    ``3 · ceil(K / 32)`` rows (K = 40 -> 6 rows, not ``ceil(3 · 40 / 32)`` = 4).
    """
    k, n = in_features, out_features
    groups = num_groups(k, group_size)
    return {
        "qweight": ((packed_length(k, bits), n), torch.int32),
        "qzeros": ((groups, packed_length(n, bits)), torch.int32),
        "scales": ((groups, n), torch.float16),
        "g_idx": ((k,), torch.int32),
    }


def gptq_layer_bytes(bits: int, group_size: int, in_features: int, out_features: int) -> int:
    """Bytes of one packed GPTQ layer: qweight + qzeros + scales + g_idx (no bias).

    ``4 · packed_length(K, b) · N + 4 · G · packed_length(N, b) + 2 · G · N + 4 · K``; e.g. a
    4096 × 4096 layer at 4 bits, group 128 (G = 32): 8,388,608 + 65,536 + 262,144 + 16,384 bytes.
    The one owner of this count: the pre-flight estimate and the deployment report use it.
    """
    shapes = gptq_tensor_shapes(bits, group_size, in_features, out_features)
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())


def to_gptq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Pack a :class:`QuantizedWeight` into the four GPTQ tensors (on the device of its codes)."""
    mask = (1 << qw.bits) - 1
    if int(qw.zeros.min()) < 1:
        raise ValueError("GPTQ format needs zero points >= 1; quantize with core.grid (it guarantees this)")
    return {
        "qweight": pack(qw.codes.T, qw.bits, dim=0),
        "qzeros": pack((qw.zeros - 1) & mask, qw.bits, dim=1),
        "scales": qw.scales.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def from_gptq_tensors(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
) -> QuantizedWeight:
    """Unpack the GPTQ tensors back into codes (N, K), zeros (G, N) and fp32 scales (G, N)."""
    out_features = scales.shape[1]
    codes = unpack(qweight, bits, in_features, dim=0).T.contiguous()
    zeros = unpack(qzeros, bits, out_features, dim=1) + 1
    return QuantizedWeight(
        codes=codes,
        scales=scales.float(),
        zeros=zeros,
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=group_size,
    )
