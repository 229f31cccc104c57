"""Decode attention over a grouped-query KV cache (one query row per head): launch and fallback.

:func:`decode_attention` computes ``kernels/reference.decode_attention_reference`` with the Triton
kernels of ``kernels/triton/decode_attention.py`` where they can run (a CUDA tensor, or the Triton
interpreter on the CPU) and with the reference elsewhere. The split over the cache's length is
chosen from the number of programs B · Hkv and the device's multiprocessors, so a step with one
sequence still fills the GPU; it depends only on shapes, so a CUDA graph captures a fixed launch.
"""

from __future__ import annotations

import torch

from neural_quantization.kernels.reference import decode_attention_reference

BLOCK_N = 64  # keys per inner block
_PROGRAMS_PER_SM = 2


def supported(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether the kernel handles these shapes: a power-of-two head size from 16 to 256, Hq a
    multiple of Hkv with at most 16 query heads per KV head, fp16/bf16/fp32 tensors."""
    head_dim = query.shape[-1]
    group, rest = divmod(query.shape[1], key.shape[1])
    return (rest == 0 and 1 <= group <= 16 and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0
            and query.dtype in (torch.float16, torch.bfloat16, torch.float32) and key.dtype == query.dtype
            and key.stride(-1) == 1 and query.stride(-1) == 1)


def _splits(programs: int, length: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split): about ``_PROGRAMS_PER_SM`` programs per multiprocessor in all."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    blocks = -(-length // BLOCK_N)
    splits = max(1, min(blocks, -(-_PROGRAMS_PER_SM * sms // programs)))
    per_split = -(-blocks // splits) * BLOCK_N
    return -(-length // per_split), per_split


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """query (B, Hq, D); key, value (B, Hkv, L, D) (last dim contiguous); mask (B, L) bool or
    integer, nonzero = attend. Returns (B, Hq, D) in the query's dtype."""
    from neural_quantization.kernels import triton as triton_kernels

    if not (supported(query, key) and value.stride(-1) == 1 and triton_kernels.available(query.device.type)):
        return decode_attention_reference(query, key, value, mask, scale)
    from neural_quantization.kernels.triton.decode_attention import (
        decode_attention_combine_kernel,
        decode_attention_split_kernel,
    )

    batch, heads, head_dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    mask = mask if mask.dtype != torch.bool else mask.view(torch.uint8)
    splits, per_split = _splits(batch * kv_heads, length, query.device)
    partial = torch.empty(batch * heads * splits, head_dim, device=query.device, dtype=torch.float32)
    lse = torch.empty(batch * heads * splits, device=query.device, dtype=torch.float32)
    decode_attention_split_kernel[(batch * kv_heads, splits)](
        query, key, value, mask, partial, lse,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask.stride(0),
        kv_heads, length, per_split, scale,
        GROUP=group, BLOCK_G=16, BLOCK_N=BLOCK_N, HEAD_DIM=head_dim, num_warps=4,
    )
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    decode_attention_combine_kernel[(batch * heads,)](
        partial, lse, out, out.stride(0), out.stride(1), heads, splits,
        BLOCK_S=max(2, 1 << (splits - 1).bit_length()), HEAD_DIM=head_dim, num_warps=4,
    )
    return out
