"""Build and load the CUDA kernels of this folder as one torch extension.

Sources: ``bindings.cpp`` (Python bindings), ``gemv_int4.cu`` (split-K GEMV, M ≤ 2) and the
tensor-core kernel ``mma_int4.cu`` with its per-dtype instances ``mma_int4_{half,bf16}.cu``
(templates in ``mma_int4.cuh``). They are compiled once, on first use, by
``torch.utils.cpp_extension.load`` (ninja builds the files in parallel) into a cache directory
(``NQ_CUDA_EXT_DIR``, default ``~/.cache/neural_quantization/cuda_ext``; torch rebuilds when a
source changes). Where there is no CUDA device, no CUDA build of torch or no ``nvcc``, or
``NQ_CUDA_KERNELS=0``, nothing is compiled and :func:`load` returns None; a failed build is
remembered (``LOAD_ERROR``) and the Triton kernels serve alone.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = ("bindings.cpp", "gemv_int4.cu", "mma_int4.cu", "mma_int4_half.cu", "mma_int4_bf16.cu")
EXTENSION_NAME = "nq_cuda_kernels"

_LOCK = threading.Lock()
_MODULE = None
_TRIED = False
LOAD_ERROR: str | None = None


def enabled() -> bool:
    return os.environ.get("NQ_CUDA_KERNELS", "1") not in ("0", "false", "False", "")


def _verbose() -> bool:
    return os.environ.get("NQ_CUDA_VERBOSE", "0") not in ("0", "")


def can_build() -> str | None:
    """Why the extension cannot be built here, or None where it can."""
    if not enabled():
        return "disabled by NQ_CUDA_KERNELS=0"
    if torch.version.cuda is None or not torch.cuda.is_available():
        return "no CUDA device or CPU-only torch"
    try:
        from torch.utils import cpp_extension
    except ImportError as error:  # pragma: no cover - torch always ships it
        return f"torch.utils.cpp_extension: {error}"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc not found (CUDA_HOME unset)"
    return None


def cache_dir() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "neural_quantization", "cuda_ext")
    return os.environ.get("NQ_CUDA_EXT_DIR", default)


def load():
    """The compiled extension module, building it on the first call; None where it cannot be built."""
    global _MODULE, _TRIED, LOAD_ERROR
    if _TRIED:
        return _MODULE
    with _LOCK:
        if _TRIED:
            return _MODULE
        reason = can_build()
        if reason is None:
            try:
                from torch.utils.cpp_extension import load as load_extension

                build_dir = os.path.join(cache_dir(), EXTENSION_NAME)
                os.makedirs(build_dir, exist_ok=True)
                cuda_flags = ["-O3"]
                if _verbose():
                    cuda_flags.append("-Xptxas=-v")
                _MODULE = load_extension(
                    name=EXTENSION_NAME,
                    sources=[str(HERE / name) for name in SOURCES],
                    extra_include_paths=[str(HERE)],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=cuda_flags,
                    build_directory=build_dir,
                    verbose=_verbose(),
                )
            except Exception as error:  # noqa: BLE001 - any build failure leaves the Triton kernels
                LOAD_ERROR = f"{type(error).__name__}: {error}"
                _MODULE = None
        else:
            LOAD_ERROR = reason
        _TRIED = True
    return _MODULE


def loaded() -> bool:
    """Whether the extension is already built and loaded in this process (never builds it)."""
    return _TRIED and _MODULE is not None


def available() -> bool:
    """Whether the extension runs here (builds it on the first call where that is possible)."""
    if _TRIED:
        return _MODULE is not None
    return can_build() is None and load() is not None
