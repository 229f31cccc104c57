"""Methods that go past plain GPTQ: each lowers the objective it claims to, and its checkpoint loads back."""

import pytest
import torch

from neural_quantization import QuantizationConfig, load_quantized
from neural_quantization.config import ConfigError
from neural_quantization.core import grid
from neural_quantization.core.gptq import gptq_quantize
from neural_quantization.core.quantized_weight import hessian_weighted_error


def _anisotropic_hessian(k: int, seed: int = 0) -> torch.Tensor:
    """A Hessian with a few loud, correlated inputs, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=g) * torch.logspace(0, 1.5, k)[torch.randperm(k, generator=g)]
    x[:, :3] += 5 * torch.randn(4 * k, 1, generator=g)  # correlated outliers
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("bits,sym", [(3, True), (4, True), (4, False)])
def test_hessian_clip_lowers_the_groups_hessian_weighted_error(bits, sym):
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(1)) ** 3
    h = _anisotropic_hessian(32)
    s0, z0 = grid.minmax_params(w, bits, sym)
    s1, z1 = grid.hessian_params(w, bits, sym, h)

    def objective(s, z):
        e = grid.fake_quantize(w, s, z, bits) - w
        return ((e @ h) * e).sum(dim=1)

    assert (objective(s1, z1) <= objective(s0, z0) * (1 + 1e-6)).all()
    assert objective(s1, z1).sum() < 0.95 * objective(s0, z0).sum()


def test_gptq_with_hessian_clip_lowers_the_layer_objective():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)) ** 3
    h = _anisotropic_hessian(128)
    losses = {clip: gptq_quantize(w, h, QuantizationConfig(bits=3, group_size=32, clip=clip)).loss
              for clip in ("minmax", "hessian")}
    assert losses["hessian"] < losses["minmax"]
    assert losses["hessian"] == pytest.approx(
        hessian_weighted_error(w, gptq_quantize(w, h, QuantizationConfig(bits=3, group_size=32, clip="hessian"))
                               .dequantize(), h))


def test_clip_is_validated_and_old_records_still_load():
    with pytest.raises(ConfigError, match="--clip"):
        QuantizationConfig(clip="percentile")
    with pytest.raises(ConfigError, match="only GPTQ"):
        QuantizationConfig(method="rtn", clip="hessian")
    assert QuantizationConfig.from_dict({"mse_clip": True}).clip == "mse"
    assert QuantizationConfig.from_dict({"mse_clip": False}).clip == "minmax"


# --- rotation of the residual stream ---------------------------------------------------------------

from conftest import tiny_model, tiny_tokens as tokens  # noqa: E402

from neural_quantization import Quantizer  # noqa: E402
from neural_quantization.core.hadamard import hadamard_matrix, random_rotation  # noqa: E402
from neural_quantization.models.rotation import RotationError, rotate_residual_stream  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 576, 640, 896, 1536])
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) <= {-1, 1}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.int64))


def test_rotation_falls_back_to_a_random_orthogonal_matrix_where_no_hadamard_is_built():
    assert hadamard_matrix(6) is None
    r, kind = random_rotation(6)
    assert kind == "random orthogonal"
    torch.testing.assert_close(r @ r.T, torch.eye(6, dtype=torch.float64))
    r, kind = random_rotation(12, seed=3)
    assert kind == "hadamard"
    torch.testing.assert_close(r.abs(), torch.full((12, 12), 12 ** -0.5, dtype=torch.float64))
    torch.testing.assert_close(r @ r.T, torch.eye(12, dtype=torch.float64))


ROTATABLE = ["llama", "mistral", "gemma", "qwen2", "qwen3", "phi3"]


@pytest.mark.parametrize("arch", ROTATABLE)
def test_rotated_model_computes_the_same_logits(arch):
    model = tiny_model(arch)
    ids = tokens(2)
    with torch.no_grad():
        before = model(ids).logits
    weights_before = model.model.layers[0].mlp.down_proj.weight.clone()
    report = rotate_residual_stream(model)
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.weight, weights_before)  # it did rotate
    assert report.kind == "hadamard" and report.writers == 4 and report.norms == 5


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_post_norm_architectures_are_refused_before_anything_changes(arch):
    model = tiny_model(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RotationError, match="post-norm"):
        rotate_residual_stream(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_rotation_spreads_an_outlier_channel_of_the_weights():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:, 5] *= 30  # one loud input channel
    peak = lambda w: float(w.detach().abs().max() / w.detach().abs().mean())  # noqa: E731
    before = peak(model.model.layers[0].self_attn.q_proj.weight)
    rotate_residual_stream(model)
    assert peak(model.model.layers[0].self_attn.q_proj.weight) < before / 3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rotated_checkpoint_loads_back_with_equal_logits(arch, tmp_path):
    model = tiny_model(arch)
    model.config.tie_word_embeddings = True  # the tied case: the rotation must untie lm_head
    model.tie_weights()
    ids = tokens()
    config = QuantizationConfig(bits=4, group_size=32, calibration_batch_size=4, rotate=True, clip="hessian")
    quantized, results = Quantizer(config).quantize_model(model, ids)
    assert results.rotation["kind"] == "hadamard" and results.rotation["untied_lm_head"]
    assert quantized.lm_head.weight.data_ptr() != quantized.model.embed_tokens.weight.data_ptr()
    quantized.save_pretrained(tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(quantized(ids[:2]).logits, loaded(ids[:2]).logits)
    assert not loaded.config.tie_word_embeddings


# --- presets -----------------------------------------------------------------------------------------

def test_presets_set_their_fields_and_explicit_options_win():
    from neural_quantization.cli import build_parser, config_from_args
    from neural_quantization.config import PRESETS

    best = QuantizationConfig.from_preset("best")
    assert (best.method, best.rotate, best.sym, best.clip) == ("gptq", True, False, "hessian")
    fast = QuantizationConfig.from_preset("fast")
    assert (fast.method, fast.clip) == ("rtn", "minmax")
    assert QuantizationConfig.from_preset("standard") == QuantizationConfig()
    assert QuantizationConfig.from_preset("best", sym=True).sym
    with pytest.raises(ConfigError, match="--preset"):
        QuantizationConfig.from_preset("fastest")
    parser = build_parser()
    for preset in PRESETS:
        args = parser.parse_args(["quantize", "--model", "m", "--output-dir", "o", "--preset", preset])
        assert config_from_args(args) == QuantizationConfig.from_preset(preset)
    args = parser.parse_args(["quantize", "--model", "m", "--output-dir", "o", "--preset", "best", "--sym", "--no-rotate"])
    assert config_from_args(args) == QuantizationConfig.from_preset("best", sym=True, rotate=False)


def test_a_layer_no_calibration_reached_is_rounded_on_the_min_max_grid():
    """The Hessian clip search (the default) needs a Hessian; without one the fallback is plain RTN."""
    from torch import nn

    from neural_quantization.core.rtn import rtn_quantize
    from neural_quantization.models.sequential import quantize_linear

    linear = nn.Linear(64, 32)
    qlinear, report = quantize_linear("unreached", linear, None, QuantizationConfig(group_size=32))
    assert report.method == "rtn" and "min/max grid" in report.note
    expected = rtn_quantize(linear.weight, QuantizationConfig(method="rtn", group_size=32))
    assert torch.equal(qlinear.dequantize_weight(torch.float32), expected.dequantize())


# --- asymmetric calibration (GPTAQ) ------------------------------------------------------------------

from neural_quantization.core.gptq import accumulate_cross, accumulate_hessian, asymmetric_target  # noqa: E402


def _asymmetric_objective(q: torch.Tensor, w: torch.Tensor, x: torch.Tensor, x_quant: torch.Tensor) -> float:
    """``|| X̃ Qᵀ - X Wᵀ ||²``: the quantized layer on the quantized model's inputs against the float layer's outputs."""
    return float((x_quant @ q.T - x @ w.T).pow(2).sum())


def test_gptaq_target_is_the_least_squares_fit_of_the_float_outputs():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 32, generator=g)
    x = torch.randn(2000, 32, generator=g) * torch.logspace(0, 1, 32)
    x_quant = x + 0.1 * torch.randn(x.shape, generator=g)  # inputs after the earlier layers' rounding errors
    hessian, count = accumulate_hessian(None, 0, x_quant[:1200])
    hessian, _ = accumulate_hessian(hessian, count, x_quant[1200:])
    cross, count = accumulate_cross(None, 0, x[:1200], x_quant[:1200])
    cross, _ = accumulate_cross(cross, count, x[1200:], x_quant[1200:])
    target = asymmetric_target(w, hessian, cross, damp_percent=1e-6)
    fit = torch.linalg.lstsq(x_quant.double(), x.double() @ w.T.double()).solution.T
    torch.testing.assert_close(target.double(), fit, rtol=1e-3, atol=1e-3)
    assert _asymmetric_objective(target, w, x, x_quant) < _asymmetric_objective(w, w, x, x_quant)


def test_gptq_towards_the_gptaq_target_lowers_the_asymmetric_objective():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 128, generator=g) ** 3
    x = torch.randn(4096, 128, generator=g) * torch.logspace(0, 1.5, 128)
    # the earlier layers' rounding changed the inputs systematically (a function of x the fit can undo)
    x_quant = x @ (torch.eye(128) + 0.05 * torch.randn(128, 128, generator=g))
    hessian, _ = accumulate_hessian(None, 0, x_quant)
    cross, _ = accumulate_cross(None, 0, x, x_quant)
    config = QuantizationConfig(bits=4, group_size=32)
    plain = gptq_quantize(w, hessian, config).dequantize()
    gptaq = gptq_quantize(asymmetric_target(w, hessian, cross, config.damp_percent), hessian, config).dequantize()
    assert _asymmetric_objective(gptaq, w, x, x_quant) < 0.9 * _asymmetric_objective(plain, w, x, x_quant)


def test_gptaq_brings_the_quantized_model_closer_to_the_float_one_and_its_checkpoint_loads(tmp_path):
    import copy

    model, ids = tiny_model("llama"), tokens(16, 32)
    with torch.no_grad():
        reference = model(ids).logits.log_softmax(-1)
    kl = {}
    for gptaq in (False, True):
        config = QuantizationConfig(bits=3, group_size=32, calibration_batch_size=4, gptaq=gptaq)
        quantized, results = Quantizer(config).quantize_model(copy.deepcopy(model), ids)
        with torch.no_grad():
            logits = quantized(ids).logits.log_softmax(-1)
        kl[gptaq] = float(torch.nn.functional.kl_div(logits, reference, log_target=True, reduction="batchmean"))
    assert all("GPTAQ" in r["note"] for r in results.layers)
    assert kl[True] < 0.8 * kl[False]
    quantized.save_pretrained(tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(quantized(ids[:2]).logits, loaded(ids[:2]).logits)


def test_gptaq_is_the_default_where_it_applies_and_refused_where_it_cannot():
    assert QuantizationConfig().gptaq and not QuantizationConfig(method="rtn").gptaq
    assert not QuantizationConfig(cascade_stages=[8, 4]).gptaq
    assert not QuantizationConfig().replace(method="rtn").gptaq  # a defaulted gptaq follows the method
    assert not QuantizationConfig.from_dict({"bits": 4}).gptaq  # records from before it existed: it was off
    with pytest.raises(ConfigError, match="method='gptq'"):
        QuantizationConfig(method="rtn", gptaq=True)
    with pytest.raises(ConfigError, match="cascade"):
        QuantizationConfig(cascade_stages=[8, 4], gptaq=True)
