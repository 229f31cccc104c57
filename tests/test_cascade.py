"""Cascade quantization: the nested grid's exact reads, stage bookkeeping, end to end on a tiny Llama."""

import copy
import json

import pytest
import torch
from conftest import TINY_CONFIG, tiny_model, tiny_tokens

from neural_quantization import QuantizationConfig, Quantizer, load_quantized
from neural_quantization.cli import build_parser, config_from_args
from neural_quantization.config import ConfigError
from neural_quantization.core.cascade import narrow_view, nested_gptq_quantize
from neural_quantization.core.gptq import accumulate_hessian, gptq_quantize
from neural_quantization.core.quantized_weight import hessian_weighted_error
from neural_quantization.core.rtn import rtn_quantize
from neural_quantization.export.checkpoint import CheckpointError
from neural_quantization.models.cascade import (
    dequantize_model_linears,
    narrow_quantlinear,
    packed_sizes,
    quantized_linears,
)
from neural_quantization.nn.qlinear import QuantLinear

LINEARS_PER_LAYER = 7  # q k v o gate up down


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """GPTQ's column loop is many tiny ops: one thread is several times faster on busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**kw):
    return QuantizationConfig(**{"bits": 4, "group_size": 32, "calibration_batch_size": 4, **kw})


def first_q_proj_hessian(model, ids, batch_size=4):
    """H = 2/n Σ x xᵀ of the inputs of layer 0's q_proj, accumulated per batch as the pipeline does."""
    state = [None, 0]

    def hook(module, args):
        state[0], state[1] = accumulate_hessian(state[0], state[1], args[0])

    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(hook)
    with torch.no_grad():
        for batch in ids.split(batch_size):
            model(input_ids=batch, use_cache=False)
    handle.remove()
    return state[0]


def stage_loss(stage, name):
    return next(layer["loss"] for layer in stage["layers"] if layer["name"] == name)


def linear_fp16_bytes(model):
    return sum(m.in_features * m.out_features * 2 for m in quantized_linears(model))


# --------------------------------------------------------------------------------------------------
# Configuration and CLI
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    dict(cascade_stages=[8, 4], bits=8),  # bits must be the last stage
    dict(cascade_stages=[8, 4], cascade_mode="tree"),
    dict(cascade_stages=[8, 4, 2], bits=2, cascade_mode="nested"),  # nested takes exactly two widths
    dict(cascade_stages=[8, 4], cascade_mode="nested", method="rtn"),
    dict(cascade_stages=[8, 4], cascade_mode="nested", static_groups=True, desc_act=True),
])
def test_cascade_config_rejects_inconsistent_settings(bad):
    with pytest.raises(ConfigError):
        QuantizationConfig(**bad)


def test_cli_cascade_flags_build_the_config():
    parser = build_parser()
    base = ["quantize", "--model-name", "m", "--output-dir", "o"]
    assert config_from_args(parser.parse_args(base)).cascade_stages is None
    cfg = config_from_args(parser.parse_args(base + ["--cascade"]))
    assert (cfg.cascade_stages, cfg.cascade_mode, cfg.bits) == ([8, 4], "sequential", 4)
    cfg = config_from_args(parser.parse_args(base + ["--cascade-mode", "nested"]))
    assert (cfg.cascade_stages, cfg.cascade_mode) == ([8, 4], "nested")
    cfg = config_from_args(parser.parse_args(base + ["--cascade-stages", "8", "2"]))
    assert (cfg.cascade_stages, cfg.bits) == ([8, 2], 2)
    with pytest.raises(ConfigError):
        config_from_args(parser.parse_args(base + ["--cascade-stages", "8", "4", "--bits", "8"]))


# --------------------------------------------------------------------------------------------------
# The nested solver (pure tensor math)
# --------------------------------------------------------------------------------------------------


def _problem(seed=0, n=48, k=96):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(400, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3  # correlated inputs
    return weight, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("kw", [dict(group_size=32), dict(group_size=-1, desc_act=True), dict(group_size=32, sym=False)])
def test_nested_codes_nest_and_read_exactly(kw):
    weight, hessian = _problem()
    cfg = QuantizationConfig(bits=4, **{"desc_act": False, "static_groups": False, "clip": "minmax", **kw})  # the nested grids
    narrow, wide = nested_gptq_quantize(weight, hessian, cfg, wide=8, narrow=4)
    # The narrow read of the wide tensors is the narrow solve, bit for bit.
    view = narrow_view(wide, 4)
    assert torch.equal(view.codes, narrow.codes) and torch.equal(view.zeros, narrow.zeros)
    assert torch.equal(view.scales, narrow.scales) and torch.equal(view.g_idx, narrow.g_idx)
    assert torch.equal(view.dequantize(), narrow.dequantize())
    # Wide grid = narrow cells split in 16, centred: codes within the cell, zero 16 z + 8.
    assert torch.equal(wide.codes >> 4, narrow.codes)
    assert torch.equal(wide.zeros, narrow.zeros * 16 + 8)
    assert torch.equal(wide.scales * 16, narrow.scales)
    assert torch.equal(wide.scales.half().float(), wide.scales)  # storable in fp16 without loss
    # Each wide weight lies within half a narrow step of its narrow weight.
    step = narrow.scales[narrow.g_idx.long()].T
    offset = wide.dequantize() - narrow.dequantize()
    assert bool((offset >= -step / 2 - 1e-7).all()) and bool((offset < step / 2).all())
    # Reported losses are tr((W-Q) H (W-Q)^T) against the original W.
    assert narrow.loss == pytest.approx(hessian_weighted_error(weight, narrow.dequantize(), hessian), rel=1e-6)
    assert wide.loss == pytest.approx(hessian_weighted_error(weight, wide.dequantize(), hessian), rel=1e-6)
    # Quality: the narrow solve is GPTQ (close to the plain solver, well below RTN); the residual helps.
    gptq = gptq_quantize(weight, hessian, cfg)
    assert narrow.loss == pytest.approx(gptq.loss, rel=0.05)
    assert narrow.loss < 0.8 * rtn_quantize(weight, cfg, hessian).loss
    assert wide.loss < 0.5 * narrow.loss


def test_refinement_never_raises_the_loss_even_with_a_rank_deficient_hessian():
    """With fewer tokens than inputs, GPTQ's residual pass alone can end above the narrow loss."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(16, 128, generator=g)  # 16 tokens, 128 inputs: H has rank 16
    hessian = 2 * x.T @ x / 16
    cfg = QuantizationConfig(bits=4, group_size=32, clip="minmax")
    narrow, plain = nested_gptq_quantize(weight, hessian, cfg, 8, 4, refine_sweeps=0)
    _, one = nested_gptq_quantize(weight, hessian, cfg, 8, 4, refine_sweeps=1)
    _, two = nested_gptq_quantize(weight, hessian, cfg, 8, 4, refine_sweeps=2)
    assert two.loss <= one.loss <= min(plain.loss, narrow.loss)
    assert torch.equal(two.codes >> 4, narrow.codes)


def test_residual_solve_beats_rounding_within_the_cell():
    """The residual GPTQ pass compensates errors: better than rounding each weight inside its cell."""
    weight, hessian = _problem(seed=3)
    narrow, wide = nested_gptq_quantize(weight, hessian, QuantizationConfig(bits=4, group_size=32, clip="minmax"), 8, 4)
    scale = wide.scales[wide.g_idx.long()].T
    zero = wide.zeros[wide.g_idx.long()].T.float()
    low = narrow.codes * 16
    rounded = torch.clamp(torch.round(weight / scale) + zero, low.float(), (low + 15).float())
    rounded_loss = hessian_weighted_error(weight, scale * (rounded - zero), hessian)
    assert wide.loss < rounded_loss


def test_narrow_view_rejects_a_plain_wide_grid():
    weight, hessian = _problem()
    plain = gptq_quantize(weight, hessian, QuantizationConfig(bits=8, group_size=32))  # sym zero 128 = 16·8 + 0
    with pytest.raises(ValueError, match="nested"):
        narrow_view(plain, 4)


# --------------------------------------------------------------------------------------------------
# End to end on a tiny Llama
# --------------------------------------------------------------------------------------------------


def test_sequential_cascade_stages_match_what_was_measured():
    model, ids = tiny_model(), tiny_tokens()
    h0 = first_q_proj_hessian(model, ids)
    w_fp = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    direct8, r8 = Quantizer(config(bits=8, cascade_stages=None)).quantize_model(copy.deepcopy(model), ids)
    cascade, results = Quantizer(config(cascade_stages=[8, 4])).quantize_model(copy.deepcopy(model), ids)

    stages = results.stages
    assert [s["bits"] for s in stages] == [8, 4] and [s["stage"] for s in stages] == [1, 2]
    n_linears = TINY_CONFIG["num_hidden_layers"] * LINEARS_PER_LAYER
    assert all(len(s["layers"]) == n_linears for s in stages)
    assert results.layers == stages[-1]["layers"]
    assert all(s["seconds"] > 0 for s in stages)
    # Stage 1 is the direct 8-bit run; stage 2 the final model: compression measured on each.
    assert stages[0]["compression_ratio"] == pytest.approx(r8.final_compression_ratio)
    assert stages[0]["packed_bytes"] == packed_sizes(quantized_linears(direct8))
    assert stages[1]["compression_ratio"] == pytest.approx(results.final_compression_ratio)
    assert stages[1]["packed_bytes"] == packed_sizes(quantized_linears(cascade))
    assert stages[1]["fp16_bytes"] == linear_fp16_bytes(cascade)
    assert all(q.bits == 4 for q in quantized_linears(cascade))
    # Per-layer losses, recomputed: stage 1 against the float weight, stage 2 against stage 1's.
    name = "model.layers.0.self_attn.q_proj"
    q8 = direct8.model.layers[0].self_attn.q_proj.dequantize_weight()
    q4 = cascade.model.layers[0].self_attn.q_proj.dequantize_weight()
    assert stage_loss(stages[0], name) == pytest.approx(hessian_weighted_error(w_fp, q8, h0), rel=1e-4)
    assert stage_loss(stages[1], name) == pytest.approx(hessian_weighted_error(q8, q4, h0), rel=1e-4)
    assert stage_loss(stages[1], name) > stage_loss(stages[0], name)  # 4 bits lose more than 8


def test_dequantize_model_linears_keeps_the_outputs():
    model, ids = tiny_model(), tiny_tokens()
    quantized, _ = Quantizer(config()).quantize_model(model, ids)
    with torch.no_grad():
        before = quantized(ids[:2]).logits
    assert dequantize_model_linears(quantized) == TINY_CONFIG["num_hidden_layers"] * LINEARS_PER_LAYER
    assert not quantized_linears(quantized)
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids[:2]).logits, before)


def test_nested_checkpoint_reads_exactly_at_both_widths(tmp_path):
    model, ids = tiny_model(), tiny_tokens()
    h0 = first_q_proj_hessian(model, ids)
    w_fp = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = config(cascade_stages=[8, 4], cascade_mode="nested")
    nested, results = Quantizer(cfg).quantize_model(copy.deepcopy(model), ids)
    path = nested.save_pretrained(tmp_path / "nested")

    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    assert (quant["bits"], quant["sym"], quant["group_size"]) == (8, False, 32)
    assert quant["neural_quantization"]["nested"]["narrow_bits"] == 4

    at8 = load_quantized(path, bits=8, dtype=torch.float32)  # the dtype the in-memory model runs in
    at4 = load_quantized(path, bits=4, dtype=torch.float32)
    assert load_quantized(path).state_dict().keys() == at8.state_dict().keys()
    names = [n for n, m in nested.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == TINY_CONFIG["num_hidden_layers"] * LINEARS_PER_LAYER
    for name in names:
        stored = nested.get_submodule(name)
        read8, read4 = at8.get_submodule(name), at4.get_submodule(name)
        assert (read8.bits, read4.bits) == (8, 4)
        assert torch.equal(read8.dequantize_weight(), stored.dequantize_weight())
        assert torch.equal(read4.dequantize_weight(), narrow_quantlinear(stored, 4).dequantize_weight())
        codes8, codes4 = read8.quantized_weight().codes, read4.quantized_weight().codes
        assert torch.equal(codes4, codes8 >> 4)
    with torch.no_grad():
        torch.testing.assert_close(at8(ids[:2]).logits, nested(ids[:2]).logits, rtol=0, atol=0)

    # The 4-bit read is the narrow GPTQ solve of layer 0's q_proj, recomputed from scratch.
    narrow, wide = nested_gptq_quantize(w_fp, h0, cfg, 8, 4)
    q_name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(at4.get_submodule(q_name).quantized_weight().codes, narrow.codes)
    assert torch.equal(at8.get_submodule(q_name).quantized_weight().codes, wide.codes)

    # Stages: narrow read first, stored wide read second; numbers match the loaded tensors.
    stages = results.stages
    assert [s["bits"] for s in stages] == [4, 8]
    assert stages[0]["packed_bytes"] == packed_sizes(quantized_linears(at4))
    assert stages[1]["packed_bytes"] == packed_sizes(quantized_linears(at8))
    assert stages[0]["compression_ratio"] == pytest.approx(linear_fp16_bytes(at4) / stages[0]["packed_bytes"])
    assert stages[1]["compression_ratio"] == pytest.approx(results.final_compression_ratio)
    q4 = at4.get_submodule(q_name).dequantize_weight()
    q8 = at8.get_submodule(q_name).dequantize_weight()
    assert stage_loss(stages[0], q_name) == pytest.approx(hessian_weighted_error(w_fp, q4, h0), rel=1e-4)
    assert stage_loss(stages[1], q_name) == pytest.approx(hessian_weighted_error(w_fp, q8, h0), rel=1e-4)
    assert stage_loss(stages[1], q_name) < stage_loss(stages[0], q_name)

    with pytest.raises(CheckpointError, match="bits"):
        load_quantized(path, bits=2)


def test_only_nested_checkpoints_have_a_narrow_read(tmp_path):
    model, ids = tiny_model(), tiny_tokens()
    quantized, _ = Quantizer(config(bits=8)).quantize_model(model, ids)
    path = quantized.save_pretrained(tmp_path / "w8")
    with pytest.raises(CheckpointError, match="nested"):
        load_quantized(path, bits=4)


# --------------------------------------------------------------------------------------------------
# CLI end to end
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_model_and_texts(tmp_path_factory):
    """A tiny Llama saved like a downloaded model, and calib/eval text in two 'languages'."""
    from conftest import TINY_CORPUS, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("cascade_cli")
    tokenizer = make_tiny_tokenizer(add_bos=True)
    tiny_model(vocab_size=len(tokenizer), bos_token_id=2, eos_token_id=3, initializer_range=0.3).save_pretrained(
        root / "model"
    )
    tokenizer.save_pretrained(root / "model")
    for lang, lines in {"en": TINY_CORPUS[:2], "fr": TINY_CORPUS[2:]}.items():
        for split in ("calib", "eval"):
            (root / "texts").mkdir(exist_ok=True)
            (root / "texts" / f"{lang}.{split}.txt").write_text("\n".join(lines * 20) + "\n")
    return root / "model", root / "texts"


def test_cli_nested_cascade_reports_both_reads(cli_model_and_texts, tmp_path):
    from neural_quantization.cli import main

    model_dir, texts = cli_model_and_texts
    out, report = tmp_path / "nested", tmp_path / "report.json"
    code = main([str(a) for a in (
        "--model-name", model_dir, "--output-dir", out, "--cascade-mode", "nested", "--group-size", "32",
        "--calibration-data", texts, "--target-languages", "en", "fr", "--num-samples", "8", "--seq-len", "32",
        "--eval-data", texts, "--eval-seq-len", "32", "--report-json", report, "--quiet", "--no-fail-on-gate",
    )])
    assert code == 0
    data = json.loads(report.read_text())
    stages = data["stages"]
    assert [s["bits"] for s in stages] == [4, 8]
    # The stored model (8-bit read) is the one the report's languages describe.
    assert stages[1]["degradation_pct"] == pytest.approx(data["avg_degradation_pct"])
    assert isinstance(stages[0]["degradation_pct"], float)
    assert data["compression_ratio"] == pytest.approx(stages[1]["compression_ratio"])
    assert load_quantized(out, bits=4).model.layers[0].mlp.down_proj.bits == 4
