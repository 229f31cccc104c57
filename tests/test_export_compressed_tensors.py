"""compressed-tensors export: loaded back by transformers + the compressed-tensors package on CPU."""

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokens
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from neural_quantization import QuantizationConfig, QuantLinear, Quantizer
from neural_quantization.export.compressed_tensors import ExportError, check_export_config, export_compressed_tensors

compressed_tensors = pytest.importorskip(
    "compressed_tensors", reason="compressed-tensors is not installed (pip install 'neural-quantization[export]')"
)

def quantized_llama(bits, sym, method="gptq", group_size=32, **extra):
    """A tiny random Llama quantized in place (RTN where only the storage layout is under test: faster)."""
    model = tiny_model(intermediate_size=128)  # 2 groups of 32 along every K
    ids = tiny_tokens(4, 16)
    config = QuantizationConfig(bits=bits, group_size=group_size, sym=sym, method=method, calibration_batch_size=4,
                                **extra)
    model, _ = Quantizer(config).quantize_model(model, ids)
    return model, ids


@pytest.mark.parametrize("bits, method", [(4, "gptq"), (8, "rtn")])
def test_symmetric_export_loads_in_transformers_with_identical_weights(bits, method, tmp_path):
    model, ids = quantized_llama(bits, sym=True, method=method)
    with torch.no_grad():
        ours = model(ids[:2]).logits
    path = export_compressed_tensors(model, tmp_path / "ct")

    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["strategy"], weights["group_size"]) == (
        bits, True, "group", 32)
    assert quant["ignore"] == ["lm_head"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert packed.dtype == torch.int32 and packed.shape == (64, 128 * bits // 32)
    assert scale.dtype == torch.float16 and scale.shape == (64, 128 // 32)
    assert not any(n.endswith(("qweight", "qzeros", "weight_zero_point", "g_idx")) for n in names)

    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        theirs = loaded(ids[:2]).logits  # compressed-tensors decompresses on the first forward
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            torch.testing.assert_close(loaded.get_submodule(name).weight, module.dequantize_weight(), rtol=0, atol=0)


def test_asymmetric_export_round_trips_zero_points(tmp_path):
    """Asymmetric grids store packed zero points; transformers loads them with dequantize=True.

    (compressed-tensors 0.20's in-model compressed layout allocates unpacked zero points, so the
    default path of transformers cannot take a packed checkpoint; vLLM reads the packed layout.)
    """
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32
    from transformers import CompressedTensorsConfig

    model, ids = quantized_llama(4, sym=False, method="rtn")
    path = export_compressed_tensors(model, tmp_path / "ct")
    layer = model.get_submodule("model.layers.1.self_attn.o_proj")
    qw = layer.quantized_weight()
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        zp = f.get_tensor("model.layers.1.self_attn.o_proj.weight_zero_point")
        packed = f.get_tensor("model.layers.1.self_attn.o_proj.weight_packed")
    assert zp.shape == (64 * 4 // 32, 2)
    # compressed-tensors' own unpacking gives signed values = ours - 8
    torch.testing.assert_close(unpack_from_int32(zp, 4, (64, 2), packed_dim=0).int(), qw.zeros.T.int() - 8)
    torch.testing.assert_close(unpack_from_int32(packed, 4, (64, 64)).int(), qw.codes.int() - 8)

    loaded = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    # dequantize=True computes the weight in the scale dtype (fp16), then casts: fp16 rounding of ours
    torch.testing.assert_close(loaded.get_submodule("model.layers.1.self_attn.o_proj").weight,
                               layer.dequantize_weight(), rtol=1e-3, atol=1e-4)
    with torch.no_grad():
        ours, theirs = model(ids[:2]).logits, loaded(ids[:2]).logits
    assert (theirs - ours).abs().max() < 2e-3 * ours.abs().max()


@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (8, False)])
def test_our_loader_reads_our_export_back_exactly(bits, sym, tmp_path):
    """load_quantized reads compressed-tensors: the same codes, zeros and fp16 scales as the model exported."""
    from neural_quantization import load_quantized

    model, ids = quantized_llama(bits, sym=sym, method="rtn")
    path = export_compressed_tensors(model, tmp_path / "ct")
    loaded = load_quantized(path, dtype=torch.float32)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(loaded.get_submodule(name).dequantize_weight(), layer.dequantize_weight()), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[:2]).logits, model.float()(ids[:2]).logits, rtol=0, atol=0)
    # re-saved, it is an ordinary GPTQ checkpoint that loads again
    again = load_quantized(loaded.save_pretrained(tmp_path / "gptq"), dtype=torch.float32)
    quant = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "gptq" and quant["converted_from"]["quant_method"] == "compressed-tensors"
    with torch.no_grad():
        torch.testing.assert_close(again(ids[:2]).logits, loaded(ids[:2]).logits, rtol=0, atol=0)


def test_activation_quantized_checkpoints_are_refused_with_the_reason(tmp_path):
    from neural_quantization import load_quantized
    from neural_quantization.formats.integrity import CheckpointError

    model, _ = quantized_llama(4, sym=True, method="rtn")
    path = export_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weight-only"):
        load_quantized(path)


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(bits=3), "4 or 8 bits"),
        (dict(bits=2), "4 or 8 bits"),
        (dict(desc_act=True, static_groups=False), "static-groups"),
    ],
)
def test_unsupported_configs_fail_before_quantizing(changes, reason):
    with pytest.raises(ExportError, match=reason):
        check_export_config(QuantizationConfig(**changes))
    check_export_config(QuantizationConfig(desc_act=True, static_groups=True))  # contiguous groups are fine
