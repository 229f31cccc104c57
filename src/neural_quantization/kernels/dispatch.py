"""Launch the Triton kernels, choose one per shape, and cache the choice.

Strategies (one file each in this package):

* ``gemv_rows`` ``gemv_rows.py``: CUDA-core split-K GEMV, BLOCK_M rows per program, each weight
  read once, zero and scale folded per tile (M ≤ 8);
* ``dot_slices`` / ``dot_slices_swap`` ``dot_slices.py``: tensor-core split-K GEMM, one ``tl.dot``
  per code slot (no register reordering); ``_swap`` puts N in the instruction's M dimension;
* ``gemv``    ``gemv_splitk.py``: CUDA-core split-K GEMV, one activation row per program;
* ``dot``     ``dot_splitk.py``: tensor-core split-K GEMM over codes unpacked into K order;
* ``dequant`` ``dequant_matmul.py``: dequantize to a temporary weight, then cuBLAS (large M);
* ``cuda_gemv`` ``kernels/cuda/gemv_int4.cu``: a CUDA C++ split-K GEMV for M ≤ 2, 4-bit weights
  (16-byte loads, several units in flight per lane), built on first use with torch's extension
  loader and a candidate only where it built (``kernels/cuda/gemv.py``). Its config reads
  ``block_m`` = rows instantiated (1, 2), ``num_warps`` = warps per block, ``num_stages`` =
  units (8 packed rows × 128 columns) per warp, ``split_k`` = the resulting blocks along K,
  ``variant`` = 1 where the next unit's loads are issued before the current unit is consumed;
* ``cuda_mma`` ``kernels/cuda/mma_int4.cu``: the CUDA C++ tensor-core kernel for M ≤ 16, 4-bit
  weights with 16-bit scales, reading the kernel-order GPTQ tensors directly (``kernels/cuda/mma.py``;
  a candidate on sm_80+ where the extension built). Its config reads ``block_m`` = rows
  instantiated (8, 16), ``block_n`` = columns per block (16 or 32, from the variant),
  ``num_warps`` = warps per block, ``split_k`` = blocks along K, ``variant`` = index into
  ``mma.VARIANTS`` (m-tiles per warp, chunks per batch, prefetch, …).

``gemv_rows`` and ``dot_slices`` need every tile inside one quantization group; the others run any
group length. The call path of a prepared layer is :class:`PreparedMatmul`: everything a launch
needs is resolved once per (layer, M, dtype, alignment) and later calls only allocate the output
and launch the compiled kernel.

The choice is cached per key ``(device, M bucket, K, N, dtype, bits, group mode, symmetric,
act-order)`` with M buckets 1, 2, 4, 8, 16, 32, 64, … (next power of two). Choices persist across
processes (``kernels/tuning_cache.py``): the shipped defaults for the GPU and the user's tuning
cache are read on the first eager call on a device. A key found there (or, failing that, the same
shape tuned with the other symmetry or act-order, which launch the same kernels) is used as is.
A key found nowhere takes the heuristic :func:`default_config` at once, so the first forward of a
new model never stalls on tuning; ``neural-quantize tune MODEL_DIR`` (``kernels/tuning.py``) tunes
a model's keys ahead and saves them, and ``NQ_KERNEL_AUTOTUNE=1`` tunes a missing key on the spot
(an eager call on CUDA, not inside a graph capture or a torch.compile trace): every candidate is
timed in a private CUDA graph of back-to-back launches, the fastest is kept and saved. Nothing on
the call path ever synchronizes inside a capture.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import triton

from neural_quantization.kernels.triton.dequant_matmul import dequantize_kernel
from neural_quantization.kernels.triton.dot_slices import dot_slices_kernel
from neural_quantization.kernels.triton.dot_splitk import dot_splitk_kernel
from neural_quantization.kernels.triton.gemv_rows import gemv_rows_kernel
from neural_quantization.kernels.triton.gemv_splitk import gemv_splitk_kernel
from neural_quantization.kernels import tuning_cache
from neural_quantization.kernels.timing import time_in_graph

_SLICES = ("dot_slices", "dot_slices_swap", "dot_slices_xs", "dot_slices_swap_xs")
STRATEGIES = ("gemv_rows", *_SLICES, "gemv", "dot", "dequant", "cuda_gemv", "cuda_mma")
#: strategies whose tiles must lie inside one quantization group
_TILE_IN_GROUP = ("gemv_rows", *_SLICES)


@dataclass(frozen=True)
class LaunchConfig:
    """One launch: strategy, tile sizes, split-K factor (programs along K) and Triton settings."""

    strategy: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    variant: int = 0  # strategy-specific switch (cuda_gemv: 1 = prefetch the next unit; cuda_mma: VARIANTS index)

    def describe(self) -> str:
        extra = f" v{self.variant}" if self.variant else ""
        return (f"{self.strategy}[m{self.block_m} n{self.block_n} k{self.block_k} split{self.split_k} "
                f"w{self.num_warps} s{self.num_stages}{extra}]")


def m_bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


# ---------------------------------------------------------------------------------------------
# split-K ticket counters (see common.finish_output): zero at rest, one int32 per output tile
_TICKETS: dict[tuple[str, int | None], torch.Tensor] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _eager_cuda(device: torch.device) -> bool:
    """A CUDA call outside graph capture and compile traces: where synchronizing (tuning, building the
    extension, reading stored choices) is allowed."""
    return device.type == "cuda" and not torch.compiler.is_compiling() and not _capturing(device)


def _tickets(device: torch.device, count: int) -> torch.Tensor | None:
    key = (device.type, device.index)
    buffer = _TICKETS.get(key)
    if buffer is None or buffer.numel() < count:
        if _capturing(device):
            return None  # cannot allocate persistent zeroed memory inside a capture: run without split
        buffer = torch.zeros(max(count, 1 << 16), dtype=torch.int32, device=device)
        _TICKETS[key] = buffer
    return buffer


def reserve_tickets(device: torch.device, count: int = 1 << 16) -> None:
    """Allocate the split-K counters ahead (call before graph capture if not done by an eager call)."""
    _tickets(torch.device(device), count)


# ---------------------------------------------------------------------------------------------
def _half_magic(dtype: torch.dtype, bits: int) -> tuple[int, int]:
    """(bit pattern, value) of the 16-bit magic number that turns a code into ``magic + code``."""
    if dtype == torch.float16:
        return 0x6400, 1024
    if dtype == torch.bfloat16 and bits == 4:
        return 0x4300, 128
    return 0, 0


def tile_fits_group(config: LaunchConfig, group_size: int, in_features: int) -> bool:
    """Whether ``config`` may run a layer with this group length (see ``_TILE_IN_GROUP``)."""
    if config.strategy == "cuda_gemv":
        return group_size >= in_features or group_size % 32 == 0
    if config.strategy == "cuda_mma":
        from neural_quantization.kernels.cuda import mma

        return mma.group_length(group_size, in_features) is not None
    if config.strategy not in _TILE_IN_GROUP:
        return True
    return group_size >= in_features or group_size % config.block_k == 0


class _Plan:
    """What one launch needs besides the per-call tensors: kernel, grid, split, constexprs."""

    __slots__ = ("constexprs", "grid", "kernel", "split_k", "tiles_per_split")

    def __init__(self, kernel, grid, split_k, tiles_per_split, constexprs):
        self.kernel, self.grid, self.split_k = kernel, grid, split_k
        self.tiles_per_split, self.constexprs = tiles_per_split, constexprs


def _plan(config: LaunchConfig, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, bits: int,
          group_size: int, symmetric: bool, has_perm: bool, has_bias: bool) -> _Plan:
    if not tile_fits_group(config, group_size, K):
        raise ValueError(f"{config.describe()} needs tiles inside one group (group {group_size})")
    num_tiles = triton.cdiv(K, config.block_k)
    tiles_per_split = triton.cdiv(num_tiles, max(1, min(config.split_k, num_tiles)))
    split_k = triton.cdiv(num_tiles, tiles_per_split)
    grid = (triton.cdiv(N, config.block_n), split_k, triton.cdiv(M, config.block_m))
    if split_k > 1 and _tickets(device, grid[0] * grid[2]) is None:
        tiles_per_split, split_k = num_tiles, 1
        grid = (grid[0], 1, grid[2])
    common = {"BITS": bits, "SYMMETRIC": symmetric, "HAS_PERM": has_perm, "HAS_BIAS": has_bias,
              "USE_SPLIT": split_k > 1, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n}
    interpreted_bf16 = device.type != "cuda" and dtype == torch.bfloat16
    magic, magic_value = _half_magic(dtype, bits)
    per_word = 32 // bits
    if config.strategy == "gemv_rows":
        kernel = gemv_rows_kernel
        common.update(ROWS=config.block_k // per_word)
    elif config.strategy in _SLICES:
        kernel = dot_slices_kernel
        common.update(ROWS=config.block_k // per_word, HALF_MAGIC=magic, HALF_MAGIC_VALUE=magic_value,
                      DOT_IN_FP32=interpreted_bf16, SWAP="swap" in config.strategy,
                      XSPLIT=config.strategy.endswith("_xs"))
    elif config.strategy == "gemv":
        kernel = gemv_splitk_kernel
        common.update(BLOCK_K=config.block_k, SCALE_PER_TILE=group_size % config.block_k == 0)
    elif config.strategy == "dot":
        kernel = dot_splitk_kernel
        common.update(BLOCK_K=config.block_k, SCALE_PER_TILE=group_size % config.block_k == 0, HALF_MAGIC=magic,
                      HALF_MAGIC_VALUE=magic_value, DOT_IN_FP32=interpreted_bf16)
    else:
        raise ValueError(f"unknown strategy {config.strategy!r}; expected one of {STRATEGIES}")
    common.update(num_warps=config.num_warps, num_stages=config.num_stages)
    return _Plan(kernel, grid, split_k, tiles_per_split, common)


def _args(plan: _Plan, x2d, qweight, qzeros, scales, perm, bias, out, partial, K, group_size):
    tickets = _TICKETS.get((x2d.device.type, x2d.device.index)) if plan.split_k > 1 else None
    return (x2d, qweight, scales, qzeros, qweight if perm is None else perm, out if bias is None else bias, out,
            partial, out if tickets is None else tickets,
            x2d.shape[0], qweight.shape[1], K, x2d.stride(0), out.stride(0), group_size, plan.tiles_per_split,
            plan.split_k)


def launch(
    config: LaunchConfig,
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    symmetric: bool,
) -> torch.Tensor:
    """``y = x2d[:, perm] @ W^T + bias`` (M, N) in x2d's dtype, with one strategy and tiling."""
    M, K, N = x2d.shape[0], in_features, qweight.shape[1]
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if config.strategy == "cuda_mma":
        return _cuda_mma_call(config, x2d, qweight, qzeros, scales, perm, bias, group_size, K, symmetric)
    if config.strategy == "dequant":
        return _dequant_matmul(config, x2d, qweight, qzeros, scales, perm, bias, bits, group_size, K, symmetric)
    out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_() if bias is None else out.copy_(bias.to(out.dtype).expand_as(out))
    if config.strategy == "cuda_gemv":
        return _cuda_gemv_call(config, x2d, qweight, qzeros, scales, perm, bias, bits, group_size, K, symmetric)
    plan = _plan(config, M, N, K, x2d.dtype, x2d.device, bits, group_size, symmetric, perm is not None,
                 bias is not None)
    partial = (torch.empty((plan.split_k, M, N), dtype=torch.float32, device=x2d.device) if plan.split_k > 1
               else out)
    plan.kernel[plan.grid](*_args(plan, x2d, qweight, qzeros, scales, perm, bias, out, partial, K, group_size),
                           **plan.constexprs)
    return out


def dequantize_to_dense(qweight, qzeros, scales, bits, group_size, in_features, symmetric, dtype,
                        block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """The weight transposed, ``Wt`` (K, N) in kernel order and ``dtype`` (see ``dequant_matmul.py``)."""
    N = qweight.shape[1]
    weight_t = torch.empty((in_features, N), dtype=dtype, device=qweight.device)
    if in_features and N:
        grid = (triton.cdiv(N, block_n), triton.cdiv(in_features, block_k))
        dequantize_kernel[grid](qweight, scales, qzeros, weight_t, N, in_features, group_size,
                                BITS=bits, SYMMETRIC=symmetric, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return weight_t


def _dequant_matmul(config, x2d, qweight, qzeros, scales, perm, bias, bits, group_size, K, symmetric):
    weight_t = dequantize_to_dense(qweight, qzeros, scales, bits, group_size, K, symmetric, x2d.dtype,
                                   config.block_n, config.block_k)
    if perm is not None:
        x2d = x2d.index_select(1, perm.long())
    out = x2d @ weight_t
    return out if bias is None else out + bias.to(out.dtype)


# ---------------------------------------------------------------------------------------------
# the CUDA C++ GEMV (kernels/cuda): a candidate only where the extension built
def cuda_gemv_ready(device_type: str = "cuda") -> bool:
    """Whether the ``cuda_gemv`` strategy can run (builds the extension on the first call)."""
    if device_type != "cuda":
        return False
    from neural_quantization.kernels.cuda import gemv as cuda_gemv

    return cuda_gemv.available()


def _cuda_gemv_args(config: LaunchConfig, M: int, K: int, N: int, bits: int, group_size: int,
                    device: torch.device):
    """(block_m, warps, units_per_warp, tickets or None) of a ``cuda_gemv`` launch."""
    from neural_quantization.kernels.cuda import gemv as cuda_gemv

    if not cuda_gemv.supports(M, K, N, bits, group_size) or M > config.block_m:
        raise ValueError(f"{config.describe()} cannot run M={M} K={K} N={N} bits={bits} group {group_size}")
    warps, units_per_warp = config.num_warps, config.num_stages
    tickets = None
    if cuda_gemv.splits(K, warps, units_per_warp) > 1:
        tickets = _tickets(device, triton.cdiv(N, cuda_gemv.TILE_N))
        if tickets is None:  # inside a capture without counters: one block along K
            units_per_warp = triton.cdiv(cuda_gemv.num_units(K), warps)
    return config.block_m, warps, units_per_warp, tickets


def _cuda_gemv_call(config, x2d, qweight, qzeros, scales, perm, bias, bits, group_size, K, symmetric):
    from neural_quantization.kernels.cuda import gemv as cuda_gemv

    block_m, warps, units_per_warp, tickets = _cuda_gemv_args(config, x2d.shape[0], K, qweight.shape[1], bits,
                                                              group_size, x2d.device)
    return cuda_gemv.gemv_int4(x2d, qweight, scales, qzeros, perm, bias, qweight if tickets is None else tickets,
                               group_size, K, symmetric, block_m, warps, units_per_warp, config.variant)


#: (warps per block, units per warp) the tuner tries for the CUDA GEMV
_CUDA_GEMV_SHAPES = ((4, 1), (4, 2), (4, 3), (4, 4), (8, 1), (8, 2), (8, 4), (2, 2), (2, 4), (4, 8), (8, 8),
                     (4, 16), (8, 16))


def cuda_gemv_configs(M: int, K: int, N: int, bits: int, group_size: int) -> list[LaunchConfig]:
    """``cuda_gemv`` candidates for this shape (empty where the kernel does not run it)."""
    from neural_quantization.kernels.cuda import gemv as cuda_gemv

    block_m = cuda_gemv.block_m_for(M)
    if block_m is None or not cuda_gemv.supports(M, K, N, bits, group_size):
        return []
    gsub = cuda_gemv.group_rows(K, group_size)
    found, seen = [], set()
    for warps, units_per_warp in _CUDA_GEMV_SHAPES:
        split = cuda_gemv.splits(K, warps, units_per_warp)
        # fewest units per warp giving this split (more would only leave warps idle)
        units_per_warp = triton.cdiv(cuda_gemv.num_units(K), warps * split)
        if (warps, split) in seen or cuda_gemv.shared_bytes(block_m, warps, units_per_warp, gsub) > \
                cuda_gemv.MAX_SHARED_BYTES:
            continue
        seen.add((warps, split))
        for prefetch in ((0, 1) if units_per_warp > 1 else (0,)):
            found.append(LaunchConfig("cuda_gemv", block_m, cuda_gemv.TILE_N, cuda_gemv.UNIT_K, split, warps,
                                      units_per_warp, prefetch))
    return found


# ---------------------------------------------------------------------------------------------
# the CUDA C++ tensor-core kernel (kernels/cuda/mma_int4.cu) on the kernel-order GPTQ tensors
def cuda_mma_ready(device: torch.device | str = "cuda") -> bool:
    """Whether the ``cuda_mma`` strategy can run on ``device`` (builds the extension on the first call)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    from neural_quantization.kernels.cuda import extension, mma

    return mma.device_supported(device) and extension.available()


def _cuda_mma_loaded(device: torch.device) -> bool:
    """``cuda_mma_ready`` without building: the extension is already loaded (safe inside a capture)."""
    from neural_quantization.kernels.cuda import extension, mma

    return device.type == "cuda" and extension.loaded() and mma.device_supported(device)


def pdl_enabled() -> bool:
    """Launch ``cuda_mma`` as a programmatic dependent launch (sm_90+; ``NQ_PDL=0`` turns it off):
    the kernel fetches its first codes into L2 while the kernel before it finishes."""
    return os.environ.get("NQ_PDL", "1") not in ("0", "false", "False", "")


def _cuda_mma_args(config: LaunchConfig, N: int, dummy: torch.Tensor):
    """(tickets, splits, pdl) of a ``cuda_mma`` launch (``dummy`` stands in for absent tickets)."""
    from neural_quantization.kernels.cuda import mma

    splits = config.split_k
    tickets = _tickets(dummy.device, mma.tiles(config.variant, N)) if splits > 1 else None
    if tickets is None:  # one block along K (also inside a capture without counters)
        splits = 1
        tickets = dummy
    pdl = pdl_enabled() and torch.cuda.get_device_capability(dummy.device)[0] >= 9
    return tickets, splits, pdl


def _cuda_mma_call(config, x2d, qweight, qzeros, scales, perm, bias, group_size, K, symmetric):
    from neural_quantization.kernels.cuda import mma

    if x2d.shape[0] > config.block_m:
        raise ValueError(f"{config.describe()} runs M <= {config.block_m}")
    tickets, splits, pdl = _cuda_mma_args(config, qweight.shape[1], qweight)
    return mma.mma_int4(x2d, qweight, qzeros, scales, symmetric, perm, bias, tickets, group_size, K, config.block_m,
                        config.num_warps, config.variant, splits, pdl)


def _cuda_mma_config(block_m: int, variant: int, split: int, warps: int) -> LaunchConfig:
    from neural_quantization.kernels.cuda import mma

    return LaunchConfig("cuda_mma", block_m, mma.tile_n(variant), mma.CHUNK_K, split, warps,
                        mma.VARIANTS[variant][1], variant)


def cuda_mma_configs(M: int, K: int, N: int, bits: int, group_size: int, sm_count: int,
                     scale_dtype: torch.dtype = torch.float16) -> list[LaunchConfig]:
    """``cuda_mma`` candidates for this shape (empty where the kernel does not run it)."""
    from neural_quantization.kernels.cuda import mma

    block_m = mma.block_m_for(M)
    if block_m is None or not mma.supports(M, K, N, bits, group_size, scale_dtype):
        return []
    chunks = triton.cdiv(K, mma.CHUNK_K)
    found = []
    for variant in range(len(mma.VARIANTS)):
        if not mma.variant_supports(variant, N):
            continue
        tiles = mma.tiles(variant, N)
        # 3 and 6 as well as powers of two: with 3 blocks of 8 warps (or 6 of 4) resident per SM, a
        # split that fills exactly one wave beat the next power of two (down 14336 -> 4096 at M = 1 on
        # H100: 128 tiles x 3 splits, 13.3 us against 15.0 us with 4)
        splits = [s for s in mma.SPLITS if s == 1 or (s <= chunks and tiles * s <= 4 * sm_count)]
        for warps in (4, 8):
            for split in splits:
                found.append(_cuda_mma_config(block_m, variant, split, warps))
    return found


# ---------------------------------------------------------------------------------------------
def _auto_split(programs: int, num_tiles: int, sm_count: int, waves: float) -> int:
    """Split-K factor that brings the grid to about ``waves`` × SMs programs (≥ 1 tile per split)."""
    return int(max(1, min(num_tiles, round(waves * sm_count / max(programs, 1)))))


def _fit_block_k(block_k: int, group_size: int) -> int:
    """The largest power of two ≤ ``block_k`` (and ≥ 16) dividing ``group_size``, so one tile needs
    one row of scales; ``block_k`` itself where none does (the kernels then scale per weight)."""
    size = block_k
    while size >= 16:
        if group_size % size == 0:
            return size
        size //= 2
    return block_k


def candidate_configs(M: int, K: int, N: int, bits: int, sm_count: int, group_size: int = 1 << 30,
                      cuda_kernels: bool = False, cuda_mma: bool = False,
                      scale_dtype: torch.dtype = torch.float16) -> list[LaunchConfig]:
    """The configurations tuning tries for this shape (every one computes the same function).

    ``cuda_kernels``: include the CUDA C++ GEMV (pass ``cuda_gemv_ready()``; False on the CPU);
    ``cuda_mma``: include the tensor-core kernel (pass ``cuda_mma_ready()``; it also needs 16-bit
    ``scale_dtype``).
    """
    bucket = m_bucket(M)
    per_word = 32 // bits
    found: list[LaunchConfig] = []

    def add(strategy, bm, bn, bk, warps, stages, waves_list):
        if strategy not in _TILE_IN_GROUP:
            bk = _fit_block_k(bk, group_size)
        num_tiles = triton.cdiv(K, bk)
        programs = triton.cdiv(N, bn) * triton.cdiv(M, bm)
        for waves in waves_list:
            cfg = LaunchConfig(strategy, bm, bn, bk, _auto_split(programs, num_tiles, sm_count, waves), warps, stages)
            if cfg not in found and tile_fits_group(cfg, group_size, K):
                found.append(cfg)

    # CUDA-core GEMV, one row: BLOCK_N = 128 · warps keeps a tile's rows inside each thread
    if bucket == 1:
        for rows, warps in ((8, 4), (4, 4), (8, 2), (4, 8)):
            add("gemv_rows", 1, 128 * warps, rows * per_word, warps, 1, (2, 4, 8))
    # tensor cores, one tl.dot per code slot (16 words = 128 4-bit positions per tile), the
    # activation tile loaded once and split into slots in registers (the variants without _xs,
    # which gather each slot's activations from memory, lost everywhere on H100: see docs/kernels.md)
    bm = min(max(bucket, 16), 64)
    tiles = ((64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 4, 4), (128, 4, 5), (256, 8, 3), (256, 8, 4))
    for bn, warps, stages in tiles:
        add("dot_slices_swap_xs", bm, bn, 16 * per_word, warps, stages, (1, 2, 4) if bucket >= 16 else (2, 4))
    if bucket >= 2:
        for bn, warps, stages in tiles[:5]:
            add("dot_slices_xs", bm, bn, 16 * per_word, warps, stages, (2, 4))
    # the older kernels (any group length)
    if bucket == 1:
        add("gemv", 1, 64, 128, 4, 3, (4,))
    if bucket >= 32:
        add("dot", bm, 64, 128, 4, 3, (2, 4))
    if bucket >= 128:
        add("dot", 64, 128, 64, 4, 4, (1,))
        add("dot", 128, 128, 64, 8, 3, (1,))
    if bucket >= 16:  # dequantize + cuBLAS: only competitive once the product itself costs something
        found.append(LaunchConfig("dequant", bucket, 64, 128 if bits == 4 else 64))
    if cuda_kernels:
        found.extend(cuda_gemv_configs(M, K, N, bits, group_size))
    if cuda_mma:
        found.extend(cuda_mma_configs(M, K, N, bits, group_size, sm_count, scale_dtype))
    return found


def default_config(M: int, K: int, N: int, bits: int, sm_count: int, group_size: int = 1 << 30,
                   cuda_mma: bool = False, scale_dtype: torch.dtype = torch.float16) -> LaunchConfig:
    """The untuned choice (inside a capture or compile trace, or with autotuning off).

    ``cuda_mma``: the extension is loaded on an sm_80+ device; then the tensor-core kernel serves
    M ≤ 16 (variant, split and warps by the rule of ``mma.default_launch``).
    """
    if cuda_mma:
        from neural_quantization.kernels.cuda import mma

        block_m = mma.block_m_for(M)
        if block_m is not None and mma.supports(M, K, N, bits, group_size, scale_dtype):
            variant, split, warps = mma.default_launch(K, N, sm_count)
            return _cuda_mma_config(block_m, variant, split, warps)
    bucket = m_bucket(M)
    per_word = 32 // bits
    if bucket == 1:
        bm, bn, bk, strategy, warps, stages = 1, 512, 8 * per_word, "gemv_rows", 4, 1
    elif bucket <= 8:
        bm, bn, bk, strategy, warps, stages = 16, 64, 16 * per_word, "dot_slices_xs", 4, 3
    else:
        bm, bn, bk, strategy, warps, stages = min(max(bucket, 16), 64), 128, 16 * per_word, "dot_slices_swap_xs", 4, 3
    config = LaunchConfig(strategy, bm, bn, bk, 1, warps, stages)
    if not tile_fits_group(config, group_size, K):
        bm = 1 if bucket == 1 else min(max(bucket, 16), 64)
        bn, bk, strategy = 64, _fit_block_k(128, group_size), ("gemv" if bucket == 1 else "dot")
    programs = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    return LaunchConfig(strategy, bm, bn, bk, _auto_split(programs, triton.cdiv(K, bk), sm_count, 4), warps,
                        stages if strategy in _TILE_IN_GROUP else 3)


# ---------------------------------------------------------------------------------------------
_TUNED: dict[tuple, LaunchConfig] = {}
_TUNING_ROTATION_BYTES = 128 * 1024 * 1024
TUNING_LOG: list[dict] = []
_PERSISTENT_LOADED: set[str] = set()  # devices whose stored choices are in _TUNED
_CHOSEN: dict[tuple, LaunchConfig] = {}  # eager keys served by a neighbouring stored choice or the heuristic
_AUTOTUNE_OVERRIDE: list[bool] = []


def tuning_key(x2d, K, N, bits, group_size, symmetric, has_perm) -> tuple:
    """The key a kernel choice is stored under: (device, M bucket, K, N, dtype, bits, group size,
    symmetric, act-order) for activations ``x2d`` (M, K)."""
    device = x2d.device
    return (str(device), m_bucket(x2d.shape[0]), K, N, str(x2d.dtype), bits, group_size, symmetric, has_perm)


def is_tuned(key: tuple) -> bool:
    """Whether a tuned choice for exactly ``key`` is in this process's table (tuned here or stored)."""
    return key in _TUNED


def autotune_enabled() -> bool:
    """Whether a key missing from every cache is tuned on the spot (``NQ_KERNEL_AUTOTUNE=1`` or
    inside :func:`tuning_on_the_spot`); otherwise it takes the heuristic choice."""
    if _AUTOTUNE_OVERRIDE:
        return _AUTOTUNE_OVERRIDE[-1]
    return os.environ.get("NQ_KERNEL_AUTOTUNE", "0") not in ("0", "false", "False", "")


@contextlib.contextmanager
def tuning_on_the_spot(enabled: bool = True):
    """Within this block, missing keys are tuned (and saved) at their first eager call, or never."""
    _AUTOTUNE_OVERRIDE.append(enabled)
    try:
        yield
    finally:
        _AUTOTUNE_OVERRIDE.pop()


def _stored_config(entry: dict, device: torch.device) -> LaunchConfig | None:
    """The ``LaunchConfig`` of a stored entry, or None where it cannot run here (an unknown field or
    strategy, or a CUDA-extension strategy where the extension does not build)."""
    known = {field.name for field in fields(LaunchConfig)}
    values = entry["config"]
    if not set(values) <= known or values.get("strategy") not in STRATEGIES:
        return None
    try:
        config = LaunchConfig(**values)
    except TypeError:
        return None
    if config.strategy == "cuda_gemv" and not cuda_gemv_ready(device.type):
        return None
    if config.strategy == "cuda_mma" and not cuda_mma_ready(device):
        return None
    return config


def load_stored_choices(device: torch.device) -> int:
    """Put the shipped defaults and the user's cache for this GPU into the in-process table (once per
    device; eager only: reading them may build the CUDA extension). Returns how many were taken."""
    device = torch.device(device)
    name = str(device)
    if device.type != "cuda" or name in _PERSISTENT_LOADED:
        return 0
    _PERSISTENT_LOADED.add(name)
    taken = 0
    for entry in tuning_cache.load(torch.cuda.get_device_name(device)):
        config = _stored_config(entry, device)
        if config is not None:
            _TUNED[(name, *tuning_cache.entry_key(entry))] = config
            taken += 1
    return taken


def _stored_choice(key: tuple) -> LaunchConfig | None:
    """The choice for ``key``, or for the same shape with the other symmetry / act-order (the same
    kernels run both; only the zero loads and the activation gather differ)."""
    config = _TUNED.get(key)
    if config is not None:
        return config
    for symmetric, act_order in ((key[7], not key[8]), (not key[7], key[8]), (not key[7], not key[8])):
        config = _TUNED.get((*key[:7], symmetric, act_order))
        if config is not None:
            return config
    return None


def _entry(key: tuple, config: LaunchConfig, elapsed_us: float) -> dict:
    values = dict(zip(tuning_cache.KEY_FIELDS, key[1:]))
    return {**values, "config": asdict(config), "us": round(elapsed_us, 3)}


def weight_copies(qweight, qzeros, scales) -> list[tuple]:
    """The layer's tensors plus enough clones to exceed the L2 cache together (tuning rotates them,
    so candidates are compared on weights streamed from DRAM, as in a model)."""
    layer_bytes = sum(t.numel() * t.element_size() for t in (qweight, qzeros, scales))
    return [(qweight, qzeros, scales)] + [
        (qweight.clone(), qzeros.clone(), scales.clone())
        for _ in range(min(9, _TUNING_ROTATION_BYTES // max(layer_bytes, 1)))
    ]


def time_config(config: LaunchConfig, x2d, copies, perm, bias, bits, group_size, in_features, symmetric) -> float:
    """µs per call of ``config`` on these inputs, cycling through ``copies`` (see :func:`weight_copies`)
    in a private CUDA graph; raises where the configuration does not compile or fit."""
    launches = [
        (lambda w=w: launch(config, x2d, w[0], w[1], w[2], perm, bias, bits, group_size, in_features, symmetric))
        for w in copies
    ]
    launches[0]()
    torch.cuda.synchronize(x2d.device)
    return time_in_graph(launches, calls=max(10, len(launches)), repeats=5)


def tune(x2d, qweight, qzeros, scales, perm, bias, bits, group_size, in_features, symmetric,
         copies: list[tuple] | None = None) -> LaunchConfig:
    """Time every candidate on these inputs (eagerly, CUDA only), keep the fastest and save it in the
    user's tuning cache (``kernels/tuning_cache.py``)."""
    M, N = x2d.shape[0], qweight.shape[1]
    sm_count = _sm_count(x2d.device)
    _tickets(x2d.device, 1 << 16)
    copies = copies or weight_copies(qweight, qzeros, scales)
    best, best_time, timings = None, float("inf"), {}
    cuda_kernels = bits == 4 and M <= 2 and cuda_gemv_ready(x2d.device.type)
    with_mma = bits == 4 and M <= 16 and cuda_mma_ready(x2d.device)
    for config in candidate_configs(M, in_features, N, bits, sm_count, group_size, cuda_kernels, with_mma,
                                    scales.dtype):
        try:
            elapsed = time_config(config, x2d, copies, perm, bias, bits, group_size, in_features, symmetric)
        except Exception as error:  # a configuration that does not compile or fit is skipped
            timings[config.describe()] = f"failed: {type(error).__name__}"
            continue
        timings[config.describe()] = round(elapsed, 2)
        if elapsed < best_time:
            best, best_time = config, elapsed
    key = tuning_key(x2d, in_features, N, bits, group_size, symmetric, perm is not None)
    if best is None:
        best = default_config(M, in_features, N, bits, sm_count, group_size)
    else:
        tuning_cache.record(torch.cuda.get_device_name(x2d.device), _entry(key, best, best_time))
    _TUNED[key] = best
    _CHOSEN.pop(key, None)
    TUNING_LOG.append({"key": list(map(str, key)), "best": best.describe(), "best_us": round(best_time, 2),
                       "timings_us": timings})
    return best


def heuristic_config(x2d, qweight, scales, bits, group_size, in_features) -> LaunchConfig:
    """:func:`default_config` for these inputs; the tensor-core kernel is taken where the CUDA
    extension is loaded, or (eagerly) where it builds."""
    device = x2d.device
    eager = _eager_cuda(device)
    with_mma = (cuda_mma_ready(device) if eager else _cuda_mma_loaded(device)) and bits == 4
    return default_config(x2d.shape[0], in_features, qweight.shape[1], bits, _sm_count(device), group_size,
                          with_mma, scales.dtype)


_hinted: list[bool] = []


def _hint_untuned(key: tuple) -> None:
    """Say once per process that the heuristic serves a shape, and how to tune it."""
    if not _hinted:
        _hinted.append(True)
        warnings.warn(
            f"no tuned int4 kernel choice for some layer shapes on this GPU (first: K={key[2]} N={key[3]}, "
            f"{key[1]} rows); the built-in heuristic serves them. `neural-quantize tune MODEL_DIR` tunes a "
            "model's shapes ahead and caches the choices (NQ_KERNEL_AUTOTUNE=1 tunes them at first use).",
            stacklevel=3)


def select_config(x2d, qweight, qzeros, scales, perm, bias, bits, group_size, in_features, symmetric):
    """The stored choice for this shape, else a tuned one (with on-the-spot tuning on), else the
    heuristic (see the module docstring)."""
    key = tuning_key(x2d, in_features, qweight.shape[1], bits, group_size, symmetric, perm is not None)
    config = _TUNED.get(key) or _CHOSEN.get(key)
    if config is not None:
        return config
    device = x2d.device
    eager = _eager_cuda(device)
    if eager:
        load_stored_choices(device)
    config = _stored_choice(key)
    if config is None and eager and autotune_enabled():
        return tune(x2d, qweight, qzeros, scales, perm, bias, bits, group_size, in_features, symmetric)
    if config is None:
        if eager:
            _hint_untuned(key)
        config = heuristic_config(x2d, qweight, scales, bits, group_size, in_features)
    if eager:
        _CHOSEN[key] = config
    return config


def run(x2d, qweight, qzeros, scales, perm, bias, bits, group_size, in_features, symmetric,
        config: LaunchConfig | None = None) -> torch.Tensor:
    """Dispatch one quantized matmul (``config`` forces a choice, for tests and benchmarks)."""
    if config is None:
        config = select_config(x2d, qweight, qzeros, scales, perm, bias, bits, group_size, in_features, symmetric)
    return launch(config, x2d, qweight, qzeros, scales, perm, bias, bits, group_size, in_features, symmetric)


# ---------------------------------------------------------------------------------------------
# the lean call path of one prepared layer
def _compiled_runner(compiled, grid):
    """A launcher that skips Triton's per-call argument binding, or None where this Triton lacks it."""
    try:
        return compiled[grid]
    except Exception:  # noqa: BLE001 - any Triton without CompiledKernel.__getitem__ uses the normal path
        return None


class PreparedMatmul:
    """``y = x[..., perm] @ W^T + bias`` for one prepared layer, with the per-call work cut to the bone.

    Per (M, dtype, alignment of x) the launch is resolved once: the tuned (or default) configuration,
    grid, split-K factor, constexprs, and on CUDA the compiled kernel itself, so a later call only
    allocates its output (and split-K partials) and launches the compiled kernel directly, without
    Triton's argument binding or specialization (that is what costs tens of µs per eager call).
    The first resolution launches through Triton normally and checks that the direct launch gives
    the same bits; where it cannot (an older Triton, a capture in progress), the normal launch is
    kept. Safe inside CUDA graph capture once resolved; under ``torch.compile`` use the custom op.
    """

    def __init__(self, qweight, qzeros, scales, perm, bias, bits, group_size, in_features, symmetric):
        self.qweight, self.qzeros, self.scales, self.perm, self.bias = qweight, qzeros, scales, perm, bias
        self.bits, self.group_size, self.in_features, self.symmetric = bits, group_size, in_features, symmetric
        self.out_features = qweight.shape[1]
        self.device = qweight.device
        self._launchers: dict[tuple, object] = {}
        self.direct_status = "unresolved"  # "direct" once calls bypass Triton's launch path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        stride = x2d.stride(0)
        key = (x2d.shape[0], x2d.dtype, x2d.data_ptr() % 16 == 0, stride % 16 == 0, stride == 1)
        fn = self._launchers.get(key)
        if fn is None:
            fn = self._resolve(x2d, key)
        out = fn(x2d)
        return out.reshape(*lead, self.out_features) if len(lead) != 1 else out

    def config_for(self, x2d: torch.Tensor) -> LaunchConfig:
        return select_config(x2d, self.qweight, self.qzeros, self.scales, self.perm, self.bias, self.bits,
                             self.group_size, self.in_features, self.symmetric)

    def _generic(self, config):
        args = (self.qweight, self.qzeros, self.scales, self.perm, self.bias, self.bits, self.group_size,
                self.in_features, self.symmetric)
        return lambda x2d: launch(config, x2d, *args)

    def _resolve(self, x2d: torch.Tensor, key: tuple):
        config = self.config_for(x2d)
        fn = self._generic(config)
        M, N, K = x2d.shape[0], self.out_features, self.in_features
        safe = _eager_cuda(x2d.device) and config.strategy != "dequant" and M > 0 and N > 0 and K > 0
        if safe and config.strategy == "cuda_gemv":
            fn = self._cuda_direct(config, x2d)
        elif safe and config.strategy == "cuda_mma":
            fn = self._cuda_mma_direct(config, x2d)
        elif safe:
            fn = self._direct(config, x2d) or fn
        if not _capturing(x2d.device):
            self._launchers[key] = fn
        return fn

    def _cuda_direct(self, config: LaunchConfig, x2d: torch.Tensor):
        """The extension function with every argument but x bound (``cuda_gemv``)."""
        from neural_quantization.kernels.cuda import gemv as cuda_gemv

        module = cuda_gemv.load()
        block_m, warps, units_per_warp, tickets = _cuda_gemv_args(
            config, x2d.shape[0], self.in_features, self.out_features, self.bits, self.group_size, x2d.device)
        args = (self.qweight, self.scales, self.qzeros, self.perm, self.bias,
                self.qweight if tickets is None else tickets, self.group_size, self.in_features, self.symmetric,
                block_m, warps, units_per_warp, config.variant)
        function = module.gemv_int4
        self.direct_status = "direct"
        return lambda x2d: function(x2d, *args)

    def _cuda_mma_direct(self, config: LaunchConfig, x2d: torch.Tensor):
        """The extension function with every argument but x bound (``cuda_mma``)."""
        from neural_quantization.kernels.cuda import extension

        from neural_quantization.kernels.cuda import mma

        module = extension.load()
        tickets, splits, pdl = _cuda_mma_args(config, self.out_features, self.qweight)
        args = (self.qweight, self.scales, self.qzeros, self.symmetric, self.perm, self.bias, tickets,
                mma.group_length(self.group_size, self.in_features), self.in_features, config.block_m,
                config.num_warps, config.variant, splits, pdl)
        function = module.mma_int4
        self.direct_status = "direct"
        return lambda x2d: function(x2d, *args)

    def _direct(self, config: LaunchConfig, x2d: torch.Tensor):
        """A direct launcher of the compiled kernel, checked against Triton's own launch (or None).

        Triton versions differ in what the compiled launcher takes after the grid: every kernel
        argument (constexprs included, ignored by the launcher) or only the run-time ones. Both are
        tried; the first that reproduces Triton's own result bit for bit is kept.
        """
        M, N, K = x2d.shape[0], self.out_features, self.in_features
        plan = _plan(config, M, N, K, x2d.dtype, x2d.device, self.bits, self.group_size, self.symmetric,
                     self.perm is not None, self.bias is not None)
        split_k, dtype, device = plan.split_k, x2d.dtype, x2d.device
        expected = torch.empty((M, N), dtype=dtype, device=device)
        partial = torch.empty((split_k, M, N), dtype=torch.float32, device=device) if split_k > 1 else expected
        compiled = plan.kernel[plan.grid](*_args(plan, x2d, self.qweight, self.qzeros, self.scales, self.perm,
                                                 self.bias, expected, partial, K, self.group_size),
                                          **plan.constexprs)
        runner = _compiled_runner(compiled, plan.grid) if compiled is not None else None
        if runner is None:
            self.direct_status = "no compiled-kernel launcher in this Triton"
            return None
        constexpr_values = tuple(plan.constexprs[name] for name in plan.kernel.arg_names if name in plan.constexprs)
        weights = (self.qweight, self.scales, self.qzeros, self.qweight if self.perm is None else self.perm)
        bias, group_size, tiles_per_split = self.bias, self.group_size, plan.tiles_per_split
        tickets = _TICKETS.get((device.type, device.index)) if split_k > 1 else None
        failures = []
        for tail in (constexpr_values, ()):

            def direct(x2d, tail=tail):
                rows = x2d.shape[0]
                out = torch.empty((rows, N), dtype=dtype, device=device)
                if split_k > 1:
                    part = torch.empty((split_k, rows, N), dtype=torch.float32, device=device)
                    runner(x2d, *weights, out if bias is None else bias, out, part, tickets, rows, N, K,
                           x2d.stride(0), N, group_size, tiles_per_split, split_k, *tail)
                else:
                    runner(x2d, *weights, out if bias is None else bias, out, out, out, rows, N, K,
                           x2d.stride(0), N, group_size, tiles_per_split, split_k, *tail)
                return out

            try:
                got = direct(x2d)
                torch.cuda.synchronize(device)
                if torch.equal(got, expected):
                    self.direct_status = "direct"
                    return direct
                failures.append("mismatch")
            except Exception as error:  # noqa: BLE001 - this launcher convention does not apply here
                failures.append(f"{type(error).__name__}: {str(error)[:120]}")
        self.direct_status = "; ".join(failures)
        return None
