"""Read a GGUF file (ours, llama.cpp's) for ``load_quantized``: the Q4_0 / Q8_0 blocks of the decoder
linears become QuantLinear tensors holding the same codes; every other tensor is dequantized.

**The file** (ggml, read with ``gguf.GGUFReader``): key/value metadata (``general.architecture``,
the ``{arch}.*`` shapes, ``tokenizer.ggml.*``), then the tensors, each with a ggml type and a shape
listed innermost first (``ne0 = K`` for an (N, K) weight). A quantized (N, K) weight is N rows of
K/32 blocks; a block is 32 consecutive weights of one row with an fp16 scale ``d``:

========  =====================================================  ===============================
type      block of 32 weights                                    weight
========  =====================================================  ===============================
Q4_0      18 bytes: ``d`` (fp16), then 16 bytes; byte ``i``      ``w = d · (v - 8)``,
          holds ``v[i]`` in its low nibble, ``v[i+16]`` in its   ``v ∈ [0, 15]``
          high nibble
Q8_0      34 bytes: ``d`` (fp16), then 32 × int8 ``v``           ``w = d · v``, ``v ∈ [-128, 127]``
========  =====================================================  ===============================

**The mapping** onto our symmetric grid ``w = scale · (q - 2**(b-1))`` with ``group_size = 32``
(``core/quantized_weight.py``; held as GPTQ v1 tensors, ``formats/gptq.py``) is exact, one block
per (row, group):

* Q4_0 -> ``bits = 4``: ``scale = d``, ``q = v``, zero 8;
* Q8_0 -> ``bits = 8``: ``scale = d``, ``q = v + 128``, zero 128.

Worked example (Q4_0): a block starting ``00 38 8F …`` has ``d = 0x3800 = 0.5`` (fp16, little
endian) and first nibble byte ``0x8F``: ``v[0] = 0xF = 15``, ``v[16] = 0x8 = 8``, so
``w[0] = 0.5 · 7 = 3.5`` and ``w[16] = 0``; our layer holds codes 15 and 8 with scale 0.5, zero 8.

So a file written by ``export/gguf.py`` reads back with its GPTQ checkpoint's codes and scales bit
for bit (Q8_0: but for the codes -128 that the export clamped to -127, which read back as -127).
Llama's ``attn_q`` / ``attn_k`` rows are stored in llama.cpp's interleaved RoPE order; they are put
back with :func:`~neural_quantization.export.gguf.unpermute_rope_rows` (the rows of codes and
scales move together, so each block keeps its scale).

**Who does what.** The transformers config and tokenizer come from transformers' own GGUF support
(``AutoConfig`` / ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``); GGUF tensor names map
to the model's parameter names with transformers' ``get_gguf_hf_weights_map``. Only Q4_0 / Q8_0
weights of ``nn.Linear`` layers inside the decoder layers, under a transformers tensor processor
that passes linear weights through (:data:`CODES_KEPT`), become QuantLinear tensors. Every other
tensor (F32 / F16 / BF16 norms, ``token_embd``, ``output``, and any other type such as Q4_1, Q5_0,
Q4_K or Q6_K from llama.cpp) is dequantized with ``gguf.quants.dequantize``, passed through the
architecture's transformers tensor processor exactly as transformers' GGUF loader does, and loaded
as an ordinary float weight. The decoder linears dequantized that way are counted in
``quantization_config.converted_from`` and named in a warning: such a layer runs as a float
``nn.Linear``, not on our kernels.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neural_quantization.core.quantized_weight import QuantizedWeight, group_index
from neural_quantization.export.gguf import BLOCK, RECORD_KEY, unpermute_rope_rows
from neural_quantization.formats.gptq import to_gptq_tensors
from neural_quantization.formats.integrity import CheckpointError
from neural_quantization.models.loading import quantization_method
from neural_quantization.nn.modules import UnsupportedModelError, find_decoder_layers

#: GGUF block types that are our grid (see the module docstring) -> their width.
BITS_OF_TYPE = {"Q4_0": 4, "Q8_0": 8}
BLOCK_BYTES = {"Q4_0": 2 + BLOCK // 2, "Q8_0": 2 + BLOCK}

#: transformers' GGUF tensor processors (``modeling_gguf_pytorch_utils.TENSOR_PROCESSORS``, by class
#: name) that hand a linear weight over as stored, apart from the rows they permute back: GGUF
#: tensor-name part -> the config key of the head count (LlamaTensorProcessor undoes llama.cpp's
#: RoPE order of attn_q with the attention heads, of attn_k with the KV heads). Gemma2's and
#: Nemotron's change only the norms. Under any other processor (fused or reshaped experts,
#: transposed GPT-2 weights, ...) every tensor is dequantized and the processor runs on it.
CODES_KEPT: dict[str, dict[str, str]] = {
    "TensorProcessor": {},
    "Gemma2TensorProcessor": {},
    "NemotronTensorProcessor": {},
    "LlamaTensorProcessor": {".attn_q.": "num_attention_heads", ".attn_k.": "num_key_value_heads"},
}


def find_gguf_file(path: str | os.PathLike) -> Path | None:
    """The ``.gguf`` file ``load_quantized(path)`` reads, or None when ``path`` is no GGUF.

    ``path`` itself when it is a ``.gguf`` file; for a directory, its one ``*.gguf`` when its
    ``config.json`` (if any) names no quantization method (a GPTQ or compressed-tensors checkpoint
    wins over a ``.gguf`` beside it, as in our ``--format gguf`` output). A directory with several
    ``.gguf`` files and no such config raises :class:`CheckpointError` asking for one of them.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p if p.suffix.lower() == ".gguf" else None
    if not p.is_dir() or quantization_method(p) is not None:
        return None
    files = sorted(f for f in p.glob("*.gguf") if f.is_file())
    if len(files) > 1:
        raise CheckpointError(f"{p} holds {len(files)} .gguf files ({', '.join(f.name for f in files)}) and no "
                              f"quantized config.json; pass the one you mean, e.g. {files[0]}")
    return files[0] if files else None


def gguf_config(file: str | os.PathLike) -> Any:
    """The transformers config of a GGUF file, built from its metadata by transformers' GGUF support."""
    import transformers
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    file = Path(file)
    try:
        return AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    except (ValueError, KeyError, TypeError, OSError, NotImplementedError) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CheckpointError(
            f"{file}: transformers {transformers.__version__} cannot build a model config from this GGUF ({first}). "
            f"load_quantized reads the architectures transformers' GGUF loader knows "
            f"({', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES)[:12])}, ...); for another one, load the model's "
            "safetensors checkpoint instead (or upgrade transformers)."
        ) from None


def gguf_tokenizer(file: str | os.PathLike) -> Any:
    """The tokenizer a GGUF file describes (``tokenizer.ggml.*``), built by transformers' GGUF support."""
    from transformers import AutoTokenizer

    file = Path(file)
    try:
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (ValueError, KeyError, TypeError, OSError, NotImplementedError) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CheckpointError(f"{file}: transformers cannot build the tokenizer of this GGUF ({first}); load "
                              "the tokenizer from the model's original checkpoint (AutoTokenizer).") from None


# --------------------------------------------------------------------------------------------------
# Blocks -> codes: the inverses of export/gguf.py's q4_0_blocks / q8_0_blocks
# --------------------------------------------------------------------------------------------------


def _split_blocks(data: np.ndarray, gguf_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, B · block bytes) uint8 -> fp16 ``d`` (N, B) and the blocks' remaining bytes (N, B, bytes - 2)."""
    data = np.asarray(data, dtype=np.uint8)
    blocks = data.reshape(data.shape[0], -1, BLOCK_BYTES[gguf_type])
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2")[..., 0].astype(np.float16)
    return d, blocks[..., 2:]


def q4_0_codes(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 bytes (N, K/32 · 18) -> codes (N, K) int32 in [0, 15] (zero 8) and fp16 scales (N, K/32)."""
    d, nibbles = _split_blocks(data, "Q4_0")  # nibbles (N, B, 16)
    v = np.concatenate([nibbles & np.uint8(0x0F), nibbles >> np.uint8(4)], axis=-1)  # (N, B, 32): v[i], v[i+16]
    return torch.from_numpy(v.reshape(v.shape[0], -1).astype(np.int32)), torch.from_numpy(d)


def q8_0_codes(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 bytes (N, K/32 · 34) -> codes (N, K) int32 ``v + 128`` in [0, 255] (zero 128) and fp16 scales."""
    d, values = _split_blocks(data, "Q8_0")  # values (N, B, 32)
    v = np.ascontiguousarray(values).view(np.int8).astype(np.int32) + 128
    return torch.from_numpy(v.reshape(v.shape[0], -1)), torch.from_numpy(d)


def layer_tensors(data: np.ndarray, gguf_type: str, rope_heads: int | None = None) -> dict[str, torch.Tensor]:
    """The GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``; v1) of one Q4_0 / Q8_0 weight.

    ``rope_heads``: undo llama.cpp's RoPE row order with this many heads (Llama's attn_q / attn_k).
    The fp16 scales are the blocks' ``d`` exactly.
    """
    bits = BITS_OF_TYPE[gguf_type]
    codes, scales = (q4_0_codes if bits == 4 else q8_0_codes)(data)  # (N, K), (N, G)
    if rope_heads:
        codes, scales = unpermute_rope_rows(codes, rope_heads), unpermute_rope_rows(scales, rope_heads)
    rows, in_features = codes.shape
    qw = QuantizedWeight(
        codes=codes.contiguous(), scales=scales.float().T.contiguous(),
        zeros=torch.full((scales.shape[1], rows), 1 << (bits - 1), dtype=torch.int32),
        g_idx=group_index(in_features, BLOCK), bits=bits, group_size=BLOCK,
    )
    tensors = to_gptq_tensors(qw)
    tensors["scales"] = scales.T.contiguous()  # (G, N) fp16, the stored d
    return tensors


# --------------------------------------------------------------------------------------------------
# The file -> (quantization_config, state dict)
# --------------------------------------------------------------------------------------------------


def _reader(file: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(file))
    except (ValueError, OSError, KeyError) as err:
        raise CheckpointError(f"{file} is not a readable GGUF file ({err}); re-download or re-export it.") from None


def _tensor_plan(reader: Any, model: nn.Module) -> tuple[Any, dict[str, str], dict[str, tuple[str, int, int | None]]]:
    """``(processor, GGUF -> model names, kept)``: transformers' tensor processor and name map for the
    file, and the tensors kept as codes: GGUF name -> (module name, bits, RoPE heads to undo or None)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    arch = reader.fields["general.architecture"].contents()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    rope_rows = CODES_KEPT.get(type(processor).__name__)
    try:
        layers_name, _ = find_decoder_layers(model)
    except UnsupportedModelError:
        rope_rows = None
    if rope_rows is None:
        return processor, names, {}
    linears = {name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.startswith(layers_name + ".")}
    kept = {}
    for tensor in reader.tensors:
        bits = BITS_OF_TYPE.get(tensor.tensor_type.name)
        target = names.get(tensor.name, "")
        module = target.removesuffix(".weight")
        if bits is None or not target.endswith(".weight") or module not in linears or len(tensor.shape) != 2:
            continue
        heads_key = next((key for part, key in rope_rows.items() if part in tensor.name), None)
        kept[tensor.name] = (module, bits, int(getattr(model.config, heads_key)) if heads_key else None)
    return processor, names, kept


def _decoder_linear_weights(model: nn.Module) -> set[str]:
    try:
        layers_name, _ = find_decoder_layers(model)
    except UnsupportedModelError:
        return set()
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(layers_name + ".")}


def _quantization_config(file: Path, reader: Any, names: dict[str, str], kept: dict[str, tuple[str, int, int | None]],
                         model: nn.Module) -> dict[str, Any]:
    """What ``config.quantization_config`` says of the model read from ``file`` (see :func:`read_gguf`)."""
    linear_weights = _decoder_linear_weights(model)
    dequantized = Counter(t.tensor_type.name for t in reader.tensors
                          if t.name not in kept and names.get(t.name) in linear_weights)
    converted = {
        "format": "gguf", "file": str(file), "architecture": reader.fields["general.architecture"].contents(),
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
        "linears_kept_as_codes": len(kept), "linears_dequantized": dict(sorted(dequantized.items())),
    }
    record = json.loads(reader.fields[RECORD_KEY].contents()) if RECORD_KEY in reader.fields else None
    quant: dict[str, Any] = {}
    if kept:
        widths = Counter(bits for _, bits, _ in kept.values())
        base = max(widths, key=lambda b: (widths[b], -b))
        quant = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": base, "group_size": BLOCK, "sym": True,
                 "desc_act": False, "lm_head": False}
        if record and "static_groups" in record.get("config", {}):  # act-order run, contiguous groups
            quant["static_groups"] = record["config"]["static_groups"]
        others = {f"+:^{re.escape(module)}$": {"bits": bits} for module, bits, _ in kept.values() if bits != base}
        if others:
            quant["dynamic"] = others
    quant["converted_from"] = converted
    if record is not None:
        quant["neural_quantization"] = record
    return quant


def empty_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` on ``meta`` (no memory): what the GGUF's tensors are mapped onto and loaded into."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"transformers has no causal LM for the GGUF's model_type "
                              f"{getattr(config, 'model_type', None)!r} ({err}); load_quantized reads causal LMs.") from None


def gguf_quantization_config(file: str | os.PathLike) -> dict[str, Any]:
    """The ``quantization_config`` :func:`read_gguf` gives the model, from the header alone (no tensor data).

    With Q4_0 / Q8_0 decoder linears: a GPTQ block (``bits`` of the most common width, other widths in
    ``dynamic``, ``group_size`` 32, ``sym``), with ``converted_from`` (the file, its tensor types, how
    many decoder linears are kept as codes and how many were dequantized, by type) and our run record
    (``neural_quantization``) where the file carries it. Without any: only ``converted_from`` (and
    the record).
    """
    file = Path(file)
    reader = _reader(file)
    model = empty_model(gguf_config(file), torch.float32)
    _, names, kept = _tensor_plan(reader, model)
    return _quantization_config(file, reader, names, kept, model)


def read_gguf(file: str | os.PathLike, model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(quantization_config, state dict)`` of ``model`` (built from :func:`gguf_config`, e.g. on ``meta``).

    The state dict holds QuantLinear tensors (``X.qweight`` …) for the decoder linears kept as codes
    and float tensors in ``dtype`` for everything else (see the module docstring); the
    quantization_config is :func:`gguf_quantization_config`'s. Raises :class:`CheckpointError` for a
    tensor type the gguf package cannot dequantize. Warns when decoder linears were dequantized.
    """
    import gguf

    file = Path(file)
    reader = _reader(file)
    processor, names, kept = _tensor_plan(reader, model)
    parsed: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}  # where transformers' processors put merged experts
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name in kept:
            module, _, heads = kept[tensor.name]
            for key, value in layer_tensors(tensor.data, tensor.tensor_type.name, heads).items():
                state[f"{module}.{key}"] = value
            continue
        try:
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{file}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package cannot "
                "dequantize; re-quantize the model with llama.cpp to a common type (llama-quantize ... Q4_0, Q8_0, "
                "Q4_K_M) or upgrade the gguf package."
            ) from None
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=names,
                                   parsed_parameters=parsed)
        if result.name not in names:
            continue  # not a parameter of the model (e.g. rope_freqs), as transformers' loader skips it
        state[names[result.name]] = torch.from_numpy(np.copy(result.weights)).to(dtype)
    state.update({name: t.to(dtype) for name, t in parsed["tensors"].items()})
    quant = _quantization_config(file, reader, names, kept, model)
    dequantized = quant["converted_from"]["linears_dequantized"]
    if dequantized:
        types = ", ".join(f"{count} {kind}" for kind, count in dequantized.items())
        warnings.warn(
            f"{file}: {sum(dequantized.values())} decoder linear layers ({types}) are not Q4_0/Q8_0 blocks, so they "
            f"were dequantized to {str(dtype).removeprefix('torch.')} and run as float nn.Linear layers "
            f"({len(kept)} kept as QuantLinear codes). To run every layer on the quantized kernels, quantize the "
            "model with neural-quantize (--format gguf --group-size 32 writes Q4_0).",
            stacklevel=3,
        )
    return quant, state
