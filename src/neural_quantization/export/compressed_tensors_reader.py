"""Read a compressed-tensors ``pack-quantized`` checkpoint (ours, llm-compressor's) as GPTQ tensors.

The layout is the one :mod:`neural_quantization.export.compressed_tensors` writes (see its
docstring and ``docs/formats.md`` §2): per quantized linear ``X`` (N = out_features, K =
in_features, b bits, G groups)

* ``X.weight_packed`` int32 (N, K·b/32): unsigned codes ``q`` (signed code + 2**(b-1)) packed along K;
* ``X.weight_scale`` (N, G), in the dtype the producer stored (fp16, or bf16 from llm-compressor);
* ``X.weight_zero_point``: only for asymmetric schemes; int32 (N·b/32, G) packed along N, or
  unpacked (N, G) signed values in older writers; the unsigned zero is ``zp + 2**(b-1)``;
* ``X.weight_g_idx`` (K,): only for ``actorder: "group"`` (compressed-tensors < 0.20);
* ``X.weight_shape`` int (2,): ``[N, K]``.

so ``W[n, k] = scale[n, g] · (q[n, k] - zero[n, g])`` with ``g = g_idx[k]`` (``k // group_size``
without it). That is exactly the GPTQ weight with ``scales = weight_scale.T`` and zeros ``zero``,
so :func:`read_compressed_tensors` converts each layer losslessly into the four GPTQ tensors
(``formats/gptq.py``, v1) that ``QuantLinear`` and our kernels read, and returns a GPTQ
``quantization_config`` describing them; the scales keep their stored dtype.

Read: 4- and 8-bit integer weight-only schemes (W4A16, W8A16; group or channel strategy,
symmetric or not) with one scheme for all quantized layers. Anything else (activation
quantization, FP8/NVFP4, 2/3-bit dense packing, mixed schemes) raises :class:`CheckpointError`
saying so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from neural_quantization.core.quantized_weight import QuantizedWeight, group_index
from neural_quantization.formats.gptq import checkpoint_format, to_gptq_tensors
from neural_quantization.formats.integrity import CheckpointError
from neural_quantization.formats.packing import unpack
from neural_quantization.models.layer_storage import CheckpointWeights
from neural_quantization.models.loading import quantization_method

READABLE_BITS = (4, 8)
LAYER_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")


def is_compressed_tensors(checkpoint_dir: str | Path) -> bool:
    """Whether ``config.json`` says ``quant_method: compressed-tensors`` (False when unreadable)."""
    return quantization_method(checkpoint_dir) == "compressed-tensors"


def gptq_view_of_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The GPTQ ``quantization_config`` equivalent to the checkpoint's compressed-tensors one.

    Raises :class:`CheckpointError` for what cannot be read (see the module docstring). Our run
    record (``neural_quantization``, present in our own exports) is kept.
    """
    path = Path(checkpoint_dir)
    quant = json.loads((path / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    where = f"{path / 'config.json'}: quantization_config"
    if quant.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError(f"{where}.quantization_status={quant.get('quantization_status')!r}: the weights are "
                              "not stored compressed; save the model compressed (llm-compressor: save_compressed=True).")
    schemes = set()
    for name, group in (quant.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        fmt = group.get("format") or quant.get("format")
        if fmt != "pack-quantized":
            raise CheckpointError(f"{where}.config_groups.{name} is stored as {fmt!r}; load_quantized reads "
                                  "'pack-quantized' integer weights (W4A16 / W8A16 schemes).")
        if group.get("input_activations") or group.get("output_activations"):
            raise CheckpointError(f"{where}.config_groups.{name} quantizes activations too; load_quantized reads "
                                  "weight-only schemes (W4A16 / W8A16). Serve this checkpoint with vLLM.")
        bits, strategy = weights.get("num_bits"), weights.get("strategy")
        if weights.get("type") != "int" or bits not in READABLE_BITS:
            raise CheckpointError(f"{where}.config_groups.{name}.weights is {weights.get('type')!r} with "
                                  f"{bits} bits; load_quantized reads int weights of {READABLE_BITS} bits.")
        if strategy not in ("group", "channel"):
            raise CheckpointError(f"{where}.config_groups.{name}.weights.strategy={strategy!r}; "
                                  "load_quantized reads 'group' and 'channel'.")
        group_size = -1 if strategy == "channel" else weights.get("group_size")
        schemes.add((bits, group_size, bool(weights.get("symmetric", True)), weights.get("actorder") == "group"))
    if len(schemes) != 1:
        raise CheckpointError(f"{where} has {len(schemes)} weight schemes {sorted(schemes, key=str)}; "
                              "load_quantized reads checkpoints with exactly one.")
    ((bits, group_size, sym, group_actorder),) = schemes
    gptq: dict[str, Any] = {
        "quant_method": "gptq", "checkpoint_format": checkpoint_format(sym), "bits": bits, "group_size": group_size, "sym": sym,
        "desc_act": group_actorder, "lm_head": "lm_head" not in (quant.get("ignore") or []),
        "converted_from": {"quant_method": "compressed-tensors", "format": "pack-quantized"},
    }
    if "neural_quantization" in quant:
        gptq["neural_quantization"] = quant["neural_quantization"]
    return gptq


def read_compressed_tensors(checkpoint_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(GPTQ quantization_config, state dict)``: every tensor of the checkpoint, each quantized
    layer's compressed-tensors tensors replaced by its GPTQ tensors (``qweight``, ``qzeros``,
    ``scales``, ``g_idx``) in memory's v1 layout, whatever ``checkpoint_format`` a re-save will write."""
    path = Path(checkpoint_dir)
    quant = gptq_view_of_config(path)
    weights = CheckpointWeights(path)
    state = weights.read(weights.names())
    bits, group_size, sym = quant["bits"], quant["group_size"], quant["sym"]
    for base in sorted(name[: -len(".weight_packed")] for name in state if name.endswith(".weight_packed")):
        parts = {suffix: state.pop(f"{base}.{suffix}", None) for suffix in LAYER_SUFFIXES}
        if parts["weight_scale"] is None or parts["weight_shape"] is None:
            raise CheckpointError(f"{path}: {base} has weight_packed but no weight_scale / weight_shape; "
                                  "the checkpoint is incomplete.")
        try:
            state.update({f"{base}.{key}": t for key, t in _gptq_layer(parts, bits, group_size, sym).items()})
        except ValueError as err:
            raise CheckpointError(f"{path}: {base}: {err}") from None
    return quant, state


def _gptq_layer(parts: dict[str, torch.Tensor | None], bits: int, group_size: int, sym: bool) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one layer from its compressed-tensors tensors (see the module docstring)."""
    out_features, in_features = (int(v) for v in parts["weight_shape"].tolist())
    codes = unpack(parts["weight_packed"], bits, in_features, dim=1)  # (N, K), unsigned
    scale = parts["weight_scale"]  # (N, G)
    if scale.dim() == 1:
        scale = scale[:, None]
    groups = scale.shape[1]
    mid = 1 << (bits - 1)
    zero_point = parts["weight_zero_point"]
    if sym or zero_point is None:
        zeros = torch.full((groups, out_features), mid, dtype=torch.int32)
    elif tuple(zero_point.shape) == (out_features, groups) and zero_point.dtype != torch.int32:
        zeros = (zero_point.to(torch.int32) + mid).T.contiguous()  # unpacked signed zero points
    else:
        zeros = unpack(zero_point, bits, out_features, dim=0).T.contiguous()  # packed along N: (G, N)
    if int(zeros.min()) < 1:
        raise ValueError(f"{int((zeros < 1).sum())} zero points are 0, which the GPTQ layout our kernels read "
                         "cannot hold (it stores zero - 1); load this checkpoint with transformers + compressed-tensors")
    if parts["weight_g_idx"] is not None:
        g_idx = parts["weight_g_idx"].to(torch.int32)
    else:
        g_idx = group_index(in_features, group_size).to(torch.int32)
    if int(g_idx.max()) >= groups:
        raise ValueError(f"groups of {group_size} columns need {int(g_idx.max()) + 1} scales per row, "
                         f"weight_scale has {groups}")
    qw = QuantizedWeight(codes=codes, scales=scale.float().T.contiguous(), zeros=zeros, g_idx=g_idx, bits=bits,
                         group_size=group_size)
    tensors = to_gptq_tensors(qw)
    tensors["scales"] = scale.T.contiguous()  # the stored dtype, exactly
    return tensors
