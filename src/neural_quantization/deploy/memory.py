"""How much memory a model needs to run, and on which devices it fits.

    needed = weights + KV cache + runtime overhead

* **weights**: measured, the sizes of the checkpoint's weight files on disk (``*.safetensors``,
  ``*.bin``, ``*.gguf``), per format, since a runtime holds them in memory as stored (packed int4
  codes, fp16 scales, fp16 embeddings). From a config alone they are *estimated* with
  :func:`estimate_weight_bytes` (same layout arithmetic, no file).
* **KV cache**: ``2 (K and V) · layers · kv_heads · head_dim · context · batch · bytes`` with fp16
  elements (2 bytes) by default; every layer is counted with the full context (sliding-window
  layers would need less, so this is an upper bound for such models).
* **runtime overhead** (an assumption, stated): ``300 MiB`` fixed (CUDA / Metal context, runtime,
  kernels' workspaces) ``+ 10 %`` of weights + KV cache (activations, allocator fragmentation).

Worked example, Mistral-7B (32 layers, 8 KV heads of 128, context 4096, batch 1, fp16):
``2 · 32 · 8 · 128 · 4096 · 1 · 2 = 536,870,912`` bytes = 0.5 GiB of KV cache.

:func:`memory_report` puts it together for a checkpoint directory, a ``config.json`` or a ``.gguf``
file (its shapes from the GGUF metadata, through transformers' GGUF support) and checks it against
:data:`devices.DEVICES`; each device uses the weights of the format it should run
(GGUF for llama.cpp devices, GPTQ for Ampere+ GPUs).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neural_quantization.core.quantized_weight import num_groups
from neural_quantization.deploy.devices import DEVICES, Device
from neural_quantization.formats.gptq import gptq_layer_bytes
from neural_quantization.formats.packing import packed_length
from neural_quantization.formats.units import MIB
from neural_quantization.models.shape import ModelShape, ModelShapeError

OVERHEAD_FIXED_BYTES = 300 * MIB
OVERHEAD_FRACTION = 0.10
FP16_BYTES = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
SERVES = {"gptq": ("gptq", "compressed-tensors"), "gguf": ("gguf",)}  # device format -> checkpoint formats


class DeployError(ValueError):
    """A path or config the report cannot use; the message says what to pass."""


def model_shape(config: dict[str, Any]) -> ModelShape:
    """The model's sizes from its ``config.json`` (``models/shape.py`` reads them), as a :class:`DeployError`."""
    try:
        return ModelShape.from_config(config)
    except ModelShapeError as err:
        raise DeployError(str(err)) from None


def kv_cache_bytes(shape: ModelShape, context: int, batch: int = 1, bytes_per_element: float = FP16_BYTES) -> int:
    """``2 · layers · kv_heads · head_dim · context · batch · bytes_per_element``."""
    return int(2 * shape.layers * shape.kv_heads * shape.head_dim * context * batch * bytes_per_element)


def runtime_overhead_bytes(weights: int, kv_cache: int) -> int:
    """The stated assumption: 300 MiB + 10 % of (weights + KV cache)."""
    return int(OVERHEAD_FIXED_BYTES + OVERHEAD_FRACTION * (weights + kv_cache))


# --------------------------------------------------------------------------------------------------
# Weights: estimated from a config, or measured from files
# --------------------------------------------------------------------------------------------------


def _quantized_linear_bytes(k: int, n: int, bits: int, group_size: int, fmt: str) -> int:
    """Stored bytes of one quantized (K in, N out) layer in ``fmt`` (see formats/gptq.py, compressed_tensors.py)."""
    if fmt == "gptq":
        return gptq_layer_bytes(bits, group_size, k, n)  # qweight, qzeros, scales, g_idx
    if fmt == "compressed-tensors":
        groups = num_groups(k, group_size)
        codes = packed_length(k, bits) * 4 * n  # weight_packed int32 (N, packed K), the same packing
        return codes + groups * n * FP16_BYTES + 16  # + fp16 scales; symmetric: no zero points; weight_shape int64[2]
    if fmt == "gguf":
        block = 18 if bits == 4 else 34  # Q4_0 / Q8_0: fp16 d + 32 codes per 32 weights
        return -(-k // 32) * n * block
    raise DeployError(f"unknown format {fmt!r}; use gptq, compressed-tensors or gguf.")


def estimate_weight_bytes(shape: ModelShape, bits: int, group_size: int, fmt: str = "gptq") -> dict[str, int]:
    """Bytes of a model's weights quantized to ``bits`` (decoder linears only), by part.

    Embeddings, ``lm_head`` (when not tied) and norms stay fp16, as our quantizer leaves them.
    """
    if bits not in (2, 3, 4, 8) or (fmt == "gguf" and bits not in (4, 8)):
        raise DeployError(f"bits={bits} cannot be estimated for {fmt}; use 4 or 8 (2/3 for gptq).")
    linears = sum(_quantized_linear_bytes(k, n, bits, group_size, fmt) for k, n in shape.linear_shapes())
    parts = {
        "decoder_linears": linears * shape.layers,
        "norms": (2 * shape.layers + 1) * shape.hidden * (4 if fmt == "gguf" else FP16_BYTES),
        "embeddings": shape.vocab * shape.hidden * FP16_BYTES,
        "lm_head": 0 if shape.tied_embeddings else shape.vocab * shape.hidden * FP16_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts


def checkpoint_weight_files(directory: str | os.PathLike) -> dict[str, list[Path]]:
    """The weight files of a directory, by format: ``{"gguf": [...], "<quant_method or float>": [...]}``."""
    path = Path(directory)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise DeployError(f"{path} has no weight files ({', '.join(WEIGHT_SUFFIXES)}); pass a checkpoint directory.")
    out: dict[str, list[Path]] = {}
    gguf_files = [p for p in files if p.suffix == ".gguf"]
    if gguf_files:
        out["gguf"] = gguf_files
    others = [p for p in files if p.suffix != ".gguf"]
    if others:
        out[_stored_format(path)] = others
    return out


def _check_weight_files(directory: Path) -> None:
    """A measured figure is only as good as the files: every safetensors file must be as long as its
    header says, and a GPTQ checkpoint must pass ``formats/integrity.py``'s checks (headers only)."""
    from neural_quantization.formats.integrity import inspect_checkpoint, read_safetensors_header

    if _stored_format(directory) == "gptq":
        inspect_checkpoint(directory, check_values=False)
        return
    for file in sorted(directory.glob("*.safetensors")):
        read_safetensors_header(file)


def _stored_format(directory: Path) -> str:
    config_file = directory / "config.json"
    if not config_file.is_file():
        return "float"
    quant = json.loads(config_file.read_text()).get("quantization_config") or {}
    method = quant.get("quant_method")
    return {"gptq": "gptq", "compressed-tensors": "compressed-tensors"}.get(method, method or "float")


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


@dataclass
class DeviceFit:
    device: str
    format: str
    runtime: str
    weights_bytes: int
    weights_source: str  # "measured: <files>" or "estimated"
    kv_cache_bytes: int
    overhead_bytes: int
    needed_bytes: int
    usable_bytes: int
    fits: bool
    headroom_bytes: int
    why: str


@dataclass
class MemoryReport:
    source: str
    measured: bool
    context: int
    batch: int
    kv_bytes_per_element: float
    shape: dict[str, Any]
    weights: dict[str, dict[str, Any]]  # format -> {"bytes": ..., "files"/"parts": ...}
    kv_cache_bytes: int
    assumptions: dict[str, str]
    devices: list[DeviceFit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fit(self, device_name: str) -> DeviceFit:
        for fit in self.devices:
            if fit.device == device_name:
                return fit
        raise KeyError(device_name)


def _gguf_source(path: Path) -> Path | None:
    """The .gguf file to measure: ``path`` itself, or the one .gguf of a directory without config.json."""
    from neural_quantization.export.gguf_reader import find_gguf_file

    if path.is_dir() and (path / "config.json").is_file():
        return None
    return find_gguf_file(path)


def _load_config(source: Path) -> dict[str, Any]:
    config_file = source / "config.json" if source.is_dir() else source
    if not config_file.is_file():
        raise DeployError(
            f"{source} has no config.json; pass a checkpoint directory or a config.json file "
            "(a model's config is enough to plan before downloading it)."
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise DeployError(f"{config_file} is not valid JSON ({err}).") from None


def memory_report(
    source: str | os.PathLike,
    context: int = 4096,
    batch: int = 1,
    bits: int = 4,
    group_size: int = 128,
    kv_bytes_per_element: float = FP16_BYTES,
    devices: tuple[Device, ...] = DEVICES,
) -> MemoryReport:
    """Memory needed to run the model at ``source`` with ``context`` tokens × ``batch``, per device.

    source: a checkpoint directory (weights measured from its files), a ``.gguf`` file (or a
        directory holding one and no ``config.json``: measured from that file), or a ``config.json`` /
        directory without weight files (weights estimated for ``bits`` / ``group_size``).
    """
    if context <= 0 or batch <= 0:
        raise DeployError("--context and --batch must be positive (e.g. --context 4096 --batch 1).")
    path = Path(source)
    if not path.exists():
        raise DeployError(f"{path} does not exist; pass a checkpoint directory, a .gguf file or a config.json file.")
    gguf_file = _gguf_source(path)
    if gguf_file is not None:
        from neural_quantization.export.gguf_reader import gguf_config

        shape = model_shape(gguf_config(gguf_file).to_dict())
    else:
        shape = model_shape(_load_config(path))
    kv = kv_cache_bytes(shape, context, batch, kv_bytes_per_element)

    measured = gguf_file is not None or (path.is_dir() and any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()))
    weights: dict[str, dict[str, Any]] = {}
    if gguf_file is not None:
        weights["gguf"] = {"bytes": gguf_file.stat().st_size, "files": [gguf_file.name]}
    elif measured:
        _check_weight_files(path)
        for fmt, files in checkpoint_weight_files(path).items():
            weights[fmt] = {"bytes": sum(p.stat().st_size for p in files), "files": [p.name for p in files]}
    else:
        for fmt in ("gptq", "gguf"):
            if fmt == "gguf" and bits not in (4, 8):
                continue
            parts = estimate_weight_bytes(shape, bits, 32 if fmt == "gguf" else group_size, fmt)
            weights[fmt] = {"bytes": parts["total"], "parts": parts,
                            "settings": f"{bits}-bit, group {32 if fmt == 'gguf' else group_size}"}

    report = MemoryReport(
        source=str(path), measured=measured, context=context, batch=batch, kv_bytes_per_element=kv_bytes_per_element,
        shape=asdict(shape), weights=weights, kv_cache_bytes=kv,
        assumptions={
            "overhead": f"{OVERHEAD_FIXED_BYTES // MIB} MiB + {OVERHEAD_FRACTION:.0%} of (weights + KV cache)",
            "kv_cache": "2 · layers · kv_heads · head_dim · context · batch · bytes/element, all layers full context",
            "weights": "sum of the weight files' sizes" if measured else "estimated from the config (no files)",
            "usable_memory": "see neural_quantization.deploy.devices (OS / Metal reserves)",
        },
    )
    for device in devices:
        # vLLM serves GPTQ and compressed-tensors checkpoints with the same Marlin kernels
        served = [f for f in SERVES[device.format] if f in weights]
        fmt = served[0] if served else _fallback_format(weights)
        entry = weights[fmt]
        source_note = ("measured: " + ", ".join(entry["files"])) if "files" in entry else f"estimated ({entry['settings']})"
        if not served:
            source_note += f" (no {device.format} weights here; {fmt} size used)"
        overhead = runtime_overhead_bytes(entry["bytes"], kv)
        needed = entry["bytes"] + kv + overhead
        report.devices.append(DeviceFit(
            device=device.name, format=fmt if served else device.format, runtime=device.runtime, weights_bytes=entry["bytes"],
            weights_source=source_note, kv_cache_bytes=kv, overhead_bytes=overhead, needed_bytes=needed,
            usable_bytes=device.usable_bytes, fits=needed <= device.usable_bytes,
            headroom_bytes=device.usable_bytes - needed, why=device.why,
        ))
    return report


def _fallback_format(weights: dict[str, dict[str, Any]]) -> str:
    for fmt in ("gptq", "compressed-tensors", "gguf"):
        if fmt in weights:
            return fmt
    return next(iter(weights))

