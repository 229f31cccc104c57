"""Save and load quantized checkpoints (GPTQ-compatible, ``checkpoint_format: "gptq"``).

A checkpoint directory holds

* ``model.safetensors``: every tensor of the model's ``state_dict`` (runs with streamed weights write
  the same tensors as shards, one per decoder layer plus one for the rest, with
  ``model.safetensors.index.json``; see :func:`save_streamed`). Quantized linear layers appear
  as ``<module>.qweight / .qzeros / .scales / .g_idx (/ .bias)`` in the layout of
  ``formats/gptq.py``; everything else (embeddings, norms, ``lm_head``) as in the original model.
  Tied weights are stored once (transformers re-ties them on load).
* ``config.json``: the model's config plus ``quantization_config``::

      {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 128,
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
the end, so an interrupted save never leaves a half-written checkpoint under the requested name.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from neural_quantization import __version__
from neural_quantization.config import QuantizationConfig
from neural_quantization.models.discovery import find_decoder_layers
from neural_quantization.models.layer_storage import INDEX_FILE, CheckpointWeights, WorkDir
from neural_quantization.nn.qlinear import swap_in_quant_linears

WEIGHTS_NAME = "model.safetensors"


class OutputExistsError(FileExistsError):
    """The output directory exists and overwriting was not asked for."""


class CheckpointError(ValueError):
    """A directory is not a checkpoint this package can load."""


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before hours of work) when ``output_dir`` exists and ``overwrite`` is off."""
    path = Path(output_dir)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"output directory {path} already exists; choose another --output-dir or pass --overwrite "
            "(overwrite=True) to replace it."
        )
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory; choose another --output-dir.")
    return path


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
        "checkpoint_format": "gptq",
        "bits": stored_bits,
        "group_size": config.group_size,
        "desc_act": config.desc_act,
        "sym": sym,
        "static_groups": config.static_groups,
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "lm_head": config.quantize_lm_head,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"neural-quantization:{__version__}"]},
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


def checkpoint_tensors(model: nn.Module, skip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors to store: the state dict without tied copies (nor names under ``skip_prefix``),
    on the CPU, contiguous."""
    return {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in unique_state_items(model)
        if skip_prefix is None or not name.startswith(skip_prefix)
    }


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


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty sibling directory of ``target``; rename it to ``target`` when the block succeeds.

    On any error the staging directory is removed and ``target`` is left as it was, so a crash
    never leaves a half-written checkpoint under the requested name.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
    count = len(layers) + 1
    shard_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map: dict[str, str] = {}
    total_size = 0
    with staged_directory(target) as staging:
        for index in range(len(layers)):
            source, shard = work_dir.layer_file(index), staging / shard_names[index]
            try:
                os.link(source, shard)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(source, shard)
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    weight_map[name] = shard_names[index]
                    sliced = f.get_slice(name)
                    total_size += math.prod(sliced.get_shape()) * _DTYPE_BYTES[sliced.get_dtype()]
        save_file(rest, str(staging / shard_names[-1]), metadata={"format": "pt"})
        for name, tensor in rest.items():
            weight_map[name] = shard_names[-1]
            total_size += tensor.numel() * tensor.element_size()
        index_json = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")
        write_model_directory(staging, None, model.config, model, tokenizer)
    return target


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


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
    """The ``quantization_config`` of a checkpoint directory, validated."""
    path = Path(checkpoint_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; pass the directory written by `neural-quantize`.")
    quant = json.loads(config_file.read_text()).get("quantization_config")
    if not quant or quant.get("quant_method") != "gptq":
        raise CheckpointError(f"{path} is not a GPTQ checkpoint (config.json has no gptq quantization_config).")
    if quant.get("checkpoint_format", "gptq") != "gptq":
        raise CheckpointError(
            f"{path} uses checkpoint_format={quant.get('checkpoint_format')!r}; only 'gptq' is supported."
        )
    return quant


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

    The model is built from ``config.json``, every module with a ``qweight`` tensor is replaced by
    a :class:`QuantLinear`, and all tensors are loaded as saved, so the logits equal those of the
    in-memory quantized model. ``kernel_backend`` selects the matmul kernels.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(checkpoint_dir)
    quant = read_quantization_config(path)
    try:
        weights = CheckpointWeights(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME} (or {INDEX_FILE}); the checkpoint is incomplete.") from None

    config = AutoConfig.from_pretrained(path)
    saved_quant = config.quantization_config
    del config.quantization_config  # build a plain model; the quantized layers are swapped in below
    model_dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(model_dtype, str):
        model_dtype = getattr(torch, model_dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=model_dtype)
    config.quantization_config = saved_quant

    names = weights.names()
    state = weights.read(names)
    load_bits = _bits_to_load(quant, bits, path)
    if load_bits != quant["bits"]:
        for name in [key[: -len(".qweight")] for key in names if key.endswith(".qweight")]:
            _narrow_state(state, name, quant, load_bits, model.get_submodule(name).in_features)
    swap_in_quant_linears(model, state, load_bits, quant["group_size"], kernel_backend)
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
