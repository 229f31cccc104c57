"""GGUF export: read back with the gguf package and with transformers' GGUF loader."""

import numpy as np
import pytest
import torch
from conftest import TINY_CORPUS, make_tiny_bpe_tokenizer as bpe_tokenizer, tiny_model, tiny_tokens
from transformers import AutoModelForCausalLM, AutoTokenizer

from neural_quantization import QuantizationConfig, QuantLinear, Quantizer
from neural_quantization.export.gguf import (
    GGUFExportError,
    check_export_config,
    export_gguf,
    permute_rope_rows,
    save_checkpoint_with_gguf,
)

gguf = pytest.importorskip("gguf")

def quantized_llama(bits, tied, method="gptq", vocab_size=300, **extra):
    model = tiny_model(vocab_size=vocab_size, intermediate_size=128, tie_word_embeddings=tied, bos_token_id=1,
                       eos_token_id=0, pad_token_id=None)
    ids = tiny_tokens(4, 16, vocab_size=vocab_size)
    qconfig = QuantizationConfig(bits=bits, group_size=32, method=method, calibration_batch_size=4, **extra)
    model, _ = Quantizer(qconfig).quantize_model(model, ids)
    return model, ids


def gguf_weights(path):
    """{name: (type name, dequantized fp32 array in (rows, cols))} through the gguf package's reader."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, np.asarray(values, dtype=np.float32).reshape(list(reversed(t.shape))))
    return reader, out


def ours_in_gguf_layout(model, name, weight):
    """Our weight with llama.cpp's RoPE row order for attn_q / attn_k."""
    config = model.config
    if name.endswith("q_proj"):
        return permute_rope_rows(weight, config.num_attention_heads)
    if name.endswith("k_proj"):
        return permute_rope_rows(weight, config.num_key_value_heads)
    return weight


def test_q4_0_holds_the_gptq_codes_exactly_and_transformers_loads_it(tmp_path):
    model, ids = quantized_llama(4, tied=False)
    tokenizer = bpe_tokenizer()
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, float_type="f32")
    assert report.gguf_type == "Q4_0" and report.quantized_tensors == 14 and report.clamped_codes == 0

    reader, weights = gguf_weights(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            kind, values = weights[names.get_name(name) + ".weight"]
            assert kind == "Q4_0"
            expected = ours_in_gguf_layout(model, name, module.dequantize_weight()).numpy()
            np.testing.assert_array_equal(values, expected)  # d = our fp16 scale, v = our code
    assert weights["output.weight"][0] == "F32" and weights["blk.0.attn_norm.weight"][0] == "F32"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        ours, theirs = model(ids[:2]).logits, loaded(ids[:2]).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "the dog sat on le tapis"
    assert gguf_tokenizer(text, add_special_tokens=False).input_ids == tokenizer(text).input_ids


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_q8_0_clamps_only_code_minus_128_by_one_step(tmp_path, method):
    """Our 8-bit grid is Q8_0's (±127 steps), so rounding never reaches code -128; GPTQ's error
    feedback can push a weight there, and only those codes are written one step in."""
    model, ids = quantized_llama(8, tied=True, method=method)
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe_tokenizer())  # default: f16 floats
    _, weights = gguf_weights(tmp_path / "m.gguf")
    assert "output.weight" not in weights and weights["token_embd.weight"][0] == "F16"
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    clamped = 0
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        qw = module.quantized_weight()
        kind, values = weights[names.get_name(name) + ".weight"]
        assert kind == "Q8_0"
        ours = ours_in_gguf_layout(model, name, module.dequantize_weight())
        at_min = ours_in_gguf_layout(model, name, (qw.codes == 0).float()).bool()
        step = ours_in_gguf_layout(model, name, qw.scales[qw.g_idx.long()].T)
        expected = torch.where(at_min, ours + step, ours)  # -128·d written as -127·d
        np.testing.assert_array_equal(values, expected.numpy())
        clamped += int(at_min.sum())
    assert report.clamped_codes == clamped and (clamped == 0 if method == "rtn" else clamped > 0)
    assert report.clamped_fraction < 0.02


def test_checkpoint_dir_holds_gptq_checkpoint_and_gguf(tmp_path):
    from neural_quantization import load_quantized

    model, ids = quantized_llama(4, tied=True, method="rtn")
    path, report = save_checkpoint_with_gguf(model, tmp_path / "out", tokenizer=bpe_tokenizer())
    assert sorted(p.name for p in path.glob("*.gguf")) == ["out-Q4_0.gguf"]
    assert report.file_bytes == (path / "out-Q4_0.gguf").stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(path, dtype=torch.float32)(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(bits=3), "Q4_0"),
        (dict(bits=2), "Q4_0"),
        (dict(group_size=128), "group-size 32"),
        (dict(group_size=32, sym=False), "symmetric"),
        (dict(group_size=32, desc_act=True, static_groups=False), "static-groups"),
    ],
)
def test_bad_combinations_fail_before_quantizing(changes, reason):
    with pytest.raises(GGUFExportError, match=reason):
        check_export_config(QuantizationConfig(**changes))
    assert check_export_config(QuantizationConfig(group_size=32, desc_act=True, static_groups=True)) == "Q4_0"


def test_other_architectures_are_refused_with_the_reason(tmp_path):
    model = tiny_model("qwen2", vocab_size=64, intermediate_size=64, num_hidden_layers=1)
    model, _ = Quantizer(QuantizationConfig(group_size=32, method="rtn")).quantize_model(model, torch.zeros(1, 4))
    with pytest.raises(GGUFExportError, match="Llama architecture"):
        export_gguf(model, tmp_path / "q.gguf", tokenizer=bpe_tokenizer())
    assert not list(tmp_path.iterdir())


def test_cli_quantize_format_gguf_with_edge_report(tmp_path, capsys):
    """End to end through the CLI: a local model directory -> checkpoint dir with a .gguf, then the edge report."""
    import json

    from neural_quantization.cli import main

    tokenizer = bpe_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), intermediate_size=128, bos_token_id=1, eos_token_id=0)
    model.save_pretrained(tmp_path / "fp")
    tokenizer.save_pretrained(tmp_path / "fp")
    (tmp_path / "calib.txt").write_text("\n".join(TINY_CORPUS * 4))
    out = tmp_path / "w4"
    code = main([
        "quantize", "--model-name", str(tmp_path / "fp"), "--output-dir", str(out), "--format", "gguf",
        "--group-size", "32", "--calibration-data", str(tmp_path / "calib.txt"), "--target-languages", "en",
        "--num-samples", "2", "--seq-len", "16", "--calibration-batch-size", "2", "--device", "cpu", "--quiet",
        "--optimize-for-edge", "--edge-context", "512",
    ])
    printed = capsys.readouterr().out
    assert code == 0, printed
    gguf_file = out / "w4-Q4_0.gguf"
    assert gguf_file.is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert "Jetson" in printed and "Q4_0" in printed  # edge table and export summary (cells may wrap)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file.name, dtype=torch.float32)
    assert loaded.config.num_hidden_layers == 2


def test_metadata_and_tokenizer_are_copied_from_the_source_gguf(tmp_path):
    """The alias path: a model loaded from a .gguf keeps that file's metadata (here a 2 -> 1 layer cut)."""
    model, ids = quantized_llama(4, tied=True, method="rtn")
    tokenizer = bpe_tokenizer()
    export_gguf(model, tmp_path / "src" / "source.gguf", tokenizer=tokenizer)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    report = export_gguf(model, tmp_path / "out" / "cut.gguf", source_gguf=tmp_path / "src" / "source.gguf")
    assert report.metadata_source.startswith("copied from")
    source, copy = gguf.GGUFReader(str(tmp_path / "src" / "source.gguf")), gguf.GGUFReader(str(report.path))
    assert copy.fields["llama.block_count"].contents() == 1
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.model", "llama.rope.freq_base",
                "llama.attention.head_count_kv", "tokenizer.ggml.bos_token_id"):
        assert copy.fields[key].contents() == source.fields[key].contents(), key
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="cut.gguf", dtype=torch.float32)
    with torch.no_grad():  # F16 embeddings (the default) against our fp32 ones: close, not equal
        ours, theirs = model(ids[:1]).logits, loaded(ids[:1]).logits
    assert (theirs - ours).abs().max() < 1e-2 * ours.abs().max()

    other, _ = quantized_llama(4, tied=True, method="rtn", vocab_size=256)
    with pytest.raises(GGUFExportError, match="vocab_size"):
        export_gguf(other, tmp_path / "bad.gguf", source_gguf=tmp_path / "src" / "source.gguf")
