"""Pack b-bit integer codes into int32 words and back, exactly.

Layout (the one GPTQ checkpoints use): the codes along the packed dimension form a little-endian
bit stream. Code ``i`` occupies bits ``[i·b, (i+1)·b)`` of the stream; word ``w`` holds stream bits
``[32w, 32w + 32)``, its bit 0 being stream bit ``32w``. So for 4 bits, word ``w`` holds codes
``8w … 8w+7``, code ``8w + j`` in bits ``4j … 4j+3``:

    codes 0..7 = [1, 2, 3, 4, 5, 6, 7, 8]  ->  word = 0x87654321

For 2, 4 and 8 bits a code never straddles two words. For 3 bits, 32 codes fill exactly 3 words and
codes 10 and 21 straddle a word boundary (the AutoGPTQ 3-bit layout).

The packed dimension is padded with zero codes up to a whole number of words (a multiple of 32
codes for 3 bits, of 32/b otherwise); :func:`unpack` takes the true length and drops the padding.
Words are stored as int32 (two's complement), as GPTQ checkpoints do.
"""

from __future__ import annotations

import math

import torch


def codes_per_chunk(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest run of codes that fills whole words: (8, 1) for 4 bits."""
    codes = 32 // math.gcd(32, bits)
    return codes, codes * bits // 32


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words that hold ``length`` codes of ``bits`` bits (padding included)."""
    codes, words = codes_per_chunk(bits)
    return -(-length // codes) * words


def pack(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer ``codes`` (any int dtype, values in [0, 2**bits)) along ``dim`` into int32 words.

    (L, C) with dim=0 -> (packed_length(L, bits), C); with dim=1, (R, L) -> (R, packed_length(L, bits)).
    """
    if codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D tensor, got shape {tuple(codes.shape)}")
    values = codes.movedim(dim, 0).to(torch.int64)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    length, cols = values.shape
    per_chunk, words_per_chunk = codes_per_chunk(bits)
    chunks = -(-length // per_chunk)
    padded = torch.zeros(chunks * per_chunk, cols, dtype=torch.int64, device=codes.device)
    padded[:length] = values
    padded = padded.view(chunks, per_chunk, cols)
    words = torch.zeros(chunks, words_per_chunk, cols, dtype=torch.int64, device=codes.device)
    for j in range(per_chunk):
        word, shift = divmod(j * bits, 32)
        words[:, word] |= (padded[:, j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the code's high bits continue in the next word
            words[:, word + 1] |= padded[:, j] >> (32 - shift)
    words = words.view(chunks * words_per_chunk, cols)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, length: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 ``words`` -> int32 codes with ``length`` entries along ``dim``."""
    packed = words.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    per_chunk, words_per_chunk = codes_per_chunk(bits)
    chunks = packed.shape[0] // words_per_chunk
    if chunks * per_chunk < length:
        raise ValueError(f"{packed.shape[0]} words hold fewer than {length} {bits}-bit codes")
    packed = packed[: chunks * words_per_chunk].view(chunks, words_per_chunk, -1)
    mask = (1 << bits) - 1
    codes = torch.empty(chunks, per_chunk, packed.shape[-1], dtype=torch.int64, device=words.device)
    for j in range(per_chunk):
        word, shift = divmod(j * bits, 32)
        value = packed[:, word] >> shift
        if shift + bits > 32:
            value = value | (packed[:, word + 1] << (32 - shift))
        codes[:, j] = value & mask
    codes = codes.view(chunks * per_chunk, -1)[:length]
    return codes.to(torch.int32).movedim(0, dim).contiguous()
