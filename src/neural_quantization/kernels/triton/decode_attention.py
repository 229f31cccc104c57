"""Decode attention over a grouped-query (GQA) KV cache, without expanding the cache to every head.

One decode step has one query row per sequence and head, ``q (B, Hq, D)``, against a cache of
``L`` positions, ``k, v (B, Hkv, L, D)``, with ``Hq = G · Hkv`` (G query heads share one KV head).
transformers' SDPA path first copies K and V ``G`` times (``repeat_kv``, (B, Hq, L, D) each) and
then reads the copies: 2·G+1 passes over the cache. Here each program reads its KV head's slice
once and serves all G query heads from it (flash-decoding, Dao et al. 2023):

    program (b·Hkv + h, s) takes keys s·S … (s+1)·S − 1 of sequence b, head h (S = blocks · BLOCK_N):
        scores  = Q_g Kᵀ · scale              (G, BLOCK_N) per block; masked keys get −∞
        running max m, sum l and output acc   (online softmax, fp32)
        writes  o_s = acc / l  and  lse_s = m + log l   (per query head)
    combine (b, hq):  out = Σ_s exp(lse_s − max lse) · o_s / Σ_s exp(lse_s − max lse)

``mask (B, L)`` (nonzero = the key may be attended) is the decode step's key row: it covers left
padding and the not-yet-written tail of a static cache, and masked keys are never loaded. The G
query heads are padded to 16 rows so ``tl.dot`` runs on tensor cores. Splitting over the sequence
fills the GPU when B · Hkv alone is too few programs (one sequence, 8 KV heads: 8 programs).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def decode_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl, stride_mb,
    kv_heads, length, keys_per_split, scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bh // kv_heads
    h = bh % kv_heads
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    q = tl.load(q_ptr + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)  # (BLOCK_G, D)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    begin = split * keys_per_split
    end = tl.minimum(begin + keys_per_split, length)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    for n0 in range(begin, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        allowed = tl.load(mask_ptr + b * stride_mb + offs_n, mask=offs_n < end, other=0) != 0  # (BLOCK_N,)
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=allowed[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_G, BLOCK_N), fp32
        scores = tl.where(allowed[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no allowed key adds nothing
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=allowed[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))
    heads = h * GROUP + offs_g  # (BLOCK_G,) query heads of this program
    row = (b * kv_heads * GROUP + heads) * splits + split  # (B, Hq, splits) flattened
    tl.store(out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=g_mask[:, None])
    tl.store(lse_ptr + row, lse, mask=g_mask)


@triton.jit
def decode_attention_combine_kernel(
    part_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, heads, splits,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Merge the splits of one (sequence, query head): softmax over their log-sum-exps."""
    row = tl.program_id(0)  # b · Hq + hq
    b = row // heads
    hq = row % heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < splits
    lse = tl.load(lse_ptr + row * splits + offs_s, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.where(s_mask, tl.exp(lse - top), 0.0)  # a split with no allowed key has lse = −∞: weight 0
    part = tl.load(part_ptr + (row * splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None],
                   other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))
