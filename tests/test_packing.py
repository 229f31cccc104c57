"""Exact round trips of the bit packing and of the GPTQ tensor layout."""

import pytest
import torch

from neural_quantization.config import QuantizationConfig
from neural_quantization.core.gptq import accumulate_hessian, gptq_quantize
from neural_quantization.core.quantized_weight import QuantizedWeight, group_index, num_groups
from neural_quantization.formats.gptq import (
    from_gptq_tensors,
    gptq_layer_bytes,
    gptq_tensor_shapes,
    to_gptq_tensors,
)
from neural_quantization.formats.packing import pack, packed_length, unpack
from neural_quantization.kernels.reference import dequantize_gptq


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (31, 5), (33, 2), (96, 4), (130, 9)])
def test_pack_unpack_round_trip(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[0])
    codes = torch.randint(0, 1 << bits, shape, generator=g)
    words = pack(codes, bits, dim=0)
    assert words.dtype == torch.int32 and words.shape == (packed_length(shape[0], bits), shape[1])
    assert torch.equal(unpack(words, bits, shape[0], dim=0), codes.int())
    words_n = pack(codes.T, bits, dim=1)
    assert torch.equal(unpack(words_n, bits, shape[0], dim=1), codes.T.int())


def test_4bit_layout_is_gptq_little_endian_nibbles():
    codes = torch.arange(1, 9).reshape(8, 1)
    assert pack(codes, 4)[0, 0].item() & 0xFFFFFFFF == 0x87654321  # python ints: no int32 overflow
    assert pack(torch.full((8, 1), 15), 4)[0, 0].item() == -1  # 0xFFFFFFFF as int32


def test_3bit_codes_straddle_words_like_autogptq():
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10] = 0b111  # bits 30..32: two bits in word 0, one in word 1
    words = pack(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert words[:, 0].tolist() == [0b11 << 30, 1, 0]


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ValueError):
        pack(torch.tensor([[16]]), 4)


@pytest.mark.parametrize("bits,group_size,sym,desc_act", [(4, 32, True, False), (3, 64, False, True), (8, -1, True, False), (2, 16, False, False)])
def test_gptq_tensors_round_trip_and_reference_dequant(bits, group_size, sym, desc_act):
    torch.manual_seed(0)
    w = torch.randn(24, 100)
    h, _ = accumulate_hessian(None, 0, torch.randn(300, 100))
    q = gptq_quantize(w, h, QuantizationConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act))
    tensors = to_gptq_tensors(q)
    assert tensors["qweight"].shape == (packed_length(100, bits), 24)
    assert tensors["qzeros"].shape == (q.scales.shape[0], packed_length(24, bits))
    assert tensors["scales"].dtype == torch.float16 and tensors["g_idx"].dtype == torch.int32
    back = from_gptq_tensors(**tensors, bits=bits, group_size=group_size, in_features=100)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zeros, q.zeros)
    assert torch.equal(back.scales, q.scales)
    assert torch.equal(dequantize_gptq(**tensors, bits=bits, in_features=100), q.dequantize())


def test_symmetric_4bit_zeros_are_stored_as_seven():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    h, _ = accumulate_hessian(None, 0, torch.randn(200, 64))
    tensors = to_gptq_tensors(gptq_quantize(w, h, QuantizationConfig(bits=4, group_size=32)))
    assert (tensors["qzeros"] == 0x77777777).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features, out_features", [(40, 20), (104, 36), (1, 3)])
@pytest.mark.parametrize("group_size", [-1, 16, 32])
def test_gptq_layer_bytes_is_the_packed_tensors_byte_count(bits, in_features, out_features, group_size):
    """The one byte count of a GPTQ layer, padding included, for K and N that fill no whole chunk
    (3 bits: K = 40 needs 6 words per column, not ceil(3 · 40 / 32) = 4)."""
    g = torch.Generator().manual_seed(bits * 7 + in_features)
    k, n, groups = in_features, out_features, num_groups(in_features, group_size)
    qw = QuantizedWeight(
        codes=torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.int32),
        scales=torch.rand(groups, n, generator=g) + 0.5,
        zeros=torch.randint(1, 1 << bits, (groups, n), generator=g, dtype=torch.int32),
        g_idx=group_index(k, group_size),
        bits=bits,
        group_size=group_size,
    )
    tensors = to_gptq_tensors(qw)
    assert {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()} == gptq_tensor_shapes(bits, group_size, k, n)
    assert gptq_layer_bytes(bits, group_size, k, n) == sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_v2_zeros_round_trip_and_a_zero_of_zero_is_refused(bits):
    from neural_quantization.formats.gptq import zeros_from_v2, zeros_to_v2

    zeros = torch.randint(1, 1 << bits, (3, 64), generator=torch.Generator().manual_seed(bits))
    v1 = pack(zeros - 1, bits, dim=1)
    v2 = zeros_to_v2(v1, bits, 64)
    assert torch.equal(unpack(v2, bits, 64, dim=1), zeros)  # v2 stores the zero itself
    assert torch.equal(zeros_from_v2(v2, bits, 64), v1)
    zeros[1, 5] = 0
    with pytest.raises(ValueError, match="zero points are 0"):
        zeros_from_v2(pack(zeros, bits, dim=1), bits, 64)
