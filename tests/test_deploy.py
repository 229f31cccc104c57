"""Edge deployment report: numbers add up from real file sizes; config-only estimates."""

import json

import pytest
import torch
from accelerate import init_empty_weights
from conftest import tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from neural_quantization import QuantizationConfig, Quantizer
from neural_quantization.deploy import DEVICES, DeployError, ModelShape, estimate_weight_bytes, kv_cache_bytes
from neural_quantization.deploy.memory import OVERHEAD_FIXED_BYTES, memory_report
from neural_quantization.export.checkpoint import unique_state_items
from neural_quantization.formats.gptq import gptq_layer_bytes
from neural_quantization.models.preflight import estimate_run
from neural_quantization.nn.qlinear import QuantLinear

MISTRAL_7B = {  # the values of mistralai/Mistral-7B-v0.1's config.json that decide memory
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "max_position_embeddings": 32768, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model(intermediate_size=128, max_position_embeddings=256)
    model, _ = Quantizer(QuantizationConfig(group_size=32, method="rtn")).quantize_model(model, torch.zeros(1, 4))
    return model.save_pretrained(tmp_path_factory.mktemp("deploy") / "ckpt")


def test_report_adds_up_from_the_checkpoint_files(checkpoint):
    report = memory_report(checkpoint, context=256, batch=3)
    weight_bytes = (checkpoint / "model.safetensors").stat().st_size
    assert report.measured and report.weights == {"gptq": {"bytes": weight_bytes, "files": ["model.safetensors"]}}
    kv = 2 * 2 * 2 * 16 * 256 * 3 * 2  # K and V · layers · kv heads · head_dim · context · batch · fp16
    assert report.kv_cache_bytes == kv
    for fit in report.devices:
        assert fit.weights_bytes == weight_bytes  # no .gguf here: every device uses the GPTQ file's size
        assert fit.overhead_bytes == int(OVERHEAD_FIXED_BYTES + 0.10 * (weight_bytes + kv))
        assert fit.needed_bytes == weight_bytes + kv + fit.overhead_bytes
        assert fit.headroom_bytes == fit.usable_bytes - fit.needed_bytes and fit.fits
    assert report.fit("Jetson Nano 4 GB").format == "gguf" and report.fit("RTX 3060 12 GB").format == "gptq"
    json.dumps(report.to_dict())  # machine-readable


def test_a_gguf_file_in_the_checkpoint_is_measured_for_llama_cpp_devices(checkpoint, tmp_path):
    import shutil

    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")
    (ckpt / "ckpt-Q4_0.gguf").write_bytes(b"\0" * 12345)
    report = memory_report(ckpt, context=64)
    assert report.weights["gguf"]["bytes"] == 12345
    assert report.fit("Apple M1 8 GB").weights_bytes == 12345
    assert report.fit("RTX 4090 24 GB").weights_bytes == (ckpt / "model.safetensors").stat().st_size


def test_mistral_7b_config_only_estimate(tmp_path):
    shape = ModelShape.from_config(MISTRAL_7B)
    assert shape.head_dim == 128 and shape.kv_heads == 8
    parts = estimate_weight_bytes(shape, bits=4, group_size=128)
    # 7.0e9 decoder-linear weights: 4 bits each (3.49 GB) + fp16 scales and packed zeros per 128,
    # + fp16 embeddings and lm_head (2 · 32000 · 4096 · 2 = 0.52 GB)
    linear_params = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)
    assert parts["decoder_linears"] > linear_params // 2
    assert parts["embeddings"] == parts["lm_head"] == 32000 * 4096 * 2
    assert 3.9e9 <= parts["total"] <= 4.2e9
    assert kv_cache_bytes(shape, 4096) == 2 * 32 * 8 * 128 * 4096 * 2 == 512 * 2**20

    path = tmp_path / "config.json"
    path.write_text(json.dumps(MISTRAL_7B))
    report = memory_report(path, context=4096, bits=4, group_size=128)
    assert not report.measured and report.weights["gptq"]["bytes"] == parts["total"]
    q4_0 = report.weights["gguf"]["bytes"]
    assert q4_0 > parts["total"]  # Q4_0 spends 4.5 bits per weight, g128 GPTQ about 4.16
    assert not report.fit("Jetson Nano 4 GB").fits and report.fit("RTX 3060 12 GB").fits
    assert report.fit("Apple M1 16 GB").needed_bytes == q4_0 + report.kv_cache_bytes + report.fit(
        "Apple M1 16 GB").overhead_bytes
    assert [d.name for d in DEVICES] == [f.device for f in report.devices]


def test_3bit_layer_bytes_agree_between_preflight_deploy_and_the_checkpoint(tmp_path):
    """K = 40 and 104 fill no whole 3-bit chunk (32 codes = 3 words): the pre-flight disk estimate,
    the config-only deployment estimate and the quantized model's buffers all count the padding."""
    sizes = dict(hidden_size=40, intermediate_size=104)  # 4 heads of 10, 2 KV heads
    config = tiny_config(**sizes)
    shape = ModelShape.from_config(config.to_dict())  # projections (K, N): (40, 40), (40, 20), (104, 40), ...
    layout = shape.layers * sum(gptq_layer_bytes(3, 32, k, n) for k, n in shape.linear_shapes())
    assert estimate_weight_bytes(shape, bits=3, group_size=32)["decoder_linears"] == layout

    qconfig = QuantizationConfig(bits=3, group_size=32, method="rtn", device="cpu")
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    assert estimate_run(meta, qconfig, 4, 16, torch.device("cpu")).breakdown["disk.quantized_linears"] == layout

    model, _ = Quantizer(qconfig).quantize_model(tiny_model(**sizes), torch.zeros(1, 4))
    linears = {name for name, m in model.named_modules() if isinstance(m, QuantLinear) and name != "lm_head"}
    stored = sum(t.numel() * t.element_size() for name, t in unique_state_items(model)
                 if name.rpartition(".")[0] in linears and not name.endswith(".bias"))
    assert stored == layout


def test_bad_inputs_say_what_to_pass(tmp_path):
    with pytest.raises(DeployError, match="does not exist"):
        memory_report(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(DeployError, match="num_hidden_layers|num_attention_heads"):
        memory_report(tmp_path / "config.json")
    with pytest.raises(DeployError, match="positive"):
        memory_report(tmp_path / "config.json", context=0)


def test_deploy_report_cli_writes_json_and_fails_cleanly(tmp_path, capsys):
    from neural_quantization.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(MISTRAL_7B))
    out = tmp_path / "report.json"
    assert main(["deploy-report", str(config), "--context", "2048", "--batch", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 2048 * 2 * 2
    assert {d["device"]: d["fits"] for d in data["devices"]}["Jetson Nano 4 GB"] is False
    assert "Jetson" in capsys.readouterr().out  # the table (cells wrap at the test terminal width)
    assert main(["deploy-report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--format", "gguf"], "group-size 32"),
        (["--format", "gguf", "--group-size", "32", "--bits", "3"], "Q4_0"),
        (["--format", "gguf", "--group-size", "32", "--desc-act", "--no-static-groups"], "static-groups"),
        (["--format", "compressed-tensors", "--bits", "2"], "4 or 8 bits"),
    ],
)
def test_bad_format_combinations_exit_2_before_loading_the_model(flags, message, tmp_path, capsys):
    from neural_quantization.cli import main

    # the model does not exist: reaching the loader would give a different error
    code = main(["quantize", "--model-name", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "o"),
                 *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
