"""Activation-aware scaling (AWQ, issue 15): the search lowers the objective it claims to, the scaled
model computes the same float logits, and checkpoints made with it load back (also resumed/streamed)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_tokenizer, tiny_model, tiny_tokens

from neural_quantization import QuantizationConfig, Quantizer, load_quantized
from neural_quantization.config import ConfigError
from neural_quantization.core.awq import (
    ALPHAS,
    accumulate_abs_mean,
    activation_scales,
    rtn_fake_quantize,
    scaled_output_error,
    search_scales,
)
from neural_quantization.core.gptq import accumulate_hessian
from neural_quantization.core.quantized_weight import hessian_weighted_error
from neural_quantization.export.checkpoint import read_quantization_config
from neural_quantization.models.layer_storage import CheckpointWeights
from neural_quantization.models.sequential import LayerInputs, capture_layer_inputs, run_block, scale_block
from neural_quantization.nn.modules import find_decoder_layers

# --- the math (core/awq.py) --------------------------------------------------------------------------


def _loud_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels differ in magnitude by ~30x, with a few much louder ones, as LLM activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) * torch.logspace(0, 1.5, k)[torch.randperm(k, generator=g)]
    x[:, :3] *= 10
    return x


def _output_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, config: QuantizationConfig) -> float:
    """``|| X Wᵀ - (X / s) Q(W diag(s))ᵀ ||²``, straight from the inputs."""
    return float((x.double() @ w.T.double() - (x / s).double() @ rtn_fake_quantize(w * s, config).T.double())
                 .pow(2).sum())


@pytest.mark.parametrize("bits,sym", [(3, True), (4, True), (4, False)])
def test_search_lowers_the_round_to_nearest_output_error_it_claims_to(bits, sym):
    x = _loud_inputs(1024, 128)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(48, 128, generator=g), torch.randn(32, 128, generator=g) * 0.1]
    configs = [QuantizationConfig(bits=bits, group_size=32, sym=sym), QuantizationConfig(bits=8, group_size=64)]
    hessian, count = accumulate_hessian(None, 0, x[:600])
    hessian, _ = accumulate_hessian(hessian, count, x[600:])
    magnitude, count = accumulate_abs_mean(None, 0, x[:600])
    magnitude, _ = accumulate_abs_mean(magnitude, count, x[600:])
    torch.testing.assert_close(magnitude, x.abs().mean(0))

    found = search_scales(weights, configs, hessian, magnitude)
    # the objective it reports is the output error computed from the inputs themselves (× 2/n)
    direct = sum(_output_error(x, w, found.scales, c) for w, c in zip(weights, configs)) * 2 / len(x)
    assert found.error == pytest.approx(direct, rel=1e-3)
    # α = 0 is plain round to nearest, and every α tried is no better than the one chosen
    plain = sum(hessian_weighted_error(w, rtn_fake_quantize(w, c), hessian) for w, c in zip(weights, configs))
    assert found.error_unscaled == pytest.approx(plain, rel=1e-6)
    assert found.errors[0] == found.error_unscaled and len(found.errors) == len(ALPHAS)
    assert found.error == min(found.errors)
    assert found.alpha > 0 and found.error < 0.8 * found.error_unscaled
    assert found.scales[:3].min() > found.scales[3:].median()  # the loud channels got the large scales


def test_scales_are_normalised_and_alpha_zero_is_no_scaling():
    m = torch.tensor([0.0, 1e-9, 0.5, 2.0, 30.0])
    assert torch.equal(activation_scales(m, 0.0), torch.ones(5))
    s = activation_scales(m, 1.0)
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    assert float(s.max() / s.min()) == pytest.approx(1e4, rel=1e-4)  # dead channels floored, not ~0
    assert torch.all(s[1:] >= s[:-1])
    with pytest.raises(ValueError, match="start at 0"):
        search_scales([torch.ones(2, 4)], [QuantizationConfig()], torch.eye(4), torch.ones(4), alphas=(0.5,))


def test_scaling_never_loses_to_no_scaling_even_where_it_cannot_help():
    """Inputs of equal magnitude: nothing to gain; the search must fall back to α = 0 or tie it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 64, generator=g)
    w = torch.randn(16, 64, generator=g)
    hessian, _ = accumulate_hessian(None, 0, x)
    found = search_scales([w], [QuantizationConfig(bits=4, group_size=32)], hessian, x.abs().mean(0))
    assert found.error <= found.error_unscaled
    assert found.error == pytest.approx(scaled_output_error([w], [QuantizationConfig(bits=4, group_size=32)],
                                                            hessian, found.scales))


# --- the model (models/awq.py) -----------------------------------------------------------------------

CONFIG = QuantizationConfig(bits=3, group_size=32, calibration_batch_size=4, awq=True)


def _loud_model(arch: str = "llama", **overrides):
    """A tiny model whose norms make a few channels loud (random tiny models have flat activations)."""
    model = tiny_model(arch, **overrides)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "layers." in name and name.endswith("norm") and module.weight.numel() == 64:
                module.weight[:4] += 5
    return model


def _scale_every_layer(model, ids: torch.Tensor, config: QuantizationConfig) -> dict[str, dict]:
    """What the pipeline does before solving each layer, without solving: fold AWQ's scales layer by layer."""
    name, layers = find_decoder_layers(model)
    hidden, kwargs = capture_layer_inputs(model, layers, list(ids.split(config.calibration_batch_size)),
                                          torch.device("cpu"))
    done = {}
    for index, block in enumerate(layers):
        inputs = LayerInputs(hidden=hidden, kwargs=kwargs[index])
        done.update(scale_block(block, f"{name}.{index}.", inputs, config))
        hidden = run_block(block, inputs)
    return done


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("llama", {"num_key_value_heads": 4}), ("qwen2", {}),
                                            ("gemma", {}), ("gemma2", {}), ("gemma3", {}), ("qwen3", {}),
                                            ("phi3", {})])
def test_scaled_model_computes_the_same_float_logits(arch, overrides):
    model, ids = _loud_model(arch, **overrides), tiny_tokens(8, 24)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids).logits
    done = _scale_every_layer(model, ids, CONFIG)
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()

    first = {name.removeprefix("model.layers.0."): entry for name, entry in done.items() if ".layers.0." in name}
    attention_in = "self_attn.qkv_proj" if arch == "phi3" else "self_attn.q_proj"
    assert first[attention_in]["source"] == "model.layers.0.input_layernorm"
    mlp_in = "mlp.gate_up_proj" if arch == "phi3" else "mlp.up_proj"
    mlp_norm = "pre_feedforward_layernorm" if arch in ("gemma2", "gemma3") else "post_attention_layernorm"
    assert first[mlp_in]["source"] == f"model.layers.0.{mlp_norm}"
    if arch != "phi3":  # phi3's down_proj reads half of the fused gate_up_proj's output: no source
        assert first["mlp.down_proj"]["source"] == "model.layers.0.mlp.up_proj"  # not gate_proj (behind SiLU)
    if overrides.get("num_key_value_heads") == 4:  # o_proj reads v_proj's values head for head
        assert first["self_attn.o_proj"]["source"] == "model.layers.0.self_attn.v_proj"
    else:  # grouped-query attention (or fused qkv): no channel-wise source, and the report says so
        assert first["self_attn.o_proj"]["alpha"] is None and "o_proj" in first["self_attn.o_proj"]["note"]
    scaled = [e for e in done.values() if e["alpha"]]
    assert scaled and all(e["rtn_error"] < e["rtn_error_unscaled"] for e in scaled)
    assert all(e["rtn_error"] <= e["rtn_error_unscaled"] for e in done.values() if e["alpha"] is not None)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights_before[k])]
    assert any(k.endswith("input_layernorm.weight") for k in changed) and any(k.endswith("q_proj.weight")
                                                                               or k.endswith("qkv_proj.weight")
                                                                               for k in changed)


@pytest.mark.parametrize("rotate", [False, True])
def test_awq_checkpoint_loads_back_with_equal_logits_and_records_the_option(tmp_path, rotate):
    """With ``rotate`` the norms hold 1 after the rotation; AWQ's scales are folded into them after it."""
    model, ids = _loud_model(), tiny_tokens(16, 32)
    quantized, results = Quantizer(CONFIG.replace(rotate=rotate)).quantize_model(copy.deepcopy(model), ids)
    assert results.config["awq"] and results.config["gptaq"] and results.config["rotate"] == rotate
    q_proj = next(r for r in results.layers if r["name"] == "model.layers.0.self_attn.q_proj")
    assert q_proj["awq"]["source"] == "model.layers.0.input_layernorm" and q_proj["awq"]["alpha"] > 0
    norm = quantized.model.layers[0].input_layernorm.weight
    unscaled = torch.ones_like(norm) if rotate else model.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, unscaled)  # the scales were folded in (after the rotation set the norms to 1)
    quantized.save_pretrained(tmp_path / "ckpt")
    assert read_quantization_config(tmp_path / "ckpt")["neural_quantization"]["config"]["awq"] is True
    loaded = load_quantized(tmp_path / "ckpt", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(quantized(ids[:2]).logits, loaded(ids[:2]).logits)


def test_awq_run_resumed_or_streamed_writes_the_same_checkpoint(tmp_path):
    """The folded norms live in each finished layer's tensors, so a resumed run and a run streaming its
    layers from disk write exactly what an in-memory run writes."""
    source = tmp_path / "float-model"
    _loud_model(num_hidden_layers=3).save_pretrained(source)
    make_tiny_tokenizer().save_pretrained(source)
    ids, config = tiny_tokens(), CONFIG.replace(bits=4)

    def state(directory):
        weights = CheckpointWeights(directory)
        return weights.read(weights.names())

    in_memory, _ = Quantizer(config).quantize_model(str(source), ids, work_dir=tmp_path / "work-a")
    in_memory.save_pretrained(tmp_path / "in-memory")

    class Interrupt(Exception):
        pass

    def stop_after_one(done: int, total: int) -> None:
        if done == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        Quantizer(config).quantize_model(str(source), ids, work_dir=tmp_path / "work-b", on_layer_done=stop_after_one)
    resumed, _ = Quantizer(config).quantize_model(str(source), ids, work_dir=tmp_path / "work-b", resume=True)
    resumed.save_pretrained(tmp_path / "resumed")
    streamed, _ = Quantizer(config).quantize_model(str(source), ids, stream_weights=True, work_dir=tmp_path / "work-c")
    streamed.save_pretrained(tmp_path / "streamed")

    expected = state(tmp_path / "in-memory")
    for other in ("resumed", "streamed"):
        got = state(tmp_path / other)
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), other


def test_awq_is_off_by_default_and_refused_where_it_does_not_apply():
    from neural_quantization.cli import build_parser, config_from_args

    assert not QuantizationConfig().awq and not QuantizationConfig.from_preset("best").awq
    assert not QuantizationConfig.from_dict({"bits": 4}).awq  # records from before it existed
    with pytest.raises(ConfigError, match="method='gptq'"):
        QuantizationConfig(method="rtn", awq=True)
    with pytest.raises(ConfigError, match="cascade"):
        QuantizationConfig(cascade_stages=[8, 4], awq=True)
    parser = build_parser()
    args = parser.parse_args(["quantize", "--model", "m", "--output-dir", "o", "--preset", "best", "--awq"])
    assert config_from_args(args) == QuantizationConfig.from_preset("best", awq=True)
    args = parser.parse_args(["quantize", "--model", "m", "--output-dir", "o"])
    assert not config_from_args(args).awq
