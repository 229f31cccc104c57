"""Our GPTQ checkpoint against the rules vLLM's and transformers' GPTQ loaders apply (see docs/formats.md).

Each check names the loader code it comes from. The unpacking here is written independently of
formats/packing.py, the way vLLM's reference dequantization reads the words (shift and mask).
"""

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokens
from safetensors import safe_open
from transformers import GPTQConfig

from neural_quantization import QuantizationConfig, QuantLinear, Quantizer

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # vLLM quantization/utils/marlin_utils.py


def saved_checkpoint(tmp_path, **changes):
    model = tiny_model(intermediate_size=128, num_hidden_layers=1, max_position_embeddings=64)
    ids = tiny_tokens(4, 16)
    config = QuantizationConfig(**{"group_size": 32, "method": "rtn", **changes})
    model, _ = Quantizer(config).quantize_model(model, ids)
    path = model.save_pretrained(tmp_path / "ckpt")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata = f.metadata()
    return model, json.loads((path / "config.json").read_text())["quantization_config"], tensors, metadata


def unpack_like_vllm(words, bits, length, dim):
    """vLLM / AutoGPTQ reading of 2/4/8-bit words: value i of word w is ``(w >> bits·i) & mask``."""
    per_word = 32 // bits
    w = words.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word) * bits
    values = (w.unsqueeze(1) >> shifts.view(1, -1, *([1] * (w.dim() - 1)))) & ((1 << bits) - 1)
    return values.reshape(-1, *w.shape[1:])[:length].movedim(0, dim)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_checkpoint_satisfies_vllm_and_transformers_loaders(bits, tmp_path):
    model, quant, tensors, metadata = saved_checkpoint(tmp_path, bits=bits)

    # config keys: vLLM GPTQConfig.from_config / GPTQMarlinConfig.from_config (bits, group_size,
    # desc_act, sym required for Marlin; lm_head optional), checkpoint_format "gptq" = v1 zeros
    assert quant["quant_method"] == "gptq" and quant["checkpoint_format"] == "gptq"
    assert isinstance(quant["bits"], int) and quant["bits"] in (2, 3, 4, 8)
    assert isinstance(quant["group_size"], int) and isinstance(quant["desc_act"], bool)
    assert isinstance(quant["sym"], bool) and isinstance(quant["lm_head"], bool)
    # GPTQMarlinConfig.is_gptq_marlin_compatible: (bits, sym) in {(4, True), (8, True)}, group size list
    assert (quant["bits"], quant["sym"]) in ((4, True), (8, True)) and quant["group_size"] in MARLIN_GROUP_SIZES
    # transformers: GPTQConfig parses it (reading checkpoint_format into .format) and validates it
    hf = GPTQConfig.from_dict(quant)
    hf.post_init()
    assert (hf.bits, hf.group_size, hf.desc_act, hf.sym, hf.format) == (bits, 32, False, True, "gptq")
    assert metadata.get("format") == "pt"  # transformers refuses safetensors files without it

    pack_factor = 32 // bits
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        k, n = module.in_features, module.out_features
        groups = k // 32
        qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
        scales, g_idx = tensors[f"{name}.scales"], tensors[f"{name}.g_idx"]
        # vLLM GPTQLinearMethod.create_weights: shapes and dtypes it allocates and copies into
        assert qweight.dtype == torch.int32 and qweight.shape == (k // pack_factor, n)
        assert qzeros.dtype == torch.int32 and qzeros.shape == (groups, n // pack_factor)
        assert scales.dtype == torch.float16 and scales.shape == (groups, n)
        assert g_idx.dtype == torch.int32 and g_idx.shape == (k,)
        # its alignment rules: K divisible by group_size, N by the pack factor's numerator
        assert k % quant["group_size"] == 0 and n % pack_factor == 0
        # desc_act=False: g_idx is the trivial k // group_size (vLLM ignores it, exllama uses empty)
        assert torch.equal(g_idx.long(), torch.arange(k) // quant["group_size"])
        # v1 zero points: stored zero - 1; symmetric grids store 2**(bits-1) - 1 in every slot
        zeros = unpack_like_vllm(qzeros, bits, n, dim=1)
        assert bool((zeros == (1 << (bits - 1)) - 1).all())
        if bits == 4:
            assert bool((qzeros == 0x77777777).all())
        # dequantization as the GPTQ kernels do it: scale · (q - (stored zero + 1))
        codes = unpack_like_vllm(qweight, bits, k, dim=0)  # (K, N)
        weight = scales.float()[g_idx.long()] * (codes - (zeros[g_idx.long()] + 1)).float()
        torch.testing.assert_close(weight.T, module.dequantize_weight(), rtol=0, atol=0)
    # lm_head is not quantized (lm_head: false): it is absent (tied) or a plain float weight
    assert "lm_head.qweight" not in tensors


def test_asym_and_act_order_layouts(tmp_path):
    model, quant, tensors, _ = saved_checkpoint(tmp_path, bits=4, sym=False, desc_act=True, static_groups=False,
                                                method="gptq")
    assert quant["sym"] is False and quant["desc_act"] is True  # a reordering g_idx: loaders are told
    # asymmetric: gptq_v2 (raw zero points), the format GPTQModel and vLLM read without trusting the producer
    assert quant["checkpoint_format"] == "gptq_v2"
    assert GPTQConfig.from_dict(quant).format == "gptq_v2"
    name = "model.layers.0.mlp.down_proj"
    g_idx = tensors[f"{name}.g_idx"].long()
    # act-order g_idx: every group holds exactly group_size columns, in any order
    assert torch.equal(torch.bincount(g_idx), torch.full((128 // 32,), 32))
    zeros = unpack_like_vllm(tensors[f"{name}.qzeros"], 4, 64, dim=1)
    assert int(zeros.min()) >= 1 and int(zeros.max()) <= 15  # raw zeros in [1, 15]
    # v2 dequantization (vLLM use_v2_format, GPTQModel): scale · (q - stored zero), no + 1
    codes = unpack_like_vllm(tensors[f"{name}.qweight"], 4, 128, dim=0)
    weight = tensors[f"{name}.scales"].float()[g_idx] * (codes - zeros[g_idx]).float()
    torch.testing.assert_close(weight.T, model.get_submodule(name).dequantize_weight(), rtol=0, atol=0)


@pytest.mark.parametrize("streamed", [False, True])
def test_asym_checkpoint_loads_back_equal(streamed, tiny_model_dir, tmp_path):
    """gptq_v2 zeros are converted at save and back at load: saved == loaded, direct and streamed."""
    from neural_quantization import QuantizationConfig, Quantizer, load_quantized

    config = QuantizationConfig(bits=4, group_size=32, sym=False, num_samples=4, seq_len=16)
    ids = torch.randint(2, 12, (4, 16), generator=torch.Generator().manual_seed(0))
    work = tmp_path / "work" if streamed else None
    model, _ = Quantizer(config).quantize_model(str(tiny_model_dir), ids, stream_weights=streamed, work_dir=work)
    out = model.save_pretrained(tmp_path / "ckpt")
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["checkpoint_format"] == "gptq_v2"
    loaded = load_quantized(out, dtype=torch.float32)
    probe = torch.tensor([[2, 5, 6, 7, 8]])
    if streamed:  # layers of a streamed run are on disk only: compare with a second load's codes
        direct, _ = Quantizer(config).quantize_model(str(tiny_model_dir), ids)
        reference = direct.float()
    else:
        reference = model.float()
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, reference(probe).logits, rtol=0, atol=0)


def test_compressed_tensors_config_validates_with_the_package(tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig as CTConfig

    from neural_quantization.export.compressed_tensors import export_compressed_tensors

    model, _, _, _ = saved_checkpoint(tmp_path, bits=4, sym=False)
    path = export_compressed_tensors(model, tmp_path / "ct")
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    parsed = CTConfig.model_validate(quant)
    scheme = parsed.config_groups["group_0"]
    assert parsed.format == "pack-quantized" and scheme.weights.symmetric is False
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = {n.rsplit(".", 1)[1] for n in f.keys() if ".mlp.up_proj." in n}
    assert names == set(PackedQuantizationCompressor.compression_param_names(scheme))
    assert ct.__version__
