"""End to end on tiny random models of every supported architecture: quantize, save, load, compare."""

import copy
import json

import pytest
import torch
from conftest import TINY_ARCHITECTURES, tiny_model, tiny_tokens
from safetensors import safe_open

from neural_quantization import QuantizationConfig, QuantLinear, Quantizer, load_quantized
from neural_quantization.export.directories import OutputExistsError
from neural_quantization.formats.packing import packed_length
from neural_quantization.nn.modules import find_decoder_layers
from neural_quantization.models.sequential import capture_layer_inputs, linear_groups, run_block, LayerInputs


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_captured_inputs_reproduce_the_models_own_forward(arch):
    """Running the blocks on the captured inputs gives the model's hidden states (sliding windows too)."""
    model = tiny_model(arch)
    ids = tiny_tokens(4)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
    _, layers = find_decoder_layers(model)
    hidden, kwargs = capture_layer_inputs(model, layers, [ids[:2], ids[2:]], torch.device("cpu"))
    torch.testing.assert_close(torch.cat(hidden), expected[0])
    for index, block in enumerate(layers):
        hidden = run_block(block, LayerInputs(hidden, kwargs[index]))
        if index < len(layers) - 1:  # the last entry of hidden_states is after the final norm
            torch.testing.assert_close(torch.cat(hidden), expected[index + 1])


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3", "qwen2", "qwen3", "phi3"])
def test_quantize_save_load_gives_identical_logits(arch, tmp_path):
    model = tiny_model(arch)
    ids = tiny_tokens()
    config = QuantizationConfig(bits=4, group_size=32, calibration_batch_size=4, desc_act=arch == "qwen2")
    quantized, results = Quantizer(config).quantize_model(model, ids)
    with torch.no_grad():
        in_memory = quantized(ids[:2]).logits
    quantized.save_pretrained(tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt", dtype=torch.float32)  # the dtype the in-memory model runs in
    with torch.no_grad():
        reloaded = loaded(ids[:2]).logits
    assert torch.equal(in_memory, reloaded)
    n_linears = sum(isinstance(m, QuantLinear) for m in loaded.modules())
    assert n_linears == len(results.layers) > 0
    assert all(layer["method"] == "gptq" and layer["loss"] >= 0 for layer in results.layers)


def test_checkpoint_tensors_have_the_documented_layout(tmp_path):
    model = tiny_model("llama")
    config = QuantizationConfig(bits=4, group_size=32, calibration_batch_size=4)
    quantized, _ = Quantizer(config).quantize_model(model, tiny_tokens())
    quantized.save_pretrained(tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        prefix = "model.layers.0.mlp.down_proj"  # in 80 -> out 64: 80 = 2.5 groups of 32
        qweight, qzeros = f.get_tensor(f"{prefix}.qweight"), f.get_tensor(f"{prefix}.qzeros")
        scales, g_idx = f.get_tensor(f"{prefix}.scales"), f.get_tensor(f"{prefix}.g_idx")
        embed = f.get_tensor("model.embed_tokens.weight")
    assert qweight.dtype == torch.int32 and qweight.shape == (packed_length(80, 4), 64) == (10, 64)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (3, 8)
    assert scales.dtype == torch.float16 and scales.shape == (3, 64)
    assert g_idx.dtype == torch.int32 and torch.equal(g_idx, torch.arange(80, dtype=torch.int32) // 32)
    assert (qzeros == 0x77777777).all()  # symmetric: zero 8 stored as 7
    # a float32 model's unquantized tensors are stored in bfloat16 (never float32 unless asked), and the
    # returned model already holds those rounded values
    assert embed.dtype == torch.bfloat16
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == "bfloat16"
    assert quantized.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(quantized.model.embed_tokens.weight.bfloat16(), embed)
    assert "model.layers.0.mlp.down_proj.weight" not in names
    assert "lm_head.weight" in names  # Llama's default config does not tie it
    quant = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "gptq" and quant["checkpoint_format"] == "gptq"
    # act-order with static groups (the default) keeps g_idx trivial: loaders see an ordinary checkpoint
    assert (quant["bits"], quant["group_size"], quant["desc_act"], quant["sym"]) == (4, 32, False, True)
    assert quant["neural_quantization"]["config"]["desc_act"] and quant["static_groups"]
    assert quant["neural_quantization"]["config"]["group_size"] == 32


def test_tied_embeddings_are_stored_once(tmp_path):
    model = tiny_model("gemma3")
    assert model.config.tie_word_embeddings
    quantized, _ = Quantizer(QuantizationConfig(bits=4, group_size=32)).quantize_model(model, tiny_tokens())
    quantized.save_pretrained(tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    loaded = load_quantized(tmp_path / "ckpt")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_true_sequential_groups_follow_execution_order():
    model = tiny_model("llama")
    _, layers = find_decoder_layers(model)
    hidden, kwargs = capture_layer_inputs(model, layers, [tiny_tokens(2)], torch.device("cpu"))
    linears = {n: m for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    groups = linear_groups(layers[0], linears, hidden[0], kwargs[0][0])
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def _output_error(reference, quantized, ids):
    with torch.no_grad():
        ref = torch.log_softmax(reference(ids).logits, -1)
        out = torch.log_softmax(quantized(ids).logits, -1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())  # KL(reference || quantized)


def test_gptq_model_is_closer_to_the_reference_than_rtn():
    reference = tiny_model("llama", seed=3)
    ids = tiny_tokens(16, 32)
    errors = {}
    for method in ("rtn", "gptq"):
        config = QuantizationConfig(bits=3, group_size=32, method=method, calibration_batch_size=8)
        quantized, _ = Quantizer(config).quantize_model(copy.deepcopy(reference), ids)
        errors[method] = _output_error(reference, quantized, ids)
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_8bit_per_channel_is_nearly_lossless():
    reference = tiny_model("mistral")
    ids = tiny_tokens()
    quantized, _ = Quantizer(QuantizationConfig(bits=8, group_size=-1)).quantize_model(copy.deepcopy(reference), ids)
    assert _output_error(reference, quantized, ids) < 1e-4


def test_lm_head_quantization_unties_and_round_trips(tmp_path):
    model = tiny_model("llama")
    ids = tiny_tokens()
    config = QuantizationConfig(bits=4, group_size=32, quantize_lm_head=True)
    quantized, results = Quantizer(config).quantize_model(model, ids)
    assert isinstance(quantized.lm_head, QuantLinear) and results.layers[-1]["name"] == "lm_head"
    assert results.layers[-1]["method"] == "gptq"
    quantized.save_pretrained(tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(quantized(ids[:1]).logits, loaded(ids[:1]).logits)


def test_results_hold_measured_sizes():
    model = tiny_model("llama")
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once by parameters()
    quantized, results = Quantizer(QuantizationConfig(bits=4, group_size=32)).quantize_model(model, tiny_tokens())
    assert results.size_bytes["reference"] == 2 * n_params
    packed = sum(
        sum(t.numel() * t.element_size() for t in (m.qweight, m.qzeros, m.scales, m.g_idx))
        for m in quantized.modules() if isinstance(m, QuantLinear)
    )
    assert results.size_bytes["quantized_linears_packed"] == packed
    assert results.final_compression_ratio == pytest.approx(results.size_bytes["quantized_linears_fp16"] / packed)
    assert results["memory_reduction"] == pytest.approx(
        100 * (1 - results.size_bytes["quantized"] / results.size_bytes["reference"])
    )
    assert any("not a multiple of group_size" in w for w in results.warnings)  # 80 % 32 != 0


def test_existing_output_dir_is_refused_and_nothing_is_half_written(tmp_path, monkeypatch):
    quantized, _ = Quantizer(QuantizationConfig(bits=4, group_size=32)).quantize_model(tiny_model("llama"), tiny_tokens())
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        quantized.save_pretrained(target)

    import neural_quantization.export.checkpoint as checkpoint

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        quantized.save_pretrained(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directory left behind


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pipeline_on_cuda_matches_cpu_and_round_trips(tmp_path):
    """Layers move to the GPU one at a time and back; the result matches the CPU run closely."""
    reference = tiny_model("llama")
    ids = tiny_tokens()
    config = QuantizationConfig(bits=4, group_size=32, calibration_batch_size=4)
    on_cpu, _ = Quantizer(config.replace(device="cpu")).quantize_model(copy.deepcopy(reference), ids)
    on_gpu, results = Quantizer(config.replace(device="cuda")).quantize_model(copy.deepcopy(reference), ids)
    assert results.device.startswith("cuda")
    assert next(on_gpu.parameters()).device.type == "cpu"  # everything went back where it came from
    kl_cpu = _output_error(reference, on_cpu, ids)
    kl_gpu = _output_error(reference, on_gpu, ids)
    assert abs(kl_gpu - kl_cpu) < 0.1 * kl_cpu + 1e-6
    on_gpu.save_pretrained(tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt", device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids.cuda()).logits.cpu(), on_gpu.cuda()(ids.cuda()).logits.cpu())


def test_marlin_profile_checks_layer_shapes_before_quantizing():
    from neural_quantization.config import ConfigError

    model = tiny_model("llama")  # hidden 64: in_features 64 is not a multiple of 128
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="multiple of 128"):
        Quantizer(QuantizationConfig(kernel_backend="marlin", group_size=32)).quantize_model(model, tiny_tokens())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # untouched
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_several_devices_give_the_single_device_result():
    """Two replicas (here both on the CPU) split the batches and average their Hessians; the
    group's linears are solved in two threads. Only the summation order differs from one device.
    (Without GPTAQ: its least-squares target moves by ~1e-7 with the summation order, enough to
    flip a code that sits on a rounding boundary, after which the solves diverge; see the next test.)"""
    ids = tiny_tokens()
    config = QuantizationConfig(bits=4, group_size=32, calibration_batch_size=2, device="cpu", gptaq=False)
    one, one_results = Quantizer(config).quantize_model(tiny_model("llama"), ids, model_name="tiny")
    two, two_results = Quantizer(config).quantize_model(tiny_model("llama"), ids, model_name="tiny",
                                                        devices=["cpu", "cpu"])
    assert [r["name"] for r in two_results.layers] == [r["name"] for r in one_results.layers]
    for a, b in zip(one_results.layers, two_results.layers):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    same = [torch.equal(p, q) for p, q in zip(one.state_dict().values(), two.state_dict().values())]
    assert sum(same) / len(same) > 0.9
    assert torch.allclose(one(ids[:2]).logits, two(ids[:2]).logits, atol=1e-3)


def test_several_devices_collect_the_single_device_gptaq_statistics(monkeypatch):
    """With GPTAQ (the default) two replicas fold the same Hessian and cross term as one device."""
    import neural_quantization.models.sequential as sequential

    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    target = sequential.asymmetric_target
    ids = tiny_tokens()
    config = QuantizationConfig(bits=4, group_size=32, calibration_batch_size=2, device="cpu")
    for run, devices in enumerate((None, ["cpu", "cpu"])):
        monkeypatch.setattr(sequential, "asymmetric_target",
                            lambda w, h, c, d, _run=run: seen[_run].append((h, c)) or target(w, h, c, d))
        Quantizer(config).quantize_model(tiny_model("llama"), ids, model_name="tiny", devices=devices)
    assert len(seen[0]) == len(seen[1]) == 14
    for (h1, c1), (h2, c2) in zip(seen[0][:4], seen[1][:4]):  # up to the first solve whose codes may differ
        torch.testing.assert_close(h2, h1, rtol=1e-5, atol=1e-6 * float(h1.abs().max()))
        torch.testing.assert_close(c2, c1, rtol=1e-4, atol=1e-5 * float(c1.abs().max()) + 1e-12)
    assert seen[0][3][1].abs().max() > 0  # o_proj reads a quantized q/k/v's output: a non-zero cross term


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_give_the_single_gpu_result():
    ids = tiny_tokens()
    config = QuantizationConfig(bits=4, group_size=32, calibration_batch_size=2, device="cuda:0")
    one, one_results = Quantizer(config).quantize_model(tiny_model("llama"), ids, model_name="tiny")
    two, two_results = Quantizer(config).quantize_model(tiny_model("llama"), ids, model_name="tiny",
                                                        devices=["cuda:0", "cuda:1"])
    for a, b in zip(one_results.layers, two_results.layers):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    assert torch.allclose(one(ids[:2]).logits, two(ids[:2]).logits, atol=2e-3)  # both back on the CPU
