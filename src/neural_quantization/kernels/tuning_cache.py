"""Kernel choices that outlive the process: the user's tuning cache on disk and the shipped defaults.

``kernels/dispatch.py`` picks one launch configuration per key ``(M bucket, K, N, activation dtype,
bits, group length, symmetric, act-order)`` on a device. Timing every candidate costs seconds per
key, so the choices are kept in JSON files, one per GPU model (the name CUDA reports, e.g.
"NVIDIA H100 80GB HBM3"), read in this order, later files overriding earlier ones:

1. **shipped defaults**, ``kernels/tuned/<GPU>.json`` inside the package, tuned on that GPU for the
   common Llama / Mistral / Qwen shapes by ``benchmarks/tuning_defaults.py`` (``NQ_TUNING_DEFAULTS=0``
   ignores them);
2. **the user's cache**, ``<cache dir>/<GPU>-nq<version>.json``, written whenever a key is tuned
   (``neural-quantize tune MODEL_DIR``, or on the spot with ``NQ_KERNEL_AUTOTUNE=1``). The cache
   dir is ``$NQ_TUNING_CACHE`` if set, else ``~/.cache/neural_quantization/tuning`` (beside the
   CUDA extension's build, ``kernels/cuda/extension.py``); ``NQ_TUNING_CACHE=off`` neither reads
   nor writes it.
   The project version is in the file name because a new version may change the kernels and
   their candidate lists: an old version's choices are not reused.

File layout (both kinds)::

    {"format": 1, "gpu": "NVIDIA H100 80GB HBM3", "version": "0.1.0", "triton": "3.6.0",
     "entries": [{"m": 16, "K": 4096, "N": 6144, "dtype": "torch.float16", "bits": 4,
                  "group_size": 128, "symmetric": true, "act_order": false,
                  "config": {"strategy": "cuda_mma", "block_m": 16, ...}, "us": 7.91}, ...]}

``config`` holds the fields of ``dispatch.LaunchConfig``; ``us`` the tuned time per call. This
module only stores and reads entries; which entries are valid where (a CUDA-extension strategy
where the extension cannot build) is decided by the dispatcher.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from importlib import resources
from pathlib import Path

from neural_quantization._version import __version__

FORMAT = 1
#: fields of an entry that form its key (besides the GPU, which names the file)
KEY_FIELDS = ("m", "K", "N", "dtype", "bits", "group_size", "symmetric", "act_order")
ENV_CACHE = "NQ_TUNING_CACHE"
ENV_DEFAULTS = "NQ_TUNING_DEFAULTS"
_OFF = ("0", "off", "false", "False", "none", "")
_write_warned = False


def gpu_slug(gpu_name: str) -> str:
    """A file-name form of the GPU name: ``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", gpu_name).strip("_") or "unknown_gpu"


def cache_dir() -> Path | None:
    """The user's tuning cache directory (see the module docstring), or None when it is switched off."""
    configured = os.environ.get(ENV_CACHE)
    if configured is not None:
        return None if configured in _OFF else Path(configured).expanduser()
    return Path(os.path.expanduser("~")) / ".cache" / "neural_quantization" / "tuning"


def user_cache_file(gpu_name: str) -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / f"{gpu_slug(gpu_name)}-nq{__version__}.json"


def shipped_defaults_file(gpu_name: str):
    """The packaged defaults for this GPU (a ``Traversable``), or None where none ship or they are off."""
    if os.environ.get(ENV_DEFAULTS, "1") in _OFF:
        return None
    candidate = resources.files("neural_quantization.kernels") / "tuned" / f"{gpu_slug(gpu_name)}.json"
    return candidate if candidate.is_file() else None


def entry_key(entry: dict) -> tuple:
    return tuple(entry[field] for field in KEY_FIELDS)


def read_entries(source) -> list[dict]:
    """The entries of one tuning file (a path or ``Traversable``); [] if it is missing or unreadable."""
    try:
        document = json.loads(source.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        return []
    return [entry for entry in document.get("entries", []) if isinstance(entry, dict)
            and all(field in entry for field in KEY_FIELDS) and isinstance(entry.get("config"), dict)]


def load(gpu_name: str) -> list[dict]:
    """Every stored entry for this GPU: shipped defaults first, then the user's cache (later wins)."""
    entries: list[dict] = []
    shipped = shipped_defaults_file(gpu_name)
    if shipped is not None:
        entries.extend(read_entries(shipped))
    user = user_cache_file(gpu_name)
    if user is not None:
        entries.extend(read_entries(user))
    return entries


def write_entries(path: Path, gpu_name: str, entries: list[dict]) -> None:
    """Write a tuning file atomically (a temporary file renamed over the old one)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    document = {"format": FORMAT, "gpu": gpu_name, "version": __version__, "triton": triton_version,
                "entries": sorted(entries, key=lambda e: tuple(str(v) for v in entry_key(e)))}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(document, stream, indent=1)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def record(gpu_name: str, entry: dict) -> Path | None:
    """Add (or replace) one tuned entry in the user's cache; returns the file, or None if not written.

    The file is re-read first, so processes tuning different shapes at once keep each other's
    entries (the last writer of the same key wins). A cache that cannot be written (read-only home,
    full disk) costs a warning, once, never the forward that tuned.
    """
    global _write_warned
    path = user_cache_file(gpu_name)
    if path is None:
        return None
    merged = {entry_key(old): old for old in read_entries(path)}
    merged[entry_key(entry)] = entry
    try:
        write_entries(path, gpu_name, list(merged.values()))
    except OSError as error:
        if not _write_warned:
            _write_warned = True
            warnings.warn(f"kernel tuning results could not be saved to {path} ({error}); set {ENV_CACHE} to a "
                          "writable directory to keep them", stacklevel=2)
        return None
    return path
