"""Is a GPTQ checkpoint directory whole and self-consistent? Checked before anything loads it.

:func:`inspect_checkpoint` reads only ``config.json``, the safetensors headers and the (small)
``scales`` tensors, and raises :class:`CheckpointError` with one line naming the file and the
problem:

* ``config.json``: valid JSON with a ``gptq`` ``quantization_config`` whose fields have valid
  values, and whose duplicated fields agree with our run record (``bits``, ``group_size``,
  ``sym``, ``desc_act``, ``static_groups`` at the top level and under
  ``neural_quantization.config``; a nested cascade stores its wide width, asymmetric).
* the weight files: ``model.safetensors``, or every shard named by ``model.safetensors.index.json``;
  each file's size equals what its header says (8-byte header length + header + the end of the
  last tensor's data: a truncated or padded file is caught without reading the data), each tensor's
  byte range matches its dtype and shape, and the index names only tensors its shards hold.
* the quantized layers: for every ``X.qweight``, the tensors ``X.qzeros``, ``X.scales``,
  ``X.g_idx`` exist with the dtypes and shapes of ``formats/gptq.py`` for the recorded ``bits``
  and ``group_size`` (K from ``g_idx``, N from ``qweight``), and the scales are finite.

Checks against the model's architecture (tensor names and shapes against the model that
``config.json`` builds) need transformers and live in ``export/checkpoint.py``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neural_quantization.config import SUPPORTED_BITS
from neural_quantization.config import ConfigError, check_dynamic
from neural_quantization.formats.gptq import CHECKPOINT_FORMATS, TENSOR_NAMES, module_width
from neural_quantization.formats.packing import packed_length

__all__ = ["CheckpointError", "CheckpointInventory", "TensorEntry", "inspect_checkpoint", "read_safetensors_header"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32")


class CheckpointError(ValueError):
    """A directory is not a checkpoint this package can load; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, from its header: dtype code ("F16", "I32", ...), shape, file."""

    dtype: str
    shape: tuple[int, ...]
    file: Path


@dataclass
class CheckpointInventory:
    """What :func:`inspect_checkpoint` found: the config, its ``quantization_config`` and every tensor."""

    path: Path
    config: dict[str, Any]
    quantization_config: dict[str, Any]
    tensors: dict[str, TensorEntry]
    files: list[Path]

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file from its header, after checking the file's size against it.

    Layout: 8 bytes little-endian header length ``n``, ``n`` bytes of JSON
    (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the
    data; offsets count from the end of the header, so the file has ``8 + n + max(end)`` bytes.
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file} is truncated ({size} bytes): not a safetensors file.")
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                raise CheckpointError(
                    f"{file} is truncated: its header needs {8 + n} bytes, the file has {size}; copy or save it again."
                )
            raw = f.read(n)
    except OSError as err:
        raise CheckpointError(f"{file} cannot be read ({err.strerror or err}).") from None
    try:
        header = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{file} has a damaged header (not JSON); copy or save it again.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a damaged header (not a JSON object); copy or save it again.")
    entries: dict[str, TensorEntry] = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: the header entry of {name} is damaged; copy or save it again.") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{file}: tensor {name} has an unknown dtype {dtype!r}.")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype] or begin < 0:
            raise CheckpointError(f"{file}: tensor {name}'s byte range does not match its {dtype} shape {list(shape)}.")
        data_end = max(data_end, end)
        entries[name] = TensorEntry(dtype, shape, file)
    expected = 8 + n + data_end
    if size < expected:
        raise CheckpointError(
            f"{file} is truncated: it holds {size} of {expected} bytes (an interrupted copy or download?); "
            "copy or save it again."
        )
    if size > expected:
        raise CheckpointError(f"{file} has {size - expected} bytes after its last tensor; copy or save it again.")
    return entries


def _weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of the checkpoint, and its index's weight map (None for a single file)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is damaged (no weight_map); copy or save the checkpoint again.") from None
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{index} names {missing[0]}, which is missing from {path}"
                + (f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else "")
                + "; copy the whole checkpoint directory."
            )
        return [path / name for name in names], weight_map
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], None
    raise CheckpointError(f"{path} has no {SINGLE_FILE} (or {INDEX_FILE}); the checkpoint is incomplete.")


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass the directory written by `neural-quantize`.")
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; pass the directory written by `neural-quantize`.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file} is not valid JSON ({err}); fix or restore it.") from None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != "gptq":
        raise CheckpointError(f"{path} is not a GPTQ checkpoint (config.json has no gptq quantization_config).")
    if quant.get("checkpoint_format", "gptq") not in CHECKPOINT_FORMATS:
        raise CheckpointError(
            f"{path} uses checkpoint_format={quant.get('checkpoint_format')!r}; "
            f"GPTQ checkpoints in {' or '.join(CHECKPOINT_FORMATS)} are supported."
        )
    return config, quant


def _check_fields(path: Path, quant: dict[str, Any]) -> None:
    """Valid values, and the duplicated fields agreeing with the run record."""
    where = f"{path / 'config.json'}: quantization_config"
    bits, group_size = quant.get("bits"), quant.get("group_size", -1)
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise CheckpointError(f"{where}.bits={bits!r}; a GPTQ checkpoint stores one of {SUPPORTED_BITS}.")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size != -1 and group_size <= 0):
        raise CheckpointError(f"{where}.group_size={group_size!r}; expected -1 or a positive number of columns.")
    if quant.get("dynamic") is not None:
        try:
            check_dynamic(quant["dynamic"])
        except ConfigError as err:
            raise CheckpointError(f"{where}.dynamic: {err}") from None
    for key in ("sym", "desc_act", "static_groups"):
        if key in quant and not isinstance(quant[key], bool):
            raise CheckpointError(f"{where}.{key}={quant[key]!r}; expected true or false.")
    record = quant.get("neural_quantization")
    run = record.get("config") if isinstance(record, dict) else None
    if not isinstance(run, dict):
        return  # another producer's checkpoint: nothing duplicated to compare
    expected = {key: run.get(key) for key in ("bits", "group_size", "sym", "desc_act", "static_groups")}
    if run.get("desc_act") and run.get("static_groups"):
        expected["desc_act"] = False  # static groups keep g_idx trivial: stored as an ordinary checkpoint
    if run.get("cascade_mode") == "nested" and run.get("cascade_stages"):
        expected["bits"], expected["sym"] = run["cascade_stages"][0], False  # stored at the wide width
    for key, value in expected.items():
        if value is not None and key in quant and quant[key] != value:
            raise CheckpointError(
                f"{where}.{key}={quant[key]!r} disagrees with the run record neural_quantization.config.{key}="
                f"{value!r}; the config was edited by hand. Restore the original config.json."
            )


def _check_quantized_layers(quant: dict[str, Any], tensors: dict[str, TensorEntry]) -> list[str]:
    """Shapes and dtypes of every quantized layer's tensors; returns the names of the scales tensors."""
    scales = []
    for name in sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")):
        bits, group_size = module_width(quant, name)
        parts = {key: tensors.get(f"{name}.{key}") for key in TENSOR_NAMES}
        missing = [key for key in ("qzeros", "scales") if parts[key] is None]
        if missing:
            raise CheckpointError(f"{parts['qweight'].file}: layer {name} has a qweight but no {', '.join(missing)}.")
        for key, allowed in (("qweight", ("I32",)), ("qzeros", ("I32",)), ("g_idx", ("I32", "I64")),
                             ("scales", FLOAT_DTYPES)):
            entry = parts[key]
            if entry is not None and entry.dtype not in allowed:
                raise CheckpointError(f"{entry.file}: {name}.{key} is {entry.dtype}; GPTQ stores it as {allowed[0]}.")
        qweight, qzeros, scale = parts["qweight"], parts["qzeros"], parts["scales"]
        if len(qweight.shape) != 2 or len(scale.shape) != 2 or len(qzeros.shape) != 2:
            raise CheckpointError(f"{qweight.file}: layer {name}'s GPTQ tensors must be 2-D.")
        n = qweight.shape[1]
        k = parts["g_idx"].shape[0] if parts["g_idx"] is not None else qweight.shape[0] * 32 // bits
        groups = 1 if group_size == -1 else -(-k // group_size)
        want = {"qweight": (packed_length(k, bits), n), "scales": (groups, n), "qzeros": (groups, packed_length(n, bits))}
        for key, shape in want.items():
            if parts[key].shape != shape:
                raise CheckpointError(
                    f"{parts[key].file}: {name}.{key} has shape {list(parts[key].shape)}, but {bits}-bit codes in "
                    f"groups of {group_size} for a {k}->{n} layer need {list(shape)}; the checkpoint does not match "
                    "its quantization_config."
                )
        scales.append(f"{name}.scales")
    return scales


def _check_scales_finite(names: list[str], tensors: dict[str, TensorEntry]) -> None:
    import torch
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(tensors[name].file, []).append(name)
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in file_names:
                if not bool(torch.isfinite(f.get_tensor(name)).all()):
                    raise CheckpointError(f"{file}: {name} holds NaN or infinite scales; the checkpoint is damaged.")


def inspect_checkpoint(checkpoint_dir: str | os.PathLike, check_values: bool = True) -> CheckpointInventory:
    """Check the directory (see the module docstring) and return what it holds.

    ``check_values=False`` skips reading the scales (headers and sizes only).
    """
    path = Path(checkpoint_dir).expanduser()
    config, quant = _read_config(path)
    _check_fields(path, quant)
    files, weight_map = _weight_files(path)
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        tensors.update(read_safetensors_header(file))
    if weight_map is not None:
        absent = [name for name, file in weight_map.items() if name not in tensors or tensors[name].file.name != file]
        if absent:
            raise CheckpointError(f"{path / INDEX_FILE} maps {absent[0]} to {weight_map[absent[0]]}, which does not "
                                  "hold it.")
    scales = _check_quantized_layers(quant, tensors)
    if not scales:
        raise CheckpointError(f"{path} holds no quantized layers (no .qweight tensors); it is not a GPTQ checkpoint.")
    if check_values:
        _check_scales_finite(scales, tensors)
    return CheckpointInventory(path, config, quant, tensors, files)
