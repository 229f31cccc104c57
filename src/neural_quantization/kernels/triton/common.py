"""Pieces shared by the Triton kernels: code extraction, zero points, and the split-K epilogue.

Notation used by every kernel in this package (the "kernel order" of ``kernels/layout.py``):

* ``x``      (M, K_in) activations (fp16 or bf16), row stride ``stride_xm``; with act-order the
  kernel reads column ``perm[k]`` of ``x`` for its k-th input position.
* ``qweight`` (ceil(K / P), N) int32, ``P = 32 // BITS`` codes per word, word ``r`` holding the codes
  of kernel positions ``k = P·r … P·r + P - 1`` (code ``P·r + j`` in bits ``BITS·j …``): the GPTQ
  layout, with rows permuted into group order for act-order checkpoints.
* groups are contiguous runs of ``group_size`` kernel positions: ``g(k) = k // group_size``
  (per-channel layers pass a group size ≥ K, so g = 0).
* ``scales`` (G, N) fp16 and ``qzeros`` (G, ceil(N / P)) int32 holding ``zero - 1`` (GPTQ).

    y[m, n] = Σ_k x[m, perm[k]] · scales[g(k), n] · (q[k, n] - zero[g(k), n])

A kernel loads a (BLOCK_K / P, BLOCK_N) tile of words (16-byte loads along N, coalesced) and
:func:`unpack_tile` expands it in registers into the (BLOCK_K, BLOCK_N) tile of codes in natural k
order, so the activations are one contiguous (BLOCK_M, BLOCK_K) load and one ``tl.dot``.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: bits of the fp32 number 2**23: OR-ing an integer q < 2**23 into its mantissa gives 2**23 + q.
FP32_MAGIC = tl.constexpr(0x4B000000)
FP32_MAGIC_VALUE = tl.constexpr(8388608.0)


@triton.jit
def extract_codes(words, j: tl.constexpr, BITS: tl.constexpr):
    """Code ``j`` of every int32 word: ``(words >> BITS·j) & (2**BITS - 1)`` (int32, ≥ 0)."""
    return (words >> (j * BITS)) & ((1 << BITS) - 1)


@triton.jit
def unpack_tile(words, BITS: tl.constexpr):
    """(R, BLOCK_N) int32 words -> (R·P, BLOCK_N) int32 codes with ``codes[P·r + j] = code j of word r``.

    The P codes of a word are stacked on a new trailing axis with ``tl.join`` (a binary tree whose
    leaves are ordered so the stacked index is j), which keeps them in one thread's registers; a
    permute and a reshape then interleave them into the K axis.
    """
    R: tl.constexpr = words.shape[0]
    BLOCK_N: tl.constexpr = words.shape[1]
    if BITS == 4:
        stacked = tl.join(
            tl.join(tl.join(extract_codes(words, 0, 4), extract_codes(words, 4, 4)),
                    tl.join(extract_codes(words, 2, 4), extract_codes(words, 6, 4))),
            tl.join(tl.join(extract_codes(words, 1, 4), extract_codes(words, 5, 4)),
                    tl.join(extract_codes(words, 3, 4), extract_codes(words, 7, 4))),
        )  # (R, N, 2, 2, 2): index (c, b, a) holds code j = 4c + 2b + a
        stacked = tl.reshape(stacked, (R, BLOCK_N, 8))
        codes = tl.reshape(tl.permute(stacked, (0, 2, 1)), (R * 8, BLOCK_N))
    else:
        stacked = tl.join(tl.join(extract_codes(words, 0, 8), extract_codes(words, 2, 8)),
                          tl.join(extract_codes(words, 1, 8), extract_codes(words, 3, 8)))
        stacked = tl.reshape(stacked, (R, BLOCK_N, 4))
        codes = tl.reshape(tl.permute(stacked, (0, 2, 1)), (R * 4, BLOCK_N))
    return codes


@triton.jit
def load_zero_points(qzeros_ptr, group, offs_n, n_mask, packed_n, BITS: tl.constexpr,
                     SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Zero points (BLOCK_N,) int32 of one group; GPTQ stores ``zero - 1``, packed along N.

    Symmetric layers skip the load: their zero is ``2**(BITS-1)`` everywhere.
    """
    if SYMMETRIC:
        zeros = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.int32)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        words = tl.load(qzeros_ptr + group * packed_n + offs_n // PER_WORD, mask=n_mask, other=0)
        zeros = ((words >> ((offs_n % PER_WORD) * BITS)) & ((1 << BITS) - 1)) + 1
    return zeros


@triton.jit
def load_zero_points_2d(qzeros_ptr, groups, offs_n, n_mask, packed_n, BITS: tl.constexpr,
                        SYMMETRIC: tl.constexpr):
    """Zero points (ROWS, BLOCK_N) int32 for a column of group indices ``groups`` (ROWS,)."""
    if SYMMETRIC:
        zeros = tl.full((groups.shape[0], offs_n.shape[0]), 1 << (BITS - 1), tl.int32)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        words = tl.load(qzeros_ptr + groups[:, None] * packed_n + (offs_n // PER_WORD)[None, :],
                        mask=n_mask[None, :], other=0)
        zeros = ((words >> ((offs_n % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)) + 1
    return zeros


@triton.jit
def split_tiles(pid_k, tiles_per_split, K, BLOCK_K: tl.constexpr):
    """The tiles ``[begin, end)`` of BLOCK_K positions that split ``pid_k`` of the grid sums."""
    tile_begin = pid_k * tiles_per_split
    return tile_begin, tl.minimum(tile_begin + tiles_per_split, tl.cdiv(K, BLOCK_K))


@triton.jit
def input_columns(perm_ptr, k, K, HAS_PERM: tl.constexpr):
    """(mask k < K, the input column each kernel position k reads: ``perm[k]`` with act-order, else k)."""
    k_mask = k < K
    if HAS_PERM:
        source = tl.load(perm_ptr + k, mask=k_mask, other=0)
    else:
        source = k
    return k_mask, source


@triton.jit
def load_words_and_sources(qweight_ptr, perm_ptr, tile, offs_r, offs_k, offs_n, n_mask, n_words, N, K,
                           ROWS: tl.constexpr, BLOCK_K: tl.constexpr, HAS_PERM: tl.constexpr):
    """One tile in K order: its packed words (ROWS, BLOCK_N) (zero past the edges), its positions
    ``k`` (BLOCK_K,), their mask, and the input column each position reads (``input_columns``)."""
    rows = tile * ROWS + offs_r
    words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                    mask=(rows < n_words)[:, None] & n_mask[None, :], other=0)
    k = tile * BLOCK_K + offs_k
    k_mask, source = input_columns(perm_ptr, k, K, HAS_PERM)
    return words, k, k_mask, source


@triton.jit
def finish_output(acc, out_ptr, bias_ptr, partial_ptr, ticket_ptr, offs_m, offs_n, m_mask, n_mask,
                  M, N, stride_om, pid_k, split_k, lock_id,
                  HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr):
    """Write ``acc`` (BLOCK_M, BLOCK_N) fp32 as the output tile, reducing split-K partials first.

    Without split-K the tile is final: add the bias, round to the output dtype, store.

    With split-K each of the ``split_k`` programs of one output tile stores its fp32 partial into
    ``partial[pid_k]`` (split_k, M, N), then takes a ticket from the tile's counter
    (``ticket[lock_id]``, an atomic add with acquire-release order at GPU scope, after a barrier so
    the whole program's stores are released). The program that draws the last ticket sums the
    partials in a fixed order (so results are deterministic), writes the output and resets the
    counter to 0 for the next launch. Counters therefore start and end every launch at zero: no
    memset, no second kernel, safe inside CUDA graphs as long as launches on one counter buffer
    do not run concurrently (one stream).
    """
    mask = m_mask[:, None] & n_mask[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if USE_SPLIT:
        tl.store(partial_ptr + (pid_k * M + offs_m)[:, None] * N + offs_n[None, :], acc, mask=mask)
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + lock_id, 1, sem="acq_rel", scope="gpu")
        if ticket == split_k - 1:
            total = tl.zeros(acc.shape, tl.float32)
            for s in range(split_k):
                total += tl.load(partial_ptr + (s * M + offs_m)[:, None] * N + offs_n[None, :], mask=mask,
                                 other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(ticket_ptr + lock_id, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
