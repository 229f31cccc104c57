"""Export a GPTQ-quantized diffusers denoiser as a GGUF file that diffusers' own GGUF loader reads.

diffusers loads a GGUF denoiser with ``<Class>.from_single_file(file, config=<diffusers directory>,
subfolder="transformer" | "unet", quantization_config=GGUFQuantizationConfig(compute_dtype=...))``.
What its code does (checked against diffusers 0.42.1) decides the layout:

* ``models/model_loading_utils.load_gguf_checkpoint`` reads every tensor by its name: F32 and F16
  as plain tensors, every other type as a ``GGUFParameter`` (the raw block bytes and their
  ``quant_type``). It reads no metadata: the model's config comes from ``config=`` and
  ``subfolder=`` (a local directory works offline), and the file must end in ``.gguf``
  (``load_state_dict`` picks the reader by extension).
* ``loaders/single_file_model.FromOriginalModelMixin.from_single_file`` serves only the classes of
  ``SINGLE_FILE_LOADABLE_CLASSES`` (among denoisers: UNet2DConditionModel, SD3Transformer2DModel,
  FluxTransformer2DModel, SanaTransformer2DModel, …; not PixArtTransformer2DModel, which lacks the
  mixin). Where the file's tensor names are exactly the model's ``state_dict()`` keys,
  ``_should_convert_state_dict_to_diffusers`` is false and the class's converter from the original
  layout (LDM, BFL, …) is skipped: so we write diffusers' own names and no converter is involved.
* ``quantizers/gguf/utils._replace_with_gguf_linear`` swaps an ``nn.Linear`` whose ``weight`` is a
  ``GGUFParameter`` for a ``GGUFLinear``, which dequantizes at every call
  (``dequantize_blocks_Q4_0``: ``fp16(d) · (v − 8)`` computed in fp16, then cast to
  ``compute_dtype``). A quantized tensor of any other module would be set on it as raw bytes, so
  only linear weights are written quantized. Linears inside the class's ``_keep_in_fp32_modules``
  are dequantized by the loader (``GGUFQuantizer.create_quantized_param``); the report lists them.

The file therefore holds, under the denoiser's state-dict names, every quantized linear's
``weight`` as Q4_0 / Q8_0 blocks made from its GPTQ codes by the LLM export's packing
(``export/gguf.weight_blocks``: exact for Q4_0; Q8_0 codes −128 are clamped to −127 and counted),
and every other tensor (biases, convolutions, norms, embeddings, linears left in float) as F32, or
F16 where the tensor is float16 (``float_type="auto"``: the numbers of our checkpoint, unchanged).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neural_quantization.config import QuantizationConfig
from neural_quantization.export.gguf import (
    BLOCK,
    GGUF_TYPE_FOR_BITS,
    RECORD_KEY,
    GGUFExportError,
    GGUFExportReport,
    finish_file,
    weight_blocks,
)
from neural_quantization.nn.qlinear import QuantLinear

#: ``general.architecture``: the tensor names are diffusers' state-dict keys (ComfyUI-GGUF, which
#: expects the original layouts under "flux", "sd1", …, refuses an unknown architecture instead of
#: misreading the names)
ARCH = "diffusers"
CLASS_KEY = "diffusers.class_name"  # string: the denoiser's diffusers class
CONFIG_KEY = "diffusers.config"  # string: its config.json (diffusers' loader reads config= instead)
FLOAT_TYPES = ("auto", "f16", "f32")


@dataclass
class DenoiserGGUFReport(GGUFExportReport):
    """:class:`GGUFExportReport` plus the denoiser's class and the linears diffusers dequantizes on load."""

    class_name: str = ""
    float_type: str = "auto"
    dequantized_on_load: list[str] = field(default_factory=list)


def check_gguf_config(config: QuantizationConfig) -> str:
    """The GGUF type ("Q4_0" / "Q8_0") of a denoiser quantized with ``config``; raise
    :class:`GGUFExportError` with the ``quantize-pipeline`` flags that fit when none holds it exactly."""
    fix = ("quantize with --bits 4 (Q4_0) or --bits 8 (Q8_0), --group-size 32 and the symmetric grid (no --asym), "
           "or leave out --gguf")
    if config.bits not in GGUF_TYPE_FOR_BITS:
        raise GGUFExportError(f"--gguf writes Q4_0 or Q8_0 blocks; bits={config.bits} has no GGUF block type with "
                              f"the same grid: {fix}.")
    if config.group_size != BLOCK:
        raise GGUFExportError(f"GGUF Q4_0/Q8_0 blocks hold {BLOCK} weights with one scale, so GPTQ must run with "
                              f"--group-size {BLOCK} (got {config.group_size}): {fix}.")
    if not config.sym:
        raise GGUFExportError(f"GGUF Q4_0/Q8_0 blocks have no zero point (symmetric), got --asym: {fix}.")
    if config.desc_act and not config.static_groups:
        raise GGUFExportError("GGUF blocks are contiguous runs of 32 input columns; act-order without static groups "
                              "reorders them. Quantize with static_groups=True (the default) or desc_act=False.")
    return GGUF_TYPE_FOR_BITS[config.bits]


def check_gguf_path(path: str | os.PathLike) -> Path:
    """``path`` as a new ``.gguf`` file to write, or :class:`GGUFExportError` (reads only)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise GGUFExportError("--gguf needs the gguf package (diffusers' GGUF loader needs it too): "
                              "pip install 'gguf>=0.10' (or the export extra).")
    target = Path(path).expanduser()
    if target.suffix != ".gguf":
        raise GGUFExportError(f"--gguf {path}: name the file *.gguf (diffusers picks its GGUF reader by the "
                              f"extension), e.g. --gguf {target.with_suffix('.gguf').name}.")
    if target.exists() or target.is_symlink():
        raise GGUFExportError(f"--gguf {path} already exists; remove it or name a new file.")
    if target.parent.exists() and not target.parent.is_dir():
        raise GGUFExportError(f"--gguf {path}: {target.parent} is not a directory.")
    return target


def single_file_problem(cls: type) -> str | None:
    """Why diffusers cannot load a ``cls`` denoiser from a single (GGUF) file, or None.

    The rule of ``_get_single_file_loadable_mapping_class`` (``loaders/single_file_model.py``):
    ``cls`` or a base class is a key of ``SINGLE_FILE_LOADABLE_CLASSES``."""
    import diffusers
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    if hasattr(cls, "from_single_file") and any(base.__name__ in SINGLE_FILE_LOADABLE_CLASSES for base in cls.__mro__):
        return None
    denoisers = sorted(name for name in SINGLE_FILE_LOADABLE_CLASSES
                       if name.endswith(("Transformer2DModel", "UNet2DConditionModel")))
    return (f"diffusers {diffusers.__version__} cannot load a {cls.__name__} from a single file, so a GGUF of it "
            "would not load: from_single_file serves only the classes of diffusers.loaders.single_file_model."
            f"SINGLE_FILE_LOADABLE_CLASSES (text-to-image denoisers: {', '.join(denoisers)}). Leave out --gguf and "
            "load the quantized pipeline with neural_quantization.diffusion.load_quantized_pipeline, or quantize a "
            "pipeline whose denoiser is one of those (SD 1.x/2.x/SDXL UNets, SD3, FLUX.1, Sana).")


def check_denoiser(denoiser: nn.Module, linear_names: list[str] | None = None) -> None:
    """Refuse, before quantization, a denoiser whose GGUF diffusers could not load or whose linears
    ``linear_names`` (those to be quantized) cannot be whole Q4_0/Q8_0 blocks."""
    problem = single_file_problem(type(denoiser))
    if problem:
        raise GGUFExportError(problem)
    names = linear_names if linear_names is not None else [n for n, m in denoiser.named_modules()
                                                           if isinstance(m, (nn.Linear, QuantLinear))]
    odd = [(name, denoiser.get_submodule(name).in_features) for name in names
           if denoiser.get_submodule(name).in_features % BLOCK]
    if odd:
        name, k = odd[0]
        raise GGUFExportError(f"{len(odd)} linear layers have in_features that are not a multiple of {BLOCK} "
                              f"(first: {name}, in_features={k}); GGUF blocks hold whole runs of {BLOCK} input "
                              f"columns. Leave them in float with --skip {' '.join(sorted({n for n, _ in odd}))}.")


def _diffusers_keys(denoiser: nn.Module) -> list[str]:
    """The state-dict keys diffusers' ``from_single_file`` builds for this denoiser's class and config."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = type(denoiser).from_config(denoiser.config)
    return list(model.state_dict())


def _float_array(key: str, tensor: torch.Tensor, float_type: str) -> np.ndarray:
    if not tensor.is_floating_point():
        raise GGUFExportError(f"{key} is a {tensor.dtype} tensor; diffusers' GGUF loader would read it as quantized "
                              "blocks. Only float tensors can be written; this denoiser is not supported.")
    if tensor.dim() == 0:
        raise GGUFExportError(f"{key} is a scalar; GGUF tensors have at least one dimension.")
    half = float_type == "f16" and tensor.dim() > 1 or float_type == "auto" and tensor.dtype == torch.float16
    return tensor.detach().cpu().to(torch.float16 if half else torch.float32).numpy()


def write_denoiser_gguf(denoiser: nn.Module, path: str | os.PathLike, record: dict[str, Any] | None = None,
                        float_type: str = "auto") -> DenoiserGGUFReport:
    """Write ``denoiser`` (a diffusers model whose linears are :class:`QuantLinear`) to the GGUF file
    ``path`` (written under a temporary name, renamed into place); ``record`` (our
    ``quantization.json``) goes into the metadata as JSON under ``neural_quantization.record``.

    ``float_type``: the type of the tensors that are not quantized: "auto" (F16 for float16
    tensors, F32 for the others: lossless), "f16" (F16 for 2-D and larger, F32 for 1-D, as
    llama.cpp's converter does) or "f32".
    """
    import gguf

    if float_type not in FLOAT_TYPES:
        raise GGUFExportError(f"float_type={float_type!r}; use one of {', '.join(FLOAT_TYPES)}.")
    cls = type(denoiser)
    problem = single_file_problem(cls)
    if problem:
        raise GGUFExportError(problem)
    quantized = {name: m for name, m in denoiser.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise GGUFExportError(f"the {cls.__name__} has no quantized linear layer; quantize it first "
                              "(neural_quantization.diffusion.quantize_pipeline or `neural-quantize quantize-pipeline`).")
    for name, layer in quantized.items():
        if layer.bits not in GGUF_TYPE_FOR_BITS or layer.group_size != BLOCK:
            raise GGUFExportError(f"{name} has {layer.bits}-bit codes in groups of {layer.group_size}; GGUF Q4_0/Q8_0 "
                                  f"need 4 or 8 bits in groups of {BLOCK}: quantize with --bits 4 or 8 --group-size "
                                  f"{BLOCK}.")

    target = Path(path)
    report = DenoiserGGUFReport(path=str(target), gguf_type="", file_bytes=0, class_name=cls.__name__,
                                float_type=float_type, metadata_source=f"{cls.__name__} config")
    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    for name, layer in quantized.items():
        gguf_type = GGUF_TYPE_FOR_BITS[layer.bits]
        try:
            data, clamped = weight_blocks(layer, gguf_type)
        except GGUFExportError as err:
            raise GGUFExportError(f"{name}: {err}") from None
        tensors[f"{name}.weight"] = (data, getattr(gguf.GGMLQuantizationType, gguf_type))
        report.clamped_codes += clamped
        report.total_codes += layer.in_features * layer.out_features
        report.quantized_tensors += 1
        report.tensor_types[gguf_type] = report.tensor_types.get(gguf_type, 0) + 1
    gptq = {f"{name}.{leaf}" for name in quantized for leaf in ("qweight", "qzeros", "scales", "g_idx")}
    for key, tensor in denoiser.state_dict().items():
        if key in gptq:
            continue
        array = _float_array(key, tensor, float_type)
        tensors[key] = (array, None)
        kind = "F16" if array.dtype == np.float16 else "F32"
        report.tensor_types[kind] = report.tensor_types.get(kind, 0) + 1

    # the names must be exactly diffusers' keys: then from_single_file loads them without conversion
    expected = _diffusers_keys(denoiser)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise GGUFExportError(f"the {cls.__name__}'s tensors differ from the keys diffusers builds from its config "
                              f"(missing {missing[:3]}, extra {extra[:3]}); diffusers would try to convert them from "
                              "another layout. Export the denoiser as quantized by this package, unmodified.")
    keep = cls._keep_in_fp32_modules or []
    keep = [keep] if isinstance(keep, str) else list(keep)
    report.dequantized_on_load = [name for name in quantized if any(m in name.split(".") for m in keep)]
    counts = {t: n for t, n in report.tensor_types.items() if t in GGUF_TYPE_FOR_BITS.values()}
    report.gguf_type = max(counts, key=counts.get)
    file_type = gguf.LlamaFileType.MOSTLY_Q4_0 if report.gguf_type == "Q4_0" else gguf.LlamaFileType.MOSTLY_Q8_0

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex}")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        writer.add_name(str(denoiser.config.get("_name_or_path") or cls.__name__))
        writer.add_string(CLASS_KEY, cls.__name__)
        writer.add_string(CONFIG_KEY, denoiser.to_json_string())
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if record is not None:
            writer.add_string(RECORD_KEY, json.dumps(record, sort_keys=True))
        for key in expected:  # the model's own order
            data, raw_dtype = tensors[key]
            writer.add_tensor(key, data, raw_dtype=raw_dtype)
        finish_file(writer, tmp, target)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    report.file_bytes = target.stat().st_size
    return report
