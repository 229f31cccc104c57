"""Loader of the CUDA int4 GEMV (``gemv_int4.cu``), the ``cuda_gemv`` strategy of the dispatcher.

The kernel multiplies M ≤ 2 activation rows by a 4-bit GPTQ layer in kernel order
(``kernels/triton/layout.py``): one warp per 8 packed rows × 128 columns, 16-byte loads, several
units' loads in flight per lane, split-K across warps and blocks reduced in the same launch (see
the comment at the top of the ``.cu`` file).

It is compiled once per process on first use (:func:`load`) with
``torch.utils.cpp_extension.load_inline`` into a cache directory (``NQ_CUDA_EXT_DIR``, default
``~/.cache/neural_quantization/cuda_ext``; torch rebuilds when the source changes). Where there is
no CUDA device, no CUDA build of torch or no ``nvcc``, or ``NQ_CUDA_KERNELS=0``, nothing is
compiled and :func:`available` is False; a failed build is remembered (``LOAD_ERROR``) and the
Triton kernels serve alone.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv_int4.cu")
EXTENSION_NAME = "nq_cuda_gemv_int4"
#: rows per launch the kernel is instantiated for (M is rounded up to one of these)
BLOCK_MS = (1, 2)
TILE_N = 128
UNIT_K = 64

_DECLARATION = """
#include <optional>
at::Tensor gemv_int4(at::Tensor x, at::Tensor qweight, at::Tensor scales, at::Tensor qzeros,
                     std::optional<at::Tensor> perm, std::optional<at::Tensor> bias, at::Tensor tickets,
                     int64_t group_size, int64_t in_features, bool symmetric, int64_t block_m, int64_t warps,
                     int64_t units_per_warp, int64_t prefetch);
"""

_LOCK = threading.Lock()
_MODULE = None
_TRIED = False
LOAD_ERROR: str | None = None


def enabled() -> bool:
    return os.environ.get("NQ_CUDA_KERNELS", "1") not in ("0", "false", "False", "")


def _can_build() -> str | None:
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
        reason = _can_build()
        if reason is None:
            try:
                from torch.utils.cpp_extension import load_inline

                build_dir = os.path.join(cache_dir(), EXTENSION_NAME)
                os.makedirs(build_dir, exist_ok=True)
                flags = ["-O3"]
                if os.environ.get("NQ_CUDA_VERBOSE", "0") not in ("0", ""):
                    flags.append("-Xptxas=-v")
                _MODULE = load_inline(
                    name=EXTENSION_NAME,
                    cpp_sources=[_DECLARATION],
                    cuda_sources=[SOURCE.read_text()],
                    functions=["gemv_int4"],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=flags,
                    build_directory=build_dir,
                    verbose=os.environ.get("NQ_CUDA_VERBOSE", "0") not in ("0", ""),
                )
            except Exception as error:  # noqa: BLE001 - any build failure leaves the Triton kernels
                LOAD_ERROR = f"{type(error).__name__}: {error}"
                _MODULE = None
        else:
            LOAD_ERROR = reason
        _TRIED = True
    return _MODULE


def available() -> bool:
    """Whether the CUDA GEMV can run here (builds it on the first call where that is possible)."""
    if _TRIED:
        return _MODULE is not None
    return _can_build() is None and load() is not None


def block_m_for(m: int) -> int | None:
    """The instantiated row count serving ``m`` rows, or None above 2."""
    for block_m in BLOCK_MS:
        if m <= block_m:
            return block_m
    return None


def supports(M: int, K: int, N: int, bits: int, group_size: int) -> bool:
    """Whether the kernel runs this shape (the rest of the checks happen in the C++ wrapper)."""
    return (bits == 4 and 1 <= M <= BLOCK_MS[-1] and K >= 1 and N >= 4 and N % 4 == 0
            and (group_size >= K or group_size % 32 == 0))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_units(K: int) -> int:
    """Units of 8 packed rows (64 input positions) along K."""
    return _cdiv(_cdiv(K, 8), 8)


def splits(K: int, warps: int, units_per_warp: int) -> int:
    """Blocks along K the launch uses for this shape."""
    return _cdiv(num_units(K), warps * units_per_warp)


def group_rows(K: int, group_size: int) -> int:
    """Packed rows of one group run inside a unit (the kernel's GSUB): 8, or 4 for 32-wide groups."""
    return 8 if group_size >= K or group_size % 64 == 0 else 4


#: the kernel refuses more dynamic shared memory than this (48 KB less room for the static part)
MAX_SHARED_BYTES = 46 * 1024


def shared_bytes(block_m: int, warps: int, units_per_warp: int, gsub: int = 4) -> int:
    """Dynamic shared memory of a launch (``shared_bytes_of`` in the .cu file)."""
    k_span = warps * units_per_warp * UNIT_K
    return max(block_m * (k_span + 2 * (k_span // (gsub * 8))) * 4, warps * block_m * TILE_N * 4)


def gemv_int4(x2d, qweight, scales, qzeros, perm, bias, tickets, group_size, in_features, symmetric,
              block_m, warps, units_per_warp, prefetch):
    """``y = x2d[:, perm] @ W^T + bias`` (M, N) in x2d's dtype; M ≤ block_m ∈ (1, 2).

    ``prefetch``: issue the next unit's loads before computing the current one (1) or not (0).
    """
    module = load()
    if module is None:
        raise RuntimeError(f"the CUDA GEMV extension is not available: {LOAD_ERROR}")
    return module.gemv_int4(x2d, qweight, scales, qzeros, perm, bias, tickets, group_size, in_features,
                            symmetric, block_m, warps, units_per_warp, prefetch)
