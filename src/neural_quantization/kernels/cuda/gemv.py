"""Loader of the CUDA int4 GEMV (``gemv_int4.cu``), the ``cuda_gemv`` strategy of the dispatcher.

The kernel multiplies M ≤ 2 activation rows by a 4-bit GPTQ layer in kernel order
(``kernels/layout.py``): one warp per 8 packed rows × 128 columns, 16-byte loads, several
units' loads in flight per lane, split-K across warps and blocks reduced in the same launch (see
the comment at the top of the ``.cu`` file).

It is built with the other CUDA kernels of this folder (``extension.py``, on first use).
"""

from __future__ import annotations

from neural_quantization.kernels.cuda import extension

#: rows per launch the kernel is instantiated for (M is rounded up to one of these)
BLOCK_MS = (1, 2)
TILE_N = 128
UNIT_K = 64


def load():
    """The compiled extension (building it on the first call), or None where it cannot be built."""
    return extension.load()


def available() -> bool:
    """Whether the CUDA kernels run here (builds them on the first call where that is possible)."""
    return extension.available()


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
        raise RuntimeError(f"the CUDA GEMV extension is not available: {extension.LOAD_ERROR}")
    return module.gemv_int4(x2d, qweight, scales, qzeros, perm, bias, tickets, group_size, in_features,
                            symmetric, block_m, warps, units_per_warp, prefetch)
