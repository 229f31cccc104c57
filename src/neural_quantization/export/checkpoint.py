"""Save and load quantized checkpoints (GPTQ: ``checkpoint_format`` ``gptq`` for symmetric grids,
``gptq_v2`` for asymmetric ones, see ``formats/gptq.py``); load compressed-tensors ones and GGUF
files too (``export/compressed_tensors_reader.py``, ``export/gguf_reader.py``).

A checkpoint directory holds

* ``model.safetensors``: every tensor of the model's ``state_dict`` (runs with streamed weights write
  the same tensors as shards, one per decoder layer plus one for the rest, with
  ``model.safetensors.index.json``; see :func:`save_streamed`). Quantized linear layers appear
  as ``<module>.qweight / .qzeros / .scales / .g_idx (/ .bias)`` in the layout of
  ``formats/gptq.py``; everything else (embeddings, norms, ``lm_head``) as in the original model.
  Tied weights are stored once (transformers re-ties them on load).
* ``config.json``: the model's config plus ``quantization_config``::

      {"quant_method": "gptq", "checkpoint_format": "gptq" (or "gptq_v2"), "bits": 4, "group_size": 128,
       "desc_act": false, "sym": true, "static_groups": false, "true_sequential": true,
       "damp_percent": 0.01, "lm_head": false, "pack_dtype": "int32",
       "meta": {"quantizer": ["neural-quantization:0.1.0"]},
       "neural_quantization": {"version": ..., "base_model": ..., "method": "gptq",
                               "config": {...QuantizationConfig...}, "created": ..., ...}}

  The first block is what GPTQ loaders (transformers with GPTQModel, vLLM) read; our own record of
  the run sits under ``neural_quantization``.
* the tokenizer files and ``generation_config.json`` when available.

**Nested cascade checkpoints** (``cascade_mode="nested"``, stages [wide, narrow], e.g. [8, 4]) are
ordinary GPTQ checkpoints at the *wide* width (``bits: 8``, ``sym: false``), so any GPTQ loader reads
the 8-bit model. ``quantization_config.neural_quantization.nested`` says how to read them at the
narrow width::

    {"bits": [8, 4], "stored_bits": 8, "narrow_bits": 4, "shift": 4, "scale_factor": 16,
     "zero_offset": 8, "read_narrow": "codes >> 4; scales * 16; zeros >> 4 ..."}

``load_quantized(dir, bits=4)`` does that for every layer (unpack, shift, repack as 4-bit GPTQ
tensors): the narrow codes are the high 4 bits of each 8-bit code, the 4-bit scale is the stored
fp16 scale times 16 (exact), and the 4-bit zero point is the 8-bit zero point (``qzeros + 1``)
shifted right by 4 (the 8-bit zero is ``16·z + 8``). The grid is derived in ``core/cascade.py``.

Writing is atomic: everything goes to a temporary sibling directory that is renamed into place at
the end, so an interrupted save never leaves a half-written checkpoint under the requested name
(``export/directories.py`` owns the rules for which directories may be written or replaced).
Loading checks the directory first (``formats/integrity.py``, then the tensors against the model
that ``config.json`` builds), so a damaged checkpoint fails with one line before any work.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from neural_quantization._version import __version__
from neural_quantization.config import QuantizationConfig
from neural_quantization.export.compressed_tensors_reader import (
    gptq_view_of_config,
    is_compressed_tensors,
    read_compressed_tensors,
)
from neural_quantization.export.directories import check_output_dir, staged_directory
from neural_quantization.export.gguf_reader import (
    empty_model,
    find_gguf_file,
    gguf_config,
    gguf_quantization_config,
    read_gguf,
)
from neural_quantization.formats.gptq import (
    TENSOR_NAMES,
    checkpoint_format,
    module_width,
    zeros_from_v2,
    zeros_to_v2,
)
from neural_quantization.formats.integrity import (
    DTYPE_BYTES,
    FLOAT_DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    CheckpointInventory,
    inspect_checkpoint,
)
from neural_quantization.nn.modules import find_decoder_layers
from neural_quantization.models.layer_storage import CheckpointWeights, WorkDir
from neural_quantization.nn.qlinear import QuantLinear, swap_in_quant_linears

WEIGHTS_NAME = SINGLE_FILE


def gptq_quantization_config(
    config: QuantizationConfig, base_model: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``quantization_config`` block written into ``config.json``."""
    record = {
        "version": __version__,
        "base_model": base_model,
        "method": config.method,
        "config": config.to_dict(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    try:
        import transformers

        record["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    record.update(extra or {})
    stored_bits, sym = config.bits, config.sym
    if config.cascade_stages and config.cascade_mode == "nested":
        from neural_quantization.core.cascade import nested_layout

        record["nested"] = nested_layout(*config.cascade_stages)
        stored_bits, sym = config.cascade_stages[0], False  # wide zero points are 16·z + 8, not 2**(bits-1)
    return {
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format(sym),
        "bits": stored_bits,
        "group_size": config.group_size,
        # Loaders read desc_act as "g_idx may reorder the groups" and pick slower kernels for it; with
        # static groups g_idx is k // group_size, so the checkpoint is an ordinary one (our record keeps
        # the run's desc_act).
        "desc_act": config.desc_act and not config.static_groups,
        "sym": sym,
        "static_groups": config.static_groups,
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "lm_head": config.quantize_lm_head,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"neural-quantization:{__version__}"]},
        **({"dynamic": config.dynamic} if config.dynamic else {}),
        "neural_quantization": record,
    }


def unique_state_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the state dict, each shared (tied) tensor once, under its first name."""
    seen: set[tuple[int, int, tuple]] = set()
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:  # layers of a streamed run: no storage to compare, and never tied
            yield name, tensor
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        yield name, tensor


def checkpoint_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the checkpoint stores unquantized float tensors in: ``model.config.dtype``
    (the quantizer sets it; see ``QuantizationConfig.checkpoint_dtype``), or None to store them as they are."""
    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def gptq_scale_names(model: nn.Module) -> set[str]:
    """State-dict names of the QuantLinear ``scales``: float tensors that stay float16 in every checkpoint."""
    return {f"{name}.scales" for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def stored_checkpoint_format(model: nn.Module) -> str:
    """``checkpoint_format`` of the model's ``quantization_config`` (``gptq`` when it names none)."""
    quant = getattr(model.config, "quantization_config", None)
    fmt = quant.get("checkpoint_format") if isinstance(quant, dict) else getattr(quant, "checkpoint_format", None)
    return fmt or "gptq"


def _stored_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.dtype]]:
    """``(name, tensor, dtype it is stored in)``: unquantized float tensors (embeddings, norms, biases,
    ``lm_head``) in :func:`checkpoint_dtype`; the GPTQ tensors (fp16 ``scales`` included) as they are."""
    dtype = checkpoint_dtype(model)
    gptq = gptq_scale_names(model)
    for name, tensor in unique_state_items(model):
        cast = dtype is not None and tensor.is_floating_point() and name not in gptq
        yield name, tensor, dtype if cast else tensor.dtype


def checkpoint_tensors(model: nn.Module, skip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors to store: the state dict without tied copies (nor names under ``skip_prefix``),
    on the CPU, contiguous, in their stored dtypes (:func:`_stored_items`); ``qzeros`` in the v2
    layout (``zeros_to_v2``) when the checkpoint format is ``gptq_v2``."""
    v2_zeros = {}
    if stored_checkpoint_format(model) == "gptq_v2":
        v2_zeros = {f"{name}.qzeros": m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    tensors = {}
    for name, tensor, dtype in _stored_items(model):
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        if name in v2_zeros:
            tensor = zeros_to_v2(tensor, v2_zeros[name].bits, v2_zeros[name].out_features)
        tensors[name] = tensor.detach().to("cpu", dtype).contiguous()
    return tensors


def stored_bytes(model: nn.Module) -> int:
    """Bytes the model's tensors take in its checkpoint (what :func:`checkpoint_tensors` would write)."""
    return sum(tensor.numel() * dtype.itemsize for _, tensor, dtype in _stored_items(model))


def save_quantized(
    model: nn.Module,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with QuantLinear layers and ``config.quantization_config`` set) atomically."""
    target = check_output_dir(output_dir, overwrite)
    if not getattr(model.config, "quantization_config", None):
        raise CheckpointError("the model has no quantization_config; quantize it with neural_quantization first.")
    with staged_directory(target) as staging:
        write_model_directory(staging, checkpoint_tensors(model), model.config, model, tokenizer)
    return target


def write_model_directory(
    directory: Path, tensors: dict[str, torch.Tensor] | None, config: Any, model: nn.Module, tokenizer: Any = None
) -> None:
    """``model.safetensors`` (unless ``tensors`` is None: written by the caller) + ``config.json``
    (+ generation config and tokenizer) into ``directory``."""
    if tensors is not None:
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        try:
            generation_config.save_pretrained(directory)
        except ValueError:  # an invalid generation config must not block the checkpoint
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_streamed(
    model: nn.Module, work_dir: WorkDir, output_dir: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """Write the checkpoint of a run whose decoder layers were streamed (they are on ``meta`` in ``model``).

    The finished layers in ``work_dir`` become the shards ``model-00001-of-000NN.safetensors`` …
    (hard-linked where the file system allows, else copied), the rest of the model (embeddings,
    final norm, ``lm_head``) the last shard, with the standard ``model.safetensors.index.json``
    that transformers and vLLM read. Host memory stays near one layer's size.
    """
    target = check_output_dir(output_dir, overwrite)
    if not getattr(model.config, "quantization_config", None):
        raise CheckpointError("the model has no quantization_config; quantize it with neural_quantization first.")
    layers_name, layers = find_decoder_layers(model)
    missing = [i for i in range(len(layers)) if not work_dir.has_layer(i)]
    if missing:
        raise CheckpointError(
            f"work directory {work_dir.path} lacks layers {missing[:5]}; finish the run (resume it) before saving."
        )
    rest = checkpoint_tensors(model, skip_prefix=layers_name + ".")
    v2_bits = None
    if stored_checkpoint_format(model) == "gptq_v2":
        quant = model.config.quantization_config
        v2_bits = lambda name: module_width(quant, name)[0]  # noqa: E731
    count = len(layers) + 1
    shard_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map: dict[str, str] = {}
    total_size = 0
    with staged_directory(target) as staging:
        for index in range(len(layers)):
            source, shard = work_dir.layer_file(index), staging / shard_names[index]
            _store_layer_file(source, shard, checkpoint_dtype(model), v2_bits)
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    weight_map[name] = shard_names[index]
                    sliced = f.get_slice(name)
                    total_size += math.prod(sliced.get_shape()) * DTYPE_BYTES[sliced.get_dtype()]
        save_file(rest, str(staging / shard_names[-1]), metadata={"format": "pt"})
        for name, tensor in rest.items():
            weight_map[name] = shard_names[-1]
            total_size += tensor.numel() * tensor.element_size()
        index_json = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")
        write_model_directory(staging, None, model.config, model, tokenizer)
    return target




def _store_layer_file(source: Path, shard: Path, dtype: torch.dtype | None,
                      v2_bits: Callable[[str], int] | None = None) -> None:
    """A work directory's layer file as a checkpoint shard: hard-linked (or copied) when it is stored
    as it is, else rewritten (one layer in memory) with its float tensors cast to ``dtype`` and, with
    ``v2_bits`` (a ``gptq_v2`` checkpoint: module name -> its width), its ``qzeros`` converted from
    the in-memory v1 layout."""
    with safe_open(str(source), framework="pt") as f:
        recast = {name for name in f.keys() if dtype is not None and name.rsplit(".", 1)[-1] not in TENSOR_NAMES
                  and f.get_slice(name).get_dtype() in FLOAT_DTYPES
                  and f.get_slice(name).get_dtype() != _SAFETENSORS_DTYPE[dtype]}
        zeros = {name for name in f.keys() if v2_bits is not None and name.endswith(".qzeros")}
        if recast or zeros:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    if not recast and not zeros:
        try:
            os.link(source, shard)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(source, shard)
        return
    for name in recast:
        tensors[name] = tensors[name].to(dtype)
    for name in zeros:
        out_features = tensors[name[: -len("qzeros")] + "scales"].shape[1]
        tensors[name] = zeros_to_v2(tensors[name], v2_bits(name[: -len(".qzeros")]), out_features)
    save_file(tensors, str(shard), metadata={"format": "pt"})


_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def attach_save_pretrained(model: nn.Module, tokenizer: Any = None, work_dir: WorkDir | None = None) -> nn.Module:
    """Make ``model.save_pretrained(dir, overwrite=False)`` write our checkpoint (with the tokenizer).

    With ``work_dir`` (a run with streamed weights) the layers come from the work directory.
    """

    def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, overwrite: bool = False, **_: Any) -> Path:
        if work_dir is not None:
            return save_streamed(self, work_dir, save_directory, tokenizer=tokenizer, overwrite=overwrite)
        return save_quantized(self, save_directory, tokenizer=tokenizer, overwrite=overwrite)

    model.save_pretrained = types.MethodType(save_pretrained, model)
    return model


def read_quantization_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``quantization_config`` of a checkpoint directory that :func:`load_quantized` reads, after
    :func:`validate_checkpoint`; for compressed-tensors checkpoints its GPTQ equivalent
    (``export/compressed_tensors_reader.py``); for a GGUF file what its model will say
    (``export/gguf_reader.gguf_quantization_config``)."""
    gguf_file = find_gguf_file(checkpoint_dir)
    if gguf_file is not None:
        return gguf_quantization_config(gguf_file)
    if is_compressed_tensors(checkpoint_dir):
        return gptq_view_of_config(checkpoint_dir)
    return validate_checkpoint(checkpoint_dir).quantization_config


def validate_checkpoint(checkpoint_dir: str | os.PathLike, check_values: bool = True) -> CheckpointInventory:
    """Check that ``checkpoint_dir`` is a whole, consistent GPTQ checkpoint before anything loads it.

    First the files alone (``formats/integrity.py``: config fields, safetensors sizes against their
    headers, GPTQ tensor shapes and dtypes, finite scales), then the tensors against the model that
    ``config.json`` builds (on ``meta``, no memory): every tensor must belong to that model with the
    model's shape (a quantized layer by its ``in_features`` / ``out_features``), and every tensor
    the model needs must be there. Raises :class:`CheckpointError` naming the first problem.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    inventory = inspect_checkpoint(checkpoint_dir, check_values=check_values)
    path = inventory.path
    try:
        config = AutoConfig.from_pretrained(path)
        del config.quantization_config
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path / 'config.json'} does not describe a model transformers can build ({first}).") \
            from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    quantized = sorted(name[: -len(".qweight")] for name in inventory.tensors if name.endswith(".qweight"))
    modules = dict(model.named_modules())
    for name in quantized:
        module = modules.get(name)
        entry = inventory.tensors[f"{name}.qweight"]
        g_idx = inventory.tensors.get(f"{name}.g_idx")
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"{entry.file}: quantized layer {name} is not a linear layer of the "
                                  f"{type(model).__name__} that config.json describes (another model's checkpoint?).")
        in_features = g_idx.shape[0] if g_idx is not None else module.in_features
        if (in_features, entry.shape[1]) != (module.in_features, module.out_features):
            raise CheckpointError(
                f"{entry.file}: quantized layer {name} is {in_features}->{entry.shape[1]}, but config.json's model "
                f"has {module.in_features}->{module.out_features} there (another model's checkpoint?)."
            )
    covered = {f"{name}.weight" for name in quantized}
    for name, entry in inventory.tensors.items():
        layer = name.rsplit(".", 1)[0]
        if layer in quantized and name.rsplit(".", 1)[1] in TENSOR_NAMES:
            continue
        if name not in expected:
            raise CheckpointError(f"{entry.file}: tensor {name} is not part of the {type(model).__name__} that "
                                  "config.json describes (another model's checkpoint?).")
        if entry.shape != expected[name]:
            raise CheckpointError(f"{entry.file}: tensor {name} has shape {list(entry.shape)}, config.json's model "
                                  f"needs {list(expected[name])} (another model's checkpoint?).")
    tied = _tied_parameter_names(model)
    absent = [name for name in expected if name not in inventory.tensors and name not in covered and name not in tied
              and not name.endswith("inv_freq")]
    if absent:
        raise CheckpointError(f"{path} lacks tensor {absent[0]}"
                              + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
                              + " that config.json's model needs; the checkpoint is incomplete.")
    return inventory


def load_quantized(
    checkpoint_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    kernel_backend: str = "auto",
    dtype: torch.dtype | None = None,
    bits: int | None = None,
) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` into a transformers model with QuantLinear layers.

    ``bits``: None (or the stored width) loads the layers as stored; the narrow width of a nested
    cascade checkpoint (e.g. 4 for stages [8, 4]) loads its narrow read, derived exactly from the
    stored tensors (see the module docstring). Any other value raises :class:`CheckpointError`.

    Reads GPTQ checkpoints (``gptq`` and ``gptq_v2``; ours, GPTQModel's, AutoGPTQ's) and
    compressed-tensors ``pack-quantized`` ones (ours, llm-compressor's; converted to GPTQ tensors,
    ``export/compressed_tensors_reader.py``), and GGUF files (a ``.gguf`` path, or a directory with one
    ``.gguf`` and no quantized ``config.json``; see :func:`load_gguf`). A GPTQ directory is checked first
    (:func:`validate_checkpoint`). The model is built from
    ``config.json`` in ``dtype`` (default: the checkpoint's ``dtype``, the one its unquantized tensors
    are stored in), every module with a ``qweight`` tensor is replaced by a :class:`QuantLinear`, and
    the tensors are loaded as saved (unquantized floats cast to ``dtype``, which is exact from 16 bits
    to float32), so at the dtype the quantized model ran in its logits equal the in-memory model's.
    ``kernel_backend`` selects the matmul kernels.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(checkpoint_dir)
    gguf_file = find_gguf_file(path)
    if gguf_file is not None:
        return load_gguf(gguf_file, device, kernel_backend, dtype, bits)
    converted = is_compressed_tensors(path)
    if converted:  # converted to v1 GPTQ tensors in memory; a re-save writes a GPTQ checkpoint
        quant, state = read_compressed_tensors(path)
    else:
        quant = validate_checkpoint(path).quantization_config
        weights = CheckpointWeights(path)
        state = weights.read(weights.names())

    config = AutoConfig.from_pretrained(path)
    saved_quant = quant if converted else config.quantization_config
    del config.quantization_config  # build a plain model; the quantized layers are swapped in below
    stored_dtype = getattr(config, "dtype", None)
    model_dtype = dtype or stored_dtype or torch.float32
    if isinstance(model_dtype, str):
        model_dtype = getattr(torch, model_dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=model_dtype)
    config.quantization_config = saved_quant
    config.dtype = stored_dtype  # what a re-save stores, whatever dtype this copy runs in

    names = list(state)
    gptq_scales = {key[: -len(".qweight")] + ".scales" for key in names if key.endswith(".qweight")}
    for name, tensor in state.items():
        if tensor.is_floating_point() and name not in gptq_scales and tensor.dtype != model_dtype:
            state[name] = tensor.to(model_dtype)
    if quant.get("checkpoint_format") == "gptq_v2" and not converted:
        _zeros_v2_to_v1(state, quant, path)
    load_bits = _bits_to_load(quant, bits, path)
    if load_bits != quant["bits"]:
        for name in [key[: -len(".qweight")] for key in names if key.endswith(".qweight")]:
            _narrow_state(state, name, quant, load_bits, model.get_submodule(name).in_features)
    widths = (lambda name: module_width(quant, name)) if quant.get("dynamic") else None
    swap_in_quant_linears(model, state, load_bits, quant["group_size"], kernel_backend, widths=widths)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = _tied_parameter_names(model)
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.to(device)
    model.eval()
    return attach_save_pretrained(model)


def load_gguf(
    file: str | os.PathLike,
    device: str | torch.device = "cpu",
    kernel_backend: str = "auto",
    dtype: torch.dtype | None = None,
    bits: int | None = None,
) -> nn.Module:
    """Load a ``.gguf`` file into a transformers model: Q4_0 / Q8_0 decoder linears as QuantLinear
    layers with the file's codes and scales, everything else dequantized (``export/gguf_reader.py``).

    The config (and so the model class) comes from the file's metadata through transformers' GGUF
    support. ``dtype`` (default: float32 on the CPU, bfloat16 on an accelerator, as ``load_model``
    loads a GGUF) is the dtype of the float tensors; QuantLinear scales stay the blocks' fp16.
    ``config.quantization_config`` is the GPTQ equivalent of the kept layers with ``converted_from``
    (None when no layer was kept: the model is then a float model, and saving it is refused), so
    ``save_pretrained`` writes a GPTQ checkpoint of the same codes.
    """
    from neural_quantization.nn.modules import resolve_device

    file = Path(file)
    config = gguf_config(file)
    target = resolve_device(device)
    model_dtype = dtype or (torch.float32 if target.type == "cpu" else torch.bfloat16)
    model = empty_model(config, model_dtype)
    quant, state = read_gguf(file, model, model_dtype)
    stored = quant.get("bits")
    if bits is not None and bits != stored:
        raise CheckpointError(f"{file} holds {stored or 'no'}-bit Q4_0/Q8_0 layers; load it with bits=None"
                              + (f" or bits={stored}." if stored else "."))
    if stored:
        widths = (lambda name: module_width(quant, name)) if quant.get("dynamic") else None
        swap_in_quant_linears(model, state, stored, quant["group_size"], kernel_backend, widths=widths)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if m not in _tied_parameter_names(model)]
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match the {type(model).__name__} its metadata describes: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]} (a GGUF from another converter?).")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if empty:
        raise CheckpointError(f"{file} has no tensor for {empty[:3]} of the {type(model).__name__} its metadata "
                              "describes (a GGUF from another converter?).")
    model.config.quantization_config = quant if stored else None
    model.config.dtype = model_dtype  # what a re-save stores the float tensors in
    model.to(target)
    model.eval()
    return attach_save_pretrained(model)


def _zeros_v2_to_v1(state: dict[str, torch.Tensor], quant: dict[str, Any], path: Path) -> None:
    """``qzeros`` of a ``gptq_v2`` checkpoint in the v1 layout that ``QuantLinear`` holds, in place."""
    for name in [key for key in state if key.endswith(".qzeros")]:
        out_features = state[name[: -len("qzeros")] + "scales"].shape[1]
        try:
            state[name] = zeros_from_v2(state[name], module_width(quant, name[: -len(".qzeros")])[0], out_features)
        except ValueError as err:
            raise CheckpointError(
                f"{path}: {name}: {err}. Re-quantize with neural-quantize, or load the checkpoint with GPTQModel."
            ) from None


def _bits_to_load(quant: dict[str, Any], bits: int | None, path: Path) -> int:
    """The width to load: the stored one, or the narrow read of a nested checkpoint."""
    stored = quant["bits"]
    if bits is None or bits == stored:
        return stored
    nested = (quant.get("neural_quantization") or {}).get("nested")
    if nested and bits == nested.get("narrow_bits") and nested.get("stored_bits") == stored:
        return bits
    readable = [stored] + ([nested["narrow_bits"]] if nested else [])
    raise CheckpointError(
        f"{path} stores {stored}-bit codes and can be loaded at bits={readable}; "
        + ("" if nested else "only nested cascade checkpoints (cascade_mode='nested') have a narrower read.")
    )


def _narrow_state(state: dict[str, torch.Tensor], name: str, quant: dict[str, Any], bits: int, in_features: int) -> None:
    """Replace the stored wide tensors of module ``name`` in ``state`` by their ``bits``-bit read."""
    from neural_quantization.core.cascade import narrow_view
    from neural_quantization.formats.gptq import from_gptq_tensors, to_gptq_tensors

    wide = from_gptq_tensors(
        state[f"{name}.qweight"], state[f"{name}.qzeros"], state[f"{name}.scales"], state[f"{name}.g_idx"],
        quant["bits"], quant["group_size"], in_features,
    )
    for key, tensor in to_gptq_tensors(narrow_view(wide, bits)).items():
        state[f"{name}.{key}"] = tensor


def _tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (e.g. a tied ``lm_head.weight``)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    output = model.get_output_embeddings()
    if output is None:
        return set()
    return {name + ".weight" for name, module in model.named_modules() if module is output}
