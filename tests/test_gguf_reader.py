"""Reading GGUF files with load_quantized: our exports load back with the GPTQ checkpoint's codes bit for
bit; other block types are dequantized (checked against transformers' own GGUF loader); the CLI takes
a .gguf wherever it takes a checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_tiny_bpe_tokenizer, tiny_model, tiny_tokens
from transformers import AutoModelForCausalLM

from neural_quantization import QuantizationConfig, QuantLinear, Quantizer, load_quantized
from neural_quantization.cli import main
from neural_quantization.export.checkpoint import CheckpointError
from neural_quantization.export.gguf import (
    permute_rope_rows,
    q4_0_blocks,
    q8_0_blocks,
    save_checkpoint_with_gguf,
    unpermute_rope_rows,
)
from neural_quantization.export.gguf_reader import find_gguf_file, q4_0_codes, q8_0_codes

gguf = pytest.importorskip("gguf")


def quantize_and_export(directory, bits, tied, method="gptq"):
    """A tiny Llama saved as a float model (``directory/fp``, the base model our record names), quantized
    (GPTQ, group 32, 16-bit floats so GGUF's F16/F32 hold them exactly) and written with
    ``--format gguf``'s writer to ``directory/out``: (quantized model, out dir, its .gguf, export report)."""
    tokenizer = make_tiny_bpe_tokenizer()
    tiny_model(vocab_size=len(tokenizer), intermediate_size=128, tie_word_embeddings=tied, bos_token_id=1,
               eos_token_id=0, pad_token_id=None).save_pretrained(directory / "fp")
    tokenizer.save_pretrained(directory / "fp")
    model = AutoModelForCausalLM.from_pretrained(directory / "fp", dtype=torch.float32)
    config = QuantizationConfig(bits=bits, group_size=32, method=method, clip="minmax", calibration_batch_size=4,
                                checkpoint_dtype="float16")
    model, _ = Quantizer(config).quantize_model(model, tiny_tokens(4, 16, vocab_size=len(tokenizer)))
    out, report = save_checkpoint_with_gguf(model, directory / "out", tokenizer=tokenizer)
    return model, out, out / f"out-Q{bits}_0.gguf", report


@pytest.fixture(scope="module")
def q4_export(tmp_path_factory):
    return quantize_and_export(tmp_path_factory.mktemp("q4"), 4, tied=False)


def quant_linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def rewrite_gguf(source, target, tensors):
    """Copy the GGUF ``source`` to ``target`` with ``tensors`` ({name: (bytes or floats, GGML type)}) replaced."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        writer.add_key_value(key, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        data, qtype = tensors.get(tensor.name, (tensor.data, tensor.tensor_type))
        writer.add_tensor(tensor.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --------------------------------------------------------------------------------------------------
# The pure parts: blocks <-> codes, RoPE rows
# --------------------------------------------------------------------------------------------------


def test_blocks_decode_to_the_codes_and_scales_they_were_packed_from():
    gen = torch.Generator().manual_seed(0)
    scales = (torch.randn(6, 3, generator=gen) * 0.01).half()  # (N, K/32), negative d too (llama.cpp writes them)
    codes4 = torch.randint(0, 16, (6, 96), generator=gen, dtype=torch.int32)
    blocks = q4_0_blocks(codes4, scales)
    codes, d = q4_0_codes(blocks)
    assert torch.equal(codes, codes4) and torch.equal(d, scales)
    weight = scales.float().repeat_interleave(32, 1) * (codes4 - 8)
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0), weight.numpy())

    codes8 = torch.randint(1, 256, (6, 96), generator=gen, dtype=torch.int32)  # v = q - 128 in [-127, 127]
    blocks, clamped = q8_0_blocks(codes8, scales)
    codes, d = q8_0_codes(blocks)
    assert clamped == 0 and torch.equal(codes, codes8) and torch.equal(d, scales)
    weight = scales.float().repeat_interleave(32, 1) * (codes8 - 128)
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0), weight.numpy())


def test_unpermute_rope_rows_is_the_inverse_and_transformers_reverse_permute():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = torch.arange(64 * 3).reshape(64, 3)
    stored = permute_rope_rows(rows, 4)
    assert not torch.equal(stored, rows) and torch.equal(unpermute_rope_rows(stored, 4), rows)
    theirs = LlamaTensorProcessor()._reverse_permute_weights(stored.numpy(), 4, 4)
    np.testing.assert_array_equal(unpermute_rope_rows(stored, 4).numpy(), theirs)


# --------------------------------------------------------------------------------------------------
# Our exports load back exactly
# --------------------------------------------------------------------------------------------------


def test_q4_0_export_loads_back_with_the_checkpoints_codes_and_logits_bit_for_bit(q4_export, tmp_path):
    model, out, gguf_file, _ = q4_export
    checkpoint = load_quantized(out, dtype=torch.float32)  # the directory: GPTQ wins over the .gguf in it
    assert "converted_from" not in checkpoint.config.quantization_config
    loaded = load_quantized(gguf_file, dtype=torch.float32)
    ours, theirs = quant_linears(checkpoint), quant_linears(loaded)
    assert len(theirs) == 14 and set(theirs) == set(ours)
    for name, layer in ours.items():
        other = theirs[name]
        assert (other.bits, other.group_size) == (4, 32)
        for buffer in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(other, buffer), getattr(layer, buffer)), (name, buffer)
        assert torch.equal(other.dequantize_weight(), layer.dequantize_weight())
    ids = tiny_tokens(2, 12, vocab_size=300)
    with torch.no_grad():
        expected = checkpoint(ids).logits
        logits = loaded(ids).logits
    assert logits.dtype == expected.dtype == torch.float32 and torch.equal(logits, expected)

    quant = loaded.config.quantization_config
    assert (quant["bits"], quant["group_size"], quant["sym"], quant["quant_method"]) == (4, 32, True, "gptq")
    assert quant["converted_from"]["linears_kept_as_codes"] == 14 and not quant["converted_from"]["linears_dequantized"]
    assert quant["neural_quantization"]["base_model"] == model.config.quantization_config["neural_quantization"][
        "base_model"]  # our run record travels in the .gguf
    resaved = loaded.save_pretrained(tmp_path / "resaved")  # a GPTQ checkpoint of the same codes
    with torch.no_grad():
        assert torch.equal(load_quantized(resaved, dtype=torch.float32)(ids).logits, expected)


def test_q8_0_export_loads_back_with_only_the_clamped_codes_moved(tmp_path):
    model, out, gguf_file, report = quantize_and_export(tmp_path, 8, tied=True)
    checkpoint, loaded = load_quantized(out, dtype=torch.float32), load_quantized(gguf_file, dtype=torch.float32)
    moved = 0
    for name, layer in quant_linears(checkpoint).items():
        other = quant_linears(loaded)[name]
        ours, theirs = layer.quantized_weight(), other.quantized_weight()
        assert other.bits == 8 and torch.equal(theirs.scales, ours.scales) and torch.equal(theirs.zeros, ours.zeros)
        assert torch.equal(theirs.codes, ours.codes.clamp(min=1))  # the export writes v = -128 as -127
        moved += int((theirs.codes != ours.codes).sum())
    assert moved == report.clamped_codes > 0
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # no output.weight: tied, as transformers does
    ids = tiny_tokens(2, 12, vocab_size=300)
    with torch.no_grad():
        expected, logits = checkpoint(ids).logits, loaded(ids).logits
    assert (logits - expected).abs().max() < 0.02 * expected.abs().max()


def test_directories_resolve_like_the_cli_says(q4_export, tmp_path):
    _, out, gguf_file, _ = q4_export
    assert find_gguf_file(out) is None  # GPTQ config.json wins
    (tmp_path / "one").mkdir()
    shutil.copy(gguf_file, tmp_path / "one")
    assert find_gguf_file(tmp_path / "one") == tmp_path / "one" / gguf_file.name
    assert load_quantized(tmp_path / "one").config.quantization_config["bits"] == 4
    shutil.copy(gguf_file, tmp_path / "one" / "second.gguf")
    with pytest.raises(CheckpointError, match="pass the one you mean"):
        load_quantized(tmp_path / "one")


# --------------------------------------------------------------------------------------------------
# llama.cpp-style files: other block types dequantized, mixed widths, errors
# --------------------------------------------------------------------------------------------------


def test_mixed_types_match_transformers_gguf_loader_and_only_q4_0_q8_0_stay_codes(q4_export, tmp_path):
    """blk.0.ffn_up as Q4_1 (asymmetric: dequantized, with a warning), blk.1.attn_k as Q8_0 (8-bit
    QuantLinear, RoPE rows undone with the KV heads); every weight equals what transformers loads."""
    _, _, gguf_file, _ = q4_export
    reader = gguf.GGUFReader(str(gguf_file))
    floats = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    (tmp_path / "mixed").mkdir()
    mixed = tmp_path / "mixed" / "mixed.gguf"
    rewrite_gguf(gguf_file, mixed, {
        "blk.0.ffn_up.weight": (gguf.quants.quantize(floats["blk.0.ffn_up.weight"], Q.Q4_1), Q.Q4_1),
        "blk.1.attn_k.weight": (gguf.quants.quantize(floats["blk.1.attn_k.weight"], Q.Q8_0), Q.Q8_0),
    })
    with pytest.warns(UserWarning, match="1 Q4_1"):
        loaded = load_quantized(mixed, dtype=torch.float32)
    layers = quant_linears(loaded)
    assert "model.layers.0.mlp.up_proj" not in layers and len(layers) == 13
    assert layers["model.layers.1.self_attn.k_proj"].bits == 8 and layers["model.layers.0.self_attn.k_proj"].bits == 4
    quant = loaded.config.quantization_config
    assert quant["dynamic"] == {r"+:^model\.layers\.1\.self_attn\.k_proj$": {"bits": 8}}
    assert quant["converted_from"]["linears_dequantized"] == {"Q4_1": 1}

    reference = AutoModelForCausalLM.from_pretrained(mixed.parent, gguf_file=mixed.name, dtype=torch.float32)
    expected = reference.state_dict()
    for name, tensor in loaded.state_dict().items():
        if name.endswith(("qzeros", "scales", "g_idx")):
            continue
        if name.endswith(".qweight"):
            module = name.removesuffix(".qweight")
            name, tensor = f"{module}.weight", layers[module].dequantize_weight()
        assert torch.equal(tensor, expected[name]), name
    ids = tiny_tokens(2, 12, vocab_size=300)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_unsupported_architecture_and_tensor_type_fail_with_the_fix(q4_export, tmp_path, capsys):
    writer = gguf.GGUFWriter(str(tmp_path / "foo.gguf"), "foo")
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture foo.*safetensors checkpoint"):
        load_quantized(tmp_path / "foo.gguf")
    assert main(["deploy-report", str(tmp_path / "foo.gguf")]) == 2
    assert "architecture foo" in capsys.readouterr().err

    _, _, gguf_file, _ = q4_export
    q8_1 = gguf.GGMLQuantizationType.Q8_1  # llama.cpp's activation type: no dequantization in the gguf package
    rewrite_gguf(gguf_file, tmp_path / "q8_1.gguf", {"blk.0.ffn_up.weight": (np.zeros((128, 2 * 40), np.uint8), q8_1)})
    with pytest.raises(CheckpointError, match="blk.0.ffn_up.weight is stored as Q8_1.*llama-quantize"):
        load_quantized(tmp_path / "q8_1.gguf")


# --------------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------------


def test_cli_eval_deploy_report_and_generate_take_a_gguf(q4_export, text_dir, tmp_path, capsys):
    """Each command on the bare .gguf gives the numbers it gives on the GPTQ checkpoint it came from."""
    _, out, gguf_file, _ = q4_export
    reports = {}
    for label, model in (("gguf", gguf_file), ("gptq", out)):
        reports[label] = tmp_path / f"{label}.json"
        assert main(["eval", "--model", str(model), "--eval-data", str(text_dir), "--target-languages", "en",
                     "--eval-seq-len", "16", "--max-eval-windows", "4", "--report-json", str(reports[label]),
                     "--quiet", "--no-fail-on-gate"]) == 0  # base model from the record in the .gguf
    ours, theirs = (json.loads(reports[k].read_text())["languages"]["en"] for k in ("gptq", "gguf"))
    assert theirs["ppl_quantized"] == ours["ppl_quantized"] and theirs["ppl_reference"] == ours["ppl_reference"]

    assert main(["deploy-report", str(gguf_file), "--json", str(tmp_path / "deploy.json")]) == 0
    deploy = json.loads((tmp_path / "deploy.json").read_text())
    assert deploy["weights"] == {"gguf": {"bytes": gguf_file.stat().st_size, "files": [gguf_file.name]}}
    assert deploy["shape"]["layers"] == 2 and deploy["shape"]["vocab"] == 300

    texts = {}
    for label, model in (("gguf", gguf_file), ("gptq", out)):
        assert main(["generate", "--model", str(model), "--prompt", "the cat sat", "--max-new-tokens", "4",
                     "--device", "cpu", "--no-stop-at-eos", "--json", str(tmp_path / f"gen-{label}.json")]) == 0
        texts[label] = json.loads((tmp_path / f"gen-{label}.json").read_text())
    assert texts["gguf"]["kind"] == "quantized" and texts["gguf"]["texts"] == texts["gptq"]["texts"]
    capsys.readouterr()
