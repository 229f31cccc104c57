"""A diffusers pipeline's denoiser: finding it, and saving / loading it quantized.

The denoiser is the component that runs at every sampling step: ``pipe.transformer`` (DiT
pipelines: PixArt, SD3, FLUX, Sana) or ``pipe.unet`` (SD 1.x/2.x, SDXL). Everything else (text
encoders, VAE, scheduler) stays as diffusers loaded it.

Saved layout: ``pipe.save_pretrained(directory)`` as diffusers writes it, where the denoiser's
weights file holds, for each quantized linear, the GPTQ tensors of ``formats/gptq.py``
(``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias``) instead of ``weight``/``bias``, plus
``<denoiser>/quantization.json``::

    {"quant_method": "gptq", "producer": "neural-quantization <version>", "bits": 4, "group_size": 64,
     "sym": true, "method": "gptq", "modules": {"transformer_blocks.0.attn1.to_q": [4, 64], ...},
     "calibration": {...}}

``modules`` lists every quantized linear with its (bits, group size). diffusers' own
``from_pretrained`` cannot read these tensors (its ``quantization_config`` names bitsandbytes,
GGUF, torchao or quanto), so :func:`load_quantized_pipeline` builds the denoiser from its config
with empty weights, swaps in :class:`QuantLinear` layers and loads the tensors, then hands it to
``DiffusionPipeline.from_pretrained`` for the other components.

For diffusers' own loader, :func:`export_gguf` writes the quantized denoiser as one GGUF file
(Q4_0 / Q8_0 blocks holding the GPTQ codes; ``export/diffusers_gguf.py``), which
``<Class>.from_single_file(file, config=<this directory>, subfolder=<denoiser>,
quantization_config=GGUFQuantizationConfig(...))`` loads for the classes diffusers single-file
loads (UNet2DConditionModel, SD3, FLUX.1, Sana, …; not PixArt).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neural_quantization._version import __version__

DENOISER_NAMES = ("transformer", "unet")
QUANT_FILE = "quantization.json"


class PipelineError(ValueError):
    """A pipeline or directory this module cannot work with (exit 2 on the command line)."""


def denoiser_name(pipe: Any) -> str:
    """``"transformer"`` or ``"unet"``: which component of ``pipe`` is its denoiser."""
    for name in DENOISER_NAMES:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    components = ", ".join(sorted(getattr(pipe, "components", {}) or {})) or "none"
    raise PipelineError(f"{type(pipe).__name__} has no denoiser this toolkit quantizes (a `transformer` or `unet` "
                        f"component; it has: {components}). Pass a text-to-image pipeline such as "
                        "StableDiffusionPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline or FluxPipeline.")


def is_quantized_pipeline(directory: str | Path) -> bool:
    path = Path(directory)
    return path.is_dir() and any((path / name / QUANT_FILE).is_file() for name in DENOISER_NAMES)


def load_pipeline(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  **kwargs: Any) -> Any:
    """A float pipeline from a hub id or local directory (``DiffusionPipeline.from_pretrained``), or
    our quantized one (:func:`load_quantized_pipeline`) where ``source`` is a directory we saved."""
    if is_quantized_pipeline(source):
        return load_quantized_pipeline(source, device, dtype)
    from diffusers import DiffusionPipeline

    path = Path(source)
    if not path.exists() and (str(source).startswith((".", "/")) or str(source).count("/") != 1):
        raise PipelineError(f"pipeline {source!s} is neither a local directory nor a Hugging Face id (owner/name); "
                            "give the directory diffusers saved or an id like PixArt-alpha/PixArt-XL-2-512x512.")
    pipe = DiffusionPipeline.from_pretrained(str(source), torch_dtype=dtype, **kwargs)
    denoiser_name(pipe)
    return pipe.to(device)


def save_quantized_pipeline(pipe: Any, directory: str | Path, record: dict[str, Any]) -> Path:
    """Save ``pipe`` (its denoiser quantized) and the quantization record; returns the directory."""
    directory = Path(directory)
    pipe.save_pretrained(directory)
    name = denoiser_name(pipe)
    (directory / name / QUANT_FILE).write_text(json.dumps(
        {"quant_method": "gptq", "producer": f"neural-quantization {__version__}", **record}, indent=1) + "\n",
        encoding="utf-8")
    return directory


def _denoiser_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PipelineError(f"{folder} holds no .safetensors weights; save the pipeline with "
                            "save_quantized_pipeline (or `neural-quantize quantize-pipeline`).")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def load_quantized_denoiser(folder: str | Path, device: str | torch.device = "cpu",
                            dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """The quantized denoiser saved in ``folder`` (``<pipeline>/transformer`` or ``/unet``); its float
    tensors in ``dtype`` (None: as stored)."""
    import diffusers
    from accelerate import init_empty_weights

    from neural_quantization.nn.qlinear import swap_in_quant_linears

    folder = Path(folder)
    record = json.loads((folder / QUANT_FILE).read_text(encoding="utf-8"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise PipelineError(f"{folder}/config.json names class {config.get('_class_name')!r}, which this diffusers "
                            f"({diffusers.__version__}) does not have; install the diffusers version that wrote it.")
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(cls.load_config(str(folder)))
    state = _denoiser_state(folder)
    modules = {name: tuple(widths) for name, widths in record["modules"].items()}
    replaced = swap_in_quant_linears(model, state, record["bits"], record["group_size"],
                                     widths=lambda name: modules[name])
    missing = set(modules) - set(replaced)
    if missing:
        raise PipelineError(f"{folder}: {len(missing)} quantized layers of {QUANT_FILE} have no tensors in the weights "
                            f"file (first: {sorted(missing)[0]}); the directory is incomplete, quantize it again.")
    float_state = {key: (value.to(dtype) if dtype is not None and value.is_floating_point()
                         and not _is_gptq_tensor(key, modules) else value)
                   for key, value in state.items()}
    model.load_state_dict(float_state, assign=True, strict=True)
    return model.to(device).eval()


def _is_gptq_tensor(key: str, modules: dict[str, tuple]) -> bool:
    """Whether ``key`` is one of a quantized layer's GPTQ tensors (kept in their stored dtypes)."""
    layer, _, leaf = key.rpartition(".")
    return layer in modules and leaf in ("qweight", "qzeros", "scales", "g_idx")


def load_quantized_pipeline(directory: str | Path, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32) -> Any:
    """A pipeline saved by :func:`save_quantized_pipeline`: its quantized denoiser on our
    ``QuantLinear`` layers (kernels on a GPU), the other components by diffusers."""
    from diffusers import DiffusionPipeline

    directory = Path(directory)
    if not is_quantized_pipeline(directory):
        raise PipelineError(f"{directory} is not a quantized pipeline (no transformer/{QUANT_FILE} or "
                            f"unet/{QUANT_FILE}); quantize one with `neural-quantize quantize-pipeline`.")
    name = next(n for n in DENOISER_NAMES if (directory / n / QUANT_FILE).is_file())
    denoiser = load_quantized_denoiser(directory / name, device, dtype)
    pipe = DiffusionPipeline.from_pretrained(str(directory), torch_dtype=dtype, **{name: denoiser})
    return pipe.to(device)


def quantization_record(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    for name in DENOISER_NAMES:
        if (directory / name / QUANT_FILE).is_file():
            return json.loads((directory / name / QUANT_FILE).read_text(encoding="utf-8"))
    raise PipelineError(f"{directory} is not a quantized pipeline")


def export_gguf(source: Any, path: str | Path, record: dict[str, Any] | None = None, float_type: str = "auto") -> Any:
    """Write the quantized denoiser of ``source`` as a GGUF file that diffusers loads with
    ``<Class>.from_single_file(path, config=<pipeline dir>, subfolder=<denoiser>,
    quantization_config=GGUFQuantizationConfig(...))`` (layout: ``export/diffusers_gguf.py``).

    ``source``: a pipeline quantized in memory (:func:`quantize_pipeline`; ``record`` is then
    its ``quantization.json`` content, optional) or a directory saved by
    :func:`save_quantized_pipeline` (its record is read). Returns the
    :class:`~neural_quantization.export.diffusers_gguf.DenoiserGGUFReport`."""
    from neural_quantization.export.diffusers_gguf import write_denoiser_gguf

    if isinstance(source, (str, Path)):
        record = quantization_record(source)
        name = next(n for n in DENOISER_NAMES if (Path(source) / n / QUANT_FILE).is_file())
        denoiser = load_quantized_denoiser(Path(source) / name, dtype=None)
    else:
        denoiser = getattr(source, denoiser_name(source))
    return write_denoiser_gguf(denoiser, path, record, float_type)
