"""Export a GPTQ-quantized model as a GGUF file for llama.cpp (Q4_0 / Q8_0), keeping GPTQ's codes.

llama.cpp's simplest block formats are symmetric blocks of 32 consecutive input columns of one
output row, each with an fp16 scale ``d`` (ggml's ``block_q4_0`` / ``block_q8_0``):

==========  =========================================  ============================================
type        bytes per block of 32 weights             weight
==========  =========================================  ============================================
Q4_0        18: ``d`` (fp16), 16 bytes of nibbles       ``w[j] = d · (v[j] - 8)``, ``v ∈ [0, 15]``;
            (byte ``i`` holds ``v[i]`` in its low and   byte ``i`` = ``v[i] | v[i + 16] << 4``
            ``v[i+16]`` in its high nibble)
Q8_0        34: ``d`` (fp16), 32 × int8                 ``w[j] = d · v[j]``, ``v ∈ [-127, 127]``
==========  =========================================  ============================================

Our symmetric grid is ``w = scale · (q - 2**(b-1))`` with one fp16 scale per (row, group). With
``group_size=32`` and contiguous groups, a group *is* a GGUF block, so:

* **Q4_0 (bits=4)**: ``d = scale`` and ``v = q`` exactly. The file holds the GPTQ solution bit for
  bit: llama.cpp users get GPTQ's error-compensated codes, not llama.cpp's own round-to-nearest.
* **Q8_0 (bits=8)**: ``d = scale`` and ``v = q - 128 ∈ [-128, 127]``. ggml's int8 dot products
  assume ``v ≥ -127`` (its quantizer never emits -128 and the x86 kernels take ``|v|`` in int8), so
  codes ``q = 0`` (v = -128) are **clamped to -127**: that weight moves by one step ``d`` (it was
  the most negative weight of its block, ``|w| ≈ amax``, so the change is ≤ 1/127 of ``amax``).
  GPTQ did not compensate this change; :class:`GGUFExportReport` counts the clamped codes and
  their share (typically one or two per block whose extreme weight is negative). The alternative,
  running GPTQ on a grid without code 0, needs a grid option in ``core/grid.py``.

Everything else follows llama.cpp's converter conventions: 1-D tensors (norms) as F32, other
float 2-D tensors (``token_embd``, an unquantized ``output``) as F16 (``float_type="f32"`` keeps
F32); a tied ``lm_head`` is not written (llama.cpp and transformers re-use ``token_embd``); Llama's
``attn_q`` / ``attn_k`` rows are permuted into llama.cpp's RoPE layout (the inverse of what
transformers' GGUF loader undoes; rows move with their blocks, codes are unchanged).

Metadata: when the model came from a GGUF (our aliases do), its key/value pairs, tokenizer
included, are copied, with ``block_count`` and the file type updated; otherwise they are built
from the transformers config and a byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``).
Our run record (the ``neural_quantization`` block of the checkpoint's ``quantization_config``: base
model, config, versions) is written as JSON under :data:`RECORD_KEY`, which llama.cpp ignores and
``export/gguf_reader.py`` reads back (so ``neural-quantize eval`` finds the base model).

Supported: Llama-architecture models (``model_type`` llama, mistral -> GGUF arch ``llama``).
:func:`check_export_config` refuses, before any quantization, what GGUF cannot hold exactly:
asymmetric grids, group sizes other than 32, act-order with reordered groups, 2/3 bits.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neural_quantization.config import QuantizationConfig
from neural_quantization.models.shape import read_model_shape
from neural_quantization.nn.qlinear import QuantLinear

BLOCK = 32
GGUF_TYPE_FOR_BITS = {4: "Q4_0", 8: "Q8_0"}
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}  # transformers model_type -> GGUF architecture
RECORD_KEY = "neural_quantization.record"  # string: JSON of quantization_config["neural_quantization"]


class GGUFExportError(ValueError):
    """A model or configuration that GGUF Q4_0/Q8_0 cannot represent; the message says how to fix it."""


@dataclass
class GGUFExportReport:
    """What was written, measured from the file and the codes (no estimates)."""

    path: str
    gguf_type: str
    file_bytes: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    quantized_tensors: int = 0
    clamped_codes: int = 0  # Q8_0 only: codes -128 written as -127
    total_codes: int = 0
    metadata_source: str = ""

    @property
    def clamped_fraction(self) -> float:
        return self.clamped_codes / self.total_codes if self.total_codes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clamped_fraction": self.clamped_fraction}


def check_export_config(config: QuantizationConfig) -> str:
    """The GGUF type for ``config`` ("Q4_0" / "Q8_0"); raise :class:`GGUFExportError` if none fits exactly."""
    if config.dynamic:
        raise GGUFExportError(
            "per-module widths (--dynamic) are written only as GPTQ checkpoints (quantization_config.dynamic, which "
            "vLLM and GPTQModel read); use --format gptq, or drop --dynamic."
        )
    if config.bits not in GGUF_TYPE_FOR_BITS:
        raise GGUFExportError(
            f"GGUF export writes Q4_0 (--bits 4) or Q8_0 (--bits 8); bits={config.bits} has no llama.cpp block "
            "format with the same grid. Use --bits 4 or 8, or --format gptq."
        )
    if config.group_size != BLOCK:
        raise GGUFExportError(
            f"GGUF Q4_0/Q8_0 blocks hold {BLOCK} weights with one scale, so GPTQ must run with --group-size {BLOCK} "
            f"(got {config.group_size})."
        )
    if not config.sym:
        raise GGUFExportError("GGUF Q4_0/Q8_0 are symmetric (no zero point); quantize with --sym, not --asym.")
    if config.desc_act and not config.static_groups:
        raise GGUFExportError(
            "GGUF blocks are contiguous runs of 32 input columns; act-order (--desc-act) reorders the groups. "
            "Add --static-groups (act-order with contiguous groups) or drop --desc-act."
        )
    if config.cascade_stages and config.cascade_stages[-1] not in GGUF_TYPE_FOR_BITS:
        raise GGUFExportError(f"the cascade ends at {config.cascade_stages[-1]} bits; GGUF export needs 4 or 8.")
    return GGUF_TYPE_FOR_BITS[config.bits]


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


def _fp16_bytes(scales: torch.Tensor) -> np.ndarray:
    """(N, B) scales -> (N, B, 2) little-endian fp16 bytes."""
    half = np.ascontiguousarray(scales.detach().cpu().to(torch.float16).numpy().astype("<f2"))
    return half.view(np.uint8).reshape(*half.shape, 2)


def q4_0_blocks(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Codes (N, K) in [0, 15] and fp16 scales (N, K/32) -> Q4_0 bytes (N, K/32 · 18)."""
    n, k = codes.shape
    v = codes.detach().cpu().numpy().astype(np.uint8).reshape(n, k // BLOCK, BLOCK)
    nibbles = v[..., :16] | (v[..., 16:] << np.uint8(4))  # (N, B, 16)
    return np.concatenate([_fp16_bytes(scales), nibbles], axis=-1).reshape(n, -1)


def q8_0_blocks(codes: torch.Tensor, scales: torch.Tensor) -> tuple[np.ndarray, int]:
    """Codes (N, K) in [0, 255] (zero 128) and fp16 scales -> Q8_0 bytes (N, K/32 · 34), clamped count."""
    n, k = codes.shape
    v = codes.detach().cpu().numpy().astype(np.int16) - 128
    clamped = int((v < -127).sum())
    v = np.clip(v, -127, 127).astype(np.int8).reshape(n, k // BLOCK, BLOCK)
    return np.concatenate([_fp16_bytes(scales), v.view(np.uint8)], axis=-1).reshape(n, -1), clamped


def permute_rope_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows (dim 0) of a q/k projection from transformers' RoPE layout to llama.cpp's.

    transformers rotates the two halves of each head (rotate_half); llama.cpp rotates adjacent
    pairs. Within each head the rows ``[0..d/2) , [d/2..d)`` are interleaved to ``0, d/2, 1, d/2+1, …``.
    Works on any tensor whose first dim is the output rows (weights, codes, scales).
    """
    n = rows.shape[0]
    return rows.reshape(n_head, 2, n // n_head // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def unpermute_rope_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_rope_rows`: llama.cpp's interleaved RoPE rows back to transformers' order.

    Within each head the rows ``0, d/2, 1, d/2+1, …`` return to ``[0..d/2), [d/2..d)``; the same
    reordering as transformers' ``LlamaTensorProcessor._reverse_permute_weights`` (for attn_k with
    the KV head count). Rows move whole, so on codes (N, K) and scales (N, G) it keeps each block's
    codes with its scale.
    """
    n = rows.shape[0]
    return rows.reshape(n_head, n // n_head // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def shape_problem(in_features: int, has_bias: bool) -> str | None:
    """Why a linear layer cannot become GGUF Q4_0/Q8_0 blocks (or None)."""
    if in_features % BLOCK:
        return f"in_features={in_features} is not a multiple of {BLOCK}; GGUF blocks need it. Use --format gptq."
    if has_bias:
        return "layers with a bias are not supported by the Llama GGUF export; use --format gptq."
    return None


def layer_blocks(layer: QuantLinear, gguf_type: str, permute_heads: int | None = None) -> tuple[np.ndarray, int]:
    """The GGUF bytes (N, K/32 · block bytes) of one bias-free quantized layer (the Llama tensor map
    has no biases) and its number of clamped codes."""
    problem = shape_problem(layer.in_features, layer.bias is not None)
    if problem:
        raise GGUFExportError(problem)
    return weight_blocks(layer, gguf_type, permute_heads)


def weight_blocks(layer: QuantLinear, gguf_type: str, permute_heads: int | None = None) -> tuple[np.ndarray, int]:
    """The GGUF bytes (N, K/32 · block bytes) of one quantized layer's weight and its number of
    clamped codes; a bias, if any, is the caller's to write (diffusers' denoisers keep theirs)."""
    qw = layer.quantized_weight()
    expected_bits = 4 if gguf_type == "Q4_0" else 8
    if qw.bits != expected_bits or qw.group_size != BLOCK:
        raise GGUFExportError(f"{gguf_type} needs {expected_bits}-bit groups of {BLOCK}; the layer has "
                              f"{qw.bits} bits, group_size {qw.group_size}.")
    if layer.in_features % BLOCK:
        raise GGUFExportError(f"in_features={layer.in_features} is not a multiple of {BLOCK}; GGUF blocks need it.")
    if not torch.equal(qw.g_idx.cpu().long(), torch.arange(layer.in_features) // BLOCK):
        raise GGUFExportError("the layer's groups are reordered (act-order g_idx); GGUF blocks must be contiguous.")
    mid = 1 << (qw.bits - 1)
    if not bool((qw.zeros == mid).all()):
        raise GGUFExportError(f"{gguf_type} is symmetric; the layer has zero points other than {mid}.")
    codes, scales = qw.codes, qw.scales.T  # (N, K), (N, G)
    if permute_heads:
        codes, scales = permute_rope_rows(codes, permute_heads), permute_rope_rows(scales, permute_heads)
    if gguf_type == "Q4_0":
        return q4_0_blocks(codes, scales), 0
    return q8_0_blocks(codes, scales)


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in ("default", None):
        raise GGUFExportError(f"rope scaling {rope_type!r} is not supported by the GGUF export yet.")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", None) or 10000.0)


def _architecture_kv(config: Any) -> dict[str, tuple[Any, str]]:
    """The ``{arch}.*`` keys llama.cpp reads for a Llama model, from a transformers config."""
    shape = read_model_shape(config)
    kv = {
        "context_length": (config.max_position_embeddings, "uint32"),
        "embedding_length": (shape.hidden, "uint32"),
        "block_count": (shape.layers, "uint32"),
        "feed_forward_length": (shape.intermediate, "uint32"),
        "attention.head_count": (shape.heads, "uint32"),
        "attention.head_count_kv": (shape.kv_heads, "uint32"),
        "rope.freq_base": (_rope_theta(config), "float32"),
        "attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), "float32"),
        "rope.dimension_count": (shape.head_dim, "uint32"),
        "vocab_size": (shape.vocab, "uint32"),
    }
    if shape.head_dim * shape.heads != shape.hidden:
        kv["attention.key_length"] = (shape.head_dim, "uint32")
        kv["attention.value_length"] = (shape.head_dim, "uint32")
    return kv


def _add_typed(writer: Any, key: str, value: Any, kind: str) -> None:
    getattr(writer, f"add_{kind}")(key, value)


def _copy_source_metadata(writer: Any, source: Path, arch: str, config: Any) -> None:
    """Copy the key/value pairs of ``source`` (tokenizer included), checking the shapes match ``config``."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    source_arch = reader.fields["general.architecture"].contents()
    if source_arch != arch:
        raise GGUFExportError(f"the source GGUF {source} has architecture {source_arch!r}, the model {arch!r}.")
    ours = _architecture_kv(config)
    skip = {"general.architecture", "general.file_type", "general.quantization_version", f"{arch}.block_count",
            RECORD_KEY}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        suffix = key[len(arch) + 1:] if key.startswith(arch + ".") else None
        value = f.contents()
        if suffix in ours and suffix not in ("context_length",) and ours[suffix][0] != value:
            if not (isinstance(value, float) and abs(value - ours[suffix][0]) <= 1e-6 * max(1.0, abs(value))):
                raise GGUFExportError(
                    f"the source GGUF's {key}={value} does not match the model's config ({ours[suffix][0]}); "
                    "export without source_gguf or from the matching model."
                )
        vtype = f.types[0]
        sub_type = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 2:
            continue  # nested arrays: none in llama.cpp's keys
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    writer.add_uint32(f"{arch}.block_count", read_model_shape(config).layers)


def _tokenizer_metadata(writer: Any, tokenizer: Any, config: Any) -> None:
    """Write a byte-level BPE tokenizer (``tokenizer.json`` with a BPE model) as GGUF ``gpt2`` tokens + merges."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(
            "the GGUF export builds tokenizer metadata only for byte-level BPE tokenizers (tokenizer.json with a "
            f"BPE model; this one is {model.get('type', type(tokenizer).__name__)!r}). Quantize from the model's "
            ".gguf file (its tokenizer is copied) or convert the tokenizer with llama.cpp's converter."
        )
    vocab_size = read_model_shape(config).vocab
    special = set(getattr(tokenizer, "all_special_ids", []))
    added = {t["id"] for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, name, None)
        if value is not None:
            add(int(value))
    if getattr(tokenizer, "add_bos_token", None) is not None:
        writer.add_add_bos_token(bool(tokenizer.add_bos_token))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    source_gguf: str | os.PathLike | None = None,
    float_type: str = "f16",
    name: str | None = None,
) -> GGUFExportReport:
    """Write ``model`` (quantized by this package with a GGUF-compatible config) to the file ``path``.

    The file is written under a temporary name and renamed into place. ``source_gguf``: the .gguf
    the model was loaded from, whose metadata and tokenizer are copied; without it, ``tokenizer``
    (byte-level BPE) provides them.
    """
    import gguf

    if float_type not in ("f16", "f32"):
        raise GGUFExportError(f"float_type={float_type!r}; use 'f16' (llama.cpp's default) or 'f32'.")
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export supports the Llama architecture ({sorted(ARCHITECTURES)}), not {model_type!r}; "
            "use --format gptq or compressed-tensors for this model."
        )
    arch = ARCHITECTURES[model_type]
    ours = getattr(config, "quantization_config", None) or {}
    record = ours.get("neural_quantization")
    if not record:
        raise GGUFExportError("the model has no quantization_config from neural_quantization; quantize it first.")
    gguf_type = check_export_config(QuantizationConfig.from_dict(record["config"]))
    qtype = getattr(gguf.GGMLQuantizationType, gguf_type)
    file_type = gguf.LlamaFileType.MOSTLY_Q4_0 if gguf_type == "Q4_0" else gguf.LlamaFileType.MOSTLY_Q8_0

    shape = read_model_shape(config)
    heads, kv_heads = shape.heads, shape.kv_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.layers)

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex}")
    report = GGUFExportReport(path=str(target), gguf_type=gguf_type, file_bytes=0)
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        if source_gguf is not None:
            _copy_source_metadata(writer, Path(source_gguf), arch, config)
            report.metadata_source = f"copied from {source_gguf}"
        else:
            writer.add_name(name or str(getattr(config, "_name_or_path", "") or "model"))
            for key, (value, kind) in _architecture_kv(config).items():
                _add_typed(writer, f"{arch}.{key}", value, kind)
            if tokenizer is None:
                raise GGUFExportError("GGUF export needs the tokenizer (or source_gguf) for llama.cpp's metadata.")
            _tokenizer_metadata(writer, tokenizer, config)
            report.metadata_source = "built from the transformers config and tokenizer"
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string(RECORD_KEY, json.dumps(record, sort_keys=True))

        quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        tied = shape.tied_embeddings
        done: set[str] = set()
        for module_name, layer in quantized.items():
            gguf_name = names.get_name(module_name)
            if gguf_name is None:
                raise GGUFExportError(f"no GGUF tensor name for {module_name!r} in the {arch} mapping.")
            heads_for = heads if gguf_name.endswith(".attn_q") else kv_heads if gguf_name.endswith(".attn_k") else None
            data, clamped = layer_blocks(layer, gguf_type, heads_for)
            writer.add_tensor(f"{gguf_name}.weight", data, raw_dtype=qtype)
            report.clamped_codes += clamped
            report.total_codes += layer.in_features * layer.out_features
            report.quantized_tensors += 1
            report.tensor_types[gguf_type] = report.tensor_types.get(gguf_type, 0) + 1
            done.update(f"{module_name}.{b}" for b in ("qweight", "qzeros", "scales", "g_idx"))
        for tensor_name, tensor in model.state_dict().items():
            if tensor_name in done:
                continue
            module_name, _, suffix = tensor_name.rpartition(".")
            if module_name == "lm_head" and tied:
                continue
            gguf_name = names.get_name(module_name)
            if gguf_name is None:
                if "rotary_emb" in module_name:
                    continue  # computed from the metadata, not stored
                raise GGUFExportError(f"no GGUF tensor name for {tensor_name!r} in the {arch} mapping.")
            array = tensor.detach().cpu().float()
            if gguf_name.endswith((".attn_q", ".attn_k")):
                array = permute_rope_rows(array, heads if gguf_name.endswith(".attn_q") else kv_heads)
            array = array.numpy()
            if array.ndim > 1 and float_type == "f16":
                array = array.astype(np.float16)
            writer.add_tensor(f"{gguf_name}.{suffix}", array)
            kind = "F16" if array.dtype == np.float16 else "F32"
            report.tensor_types[kind] = report.tensor_types.get(kind, 0) + 1
        finish_file(writer, tmp, target)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    report.file_bytes = target.stat().st_size
    return report


def finish_file(writer: Any, tmp: Path, target: Path) -> None:
    """Write a ``gguf.GGUFWriter``'s header, metadata and tensors to ``tmp`` and rename it to
    ``target`` (the file appears whole or not at all); the caller removes ``tmp`` on failure."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, target)


def gguf_file_name(output_dir: str | os.PathLike, gguf_type: str) -> str:
    """``<dir name>-Q4_0.gguf``: llama.cpp's naming habit (model name, then the type)."""
    return f"{Path(output_dir).name}-{gguf_type}.gguf"


def save_checkpoint_with_gguf(
    model: nn.Module,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    overwrite: bool = False,
    source_gguf: str | os.PathLike | None = None,
) -> tuple[Path, GGUFExportReport]:
    """Write our GPTQ checkpoint *and* ``<dir>-Q4_0.gguf`` into ``output_dir``, atomically as a whole.

    The GPTQ checkpoint keeps the run reloadable and evaluable (``load_quantized``, ``eval``); the
    .gguf file inside it is what llama.cpp loads. Both go to a hidden staging sibling that is renamed
    into place only when both are complete.
    """
    from neural_quantization.export.checkpoint import checkpoint_tensors, write_model_directory
    from neural_quantization.export.directories import check_output_dir, staged_directory

    target = check_output_dir(output_dir, overwrite)
    ours = getattr(model.config, "quantization_config", None)
    if not ours or "neural_quantization" not in ours:
        raise GGUFExportError("the model has no quantization_config from neural_quantization; quantize it first.")
    record = ours["neural_quantization"]
    gguf_type = check_export_config(QuantizationConfig.from_dict(record["config"]))
    with staged_directory(target) as staging:
        write_model_directory(staging, checkpoint_tensors(model), model.config, model, tokenizer)
        report = export_gguf(model, staging / gguf_file_name(target, gguf_type), tokenizer=tokenizer,
                             source_gguf=source_gguf)
    report.path = str(target / Path(report.path).name)
    return target, report
