"""GPTQ against RTN on the objective GPTQ minimises, and the solver's bookkeeping."""

import os

import pytest
import torch

from neural_quantization.config import ConfigError, QuantizationConfig
from neural_quantization.core import grid
from neural_quantization.core.gptq import HessianError, accumulate_hessian, gptq_quantize, inverse_hessian_cholesky
from neural_quantization.core.quantized_weight import hessian_weighted_error
from neural_quantization.core.rtn import rtn_quantize


def correlated_problem(n_out=48, n_in=160, tokens=2048, seed=0):
    """Weights and a Hessian from inputs with strongly correlated channels, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_in, n_in, generator=g) / n_in**0.5
    scales = torch.linspace(0.2, 3.0, n_in)
    x = (torch.randn(tokens, n_in, generator=g) @ mixing) * scales + 0.05 * torch.randn(tokens, n_in, generator=g)
    hessian, _ = accumulate_hessian(None, 0, x)
    weight = torch.randn(n_out, n_in, generator=g)
    return weight, hessian, x


@pytest.mark.parametrize(
    "bits,group_size,desc_act,sym",
    [(4, 32, False, True), (4, -1, False, True), (4, 64, True, True), (3, 32, True, False), (2, 64, False, False),
     (8, -1, True, True), (4, 50, False, True)],
)
def test_gptq_beats_rtn_on_hessian_weighted_error(bits, group_size, desc_act, sym):
    weight, hessian, _ = correlated_problem()
    config = QuantizationConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, clip="minmax")
    gptq = gptq_quantize(weight, hessian, config)
    rtn = rtn_quantize(weight, config, hessian)
    assert gptq.loss == pytest.approx(hessian_weighted_error(weight, gptq.dequantize(), hessian), rel=1e-5)
    assert gptq.loss < 0.8 * rtn.loss, (gptq.loss, rtn.loss)
    # with the default clip search (on the Hessian-weighted error) for both, GPTQ still wins
    config = config.replace(clip="hessian")
    assert gptq_quantize(weight, hessian, config).loss < rtn_quantize(weight, config, hessian).loss


def test_loss_is_the_layer_output_error():
    """tr((W-Q) H (W-Q)^T) with H = 2/n X^T X equals 2/n ||X W^T - X Q^T||^2."""
    weight, hessian, x = correlated_problem(tokens=512)
    q = gptq_quantize(weight, hessian, QuantizationConfig(bits=4, group_size=32))
    direct = 2 / x.shape[0] * ((x @ weight.T - x @ q.dequantize().T) ** 2).sum()
    assert q.loss == pytest.approx(float(direct), rel=1e-3)


def test_per_channel_8bit_error_is_tiny():
    weight, hessian, _ = correlated_problem()
    q = gptq_quantize(weight, hessian, QuantizationConfig(bits=8, group_size=-1))
    relative = q.loss / hessian_weighted_error(weight, torch.zeros_like(weight), hessian)
    assert relative < 1e-4


def test_codes_scales_and_groups_are_consistent():
    weight, hessian, _ = correlated_problem(n_in=150)
    config = QuantizationConfig(bits=4, group_size=64, desc_act=True, static_groups=False, sym=False)
    q = gptq_quantize(weight, hessian, config)
    assert q.scales.shape == (3, weight.shape[0])  # ceil(150 / 64): the last group is shorter
    assert q.codes.min() >= 0 and q.codes.max() <= 15
    assert q.zeros.min() >= 1  # storable as zero - 1 without wrapping
    # act-order: every group holds <= group_size columns, and they were chosen by the solver's order
    counts = torch.bincount(q.g_idx.long(), minlength=3)
    assert counts.tolist() == [64, 64, 22]
    assert not torch.equal(q.g_idx, torch.arange(150, dtype=torch.int32) // 64)
    # scales are exactly representable in fp16 (the checkpoint stores fp16)
    assert torch.equal(q.scales, q.scales.half().float())


def test_static_groups_keep_contiguous_g_idx_with_act_order():
    weight, hessian, _ = correlated_problem()
    config = QuantizationConfig(bits=4, group_size=32, desc_act=True, static_groups=True)
    q = gptq_quantize(weight, hessian, config)
    assert torch.equal(q.g_idx, torch.arange(weight.shape[1], dtype=torch.int32) // 32)
    assert q.loss < rtn_quantize(weight, config, hessian).loss


def test_dead_inputs_and_damping_escalation():
    weight, hessian, _ = correlated_problem()
    hessian[5, :] = 0
    hessian[:, 5] = 0
    q = gptq_quantize(weight, hessian, QuantizationConfig(bits=4, group_size=32))
    assert torch.isfinite(torch.tensor(q.loss))
    # An indefinite "Hessian" (eigenvalues -0.5 and 2.5) needs damping above 0.5 to factorise.
    bad = torch.tensor([[1.0, 1.5], [1.5, 1.0]])
    upper, damp = inverse_hessian_cholesky(bad, 0.01)
    assert 0.5 < damp <= 1.0
    damped = bad + damp * torch.eye(2)
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped))
    with pytest.raises(HessianError, match="calibration"):
        inverse_hessian_cholesky(torch.tensor([[1.0, 3.0], [3.0, 1.0]]), 0.01)


def test_solver_does_not_modify_inputs():
    weight, hessian, _ = correlated_problem()
    w0, h0 = weight.clone(), hessian.clone()
    gptq_quantize(weight, hessian, QuantizationConfig(bits=3, group_size=32, desc_act=True))
    assert torch.equal(weight, w0) and torch.equal(hessian, h0)


def test_hessian_is_a_running_mean():
    x = torch.randn(100, 12)
    h_all, n_all = accumulate_hessian(None, 0, x)
    h, n = None, 0
    for chunk in x.split(7):
        h, n = accumulate_hessian(h, n, chunk)
    assert n == n_all == 100
    torch.testing.assert_close(h, h_all)
    torch.testing.assert_close(h_all, 2 * x.T @ x / 100)


def test_mse_clip_never_worse_than_minmax_on_rounding_error():
    w = torch.randn(32, 128) ** 3  # heavy tails: clipping helps
    s0, z0 = grid.minmax_params(w, 3, True)
    s1, z1 = grid.mse_params(w, 3, True)
    e0 = (grid.fake_quantize(w, s0, z0, 3) - w).abs().pow(2.4).sum(1)
    e1 = (grid.fake_quantize(w, s1, z1, 3) - w).abs().pow(2.4).sum(1)
    assert (e1 <= e0 + 1e-6).all() and e1.sum() < e0.sum()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_puts_the_largest_weight_exactly_on_its_end_code(bits):
    """The largest-magnitude weight of each group is reconstructed to fp16 precision (not shortened by
    half a step on a rounding tie), on the end code of its sign; the zero is 2**(bits-1)."""
    w = torch.randn(64, 64) ** 3
    scale, zero = grid.minmax_params(w, bits, sym=True)
    assert (zero == 2 ** (bits - 1)).all()
    codes = grid.quantize(w, scale, zero, bits)
    rows = torch.arange(64)
    extreme = w.abs().argmax(dim=1)
    value = w[rows, extreme]
    end = torch.where(value < 0, 0 if bits < 8 else 1, 2**bits - 1)  # 8 bits: codes 1..255 (Q8_0's ±127)
    assert torch.equal(codes[rows, extreme], end.to(torch.int32))
    error = (grid.fake_quantize(w, scale, zero, bits)[rows, extreme] - value).abs()
    assert (error <= 2**-10 * value.abs()).all()


def test_asymmetric_grid_keeps_zero_at_least_one():
    w = torch.rand(4, 16) + 0.1  # all positive: min/max would give zero = 0
    scale, zero = grid.minmax_params(w, 4, sym=False)
    assert (zero >= 1).all()
    err = (grid.fake_quantize(w, scale, zero, 4) - w).abs().max()
    assert err <= scale.max() / 2 + 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [dict(bits=5), dict(group_size=0), dict(group_size=-2), dict(method="awq"), dict(damp_percent=0),
     dict(num_samples=0), dict(target_languages=[]),
     dict(cascade_stages=[4, 8]), dict(kernel_backend="cuda")],
)
def test_invalid_configs_fail_with_a_fix(kwargs):
    with pytest.raises(ConfigError) as err:
        QuantizationConfig(**kwargs)
    assert any(word in str(err.value) for word in ("use", "set", "must", "name"))


def test_config_round_trips_and_rejects_unknown_keys():
    config = QuantizationConfig(bits=3, group_size=64, desc_act=True, target_languages="en,fr")
    assert config.target_languages == ["en", "fr"]
    assert QuantizationConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown"):
        QuantizationConfig.from_dict({**config.to_dict(), "bitz": 4})


@pytest.mark.parametrize(
    "kwargs,reason",
    [(dict(bits=3), "bits=3"), (dict(sym=False), "--sym"), (dict(group_size=100), "group_size=100"),
     (dict(bits=2, group_size=16), "bits=2")],
)
def test_marlin_profile_refuses_what_marlin_cannot_serve(kwargs, reason):
    with pytest.raises(ConfigError, match="marlin") as err:
        QuantizationConfig(kernel_backend="marlin", **kwargs)
    assert reason in str(err.value)


def test_marlin_profile_accepts_its_configurations():
    for kwargs in (dict(bits=4, group_size=128, desc_act=True), dict(bits=8, group_size=-1), dict(group_size=32)):
        assert QuantizationConfig(kernel_backend="marlin", **kwargs).kernel_backend == "marlin"


def test_handing_the_hessian_over_gives_the_same_factor_and_keeps_the_callers_matrix():
    """inverse_hessian_cholesky([H]) (damped in place, freed once factored) gives the factor and
    damping of inverse_hessian_cholesky(H), also when the first damping fails; gptq_quantize never
    modifies the Hessian it is given."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 96, generator=g)
    valid = x.T @ x / 40
    needs_more = valid - 0.015 * torch.diag(valid).mean() * torch.eye(96)  # 1 % damping is not enough
    for hessian in (valid + 0.1 * torch.eye(96), needs_more):
        kept = hessian.clone()
        upper, damp = inverse_hessian_cholesky(hessian, 0.01)
        handed = [hessian.clone()]
        upper_handed, damp_handed = inverse_hessian_cholesky(handed, 0.01)
        assert handed == [] and torch.equal(hessian, kept)
        assert damp_handed == damp and torch.equal(upper_handed, upper)
    weight = torch.randn(16, 96, generator=g)
    kept = needs_more.clone()
    result = gptq_quantize(weight, needs_more, QuantizationConfig(bits=4, group_size=32, desc_act=True))
    assert torch.equal(needs_more, kept) and result.damp_percent == 0.02


MEASURE_SOLVER = """
import sys, torch
from neural_quantization.config import QuantizationConfig
from neural_quantization.core.gptq import gptq_quantize
torch.set_num_threads(1)
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
K, N = 3072, 64  # K×K fp32 = 36 MiB: above glibc's largest mmap threshold (32 MiB), so freed matrices leave the RSS
x = torch.randn(K + 64, K)
hessian = x.T @ x
del x
weight = torch.randn(N, K)
config = QuantizationConfig(bits=4, group_size=128, desc_act=sys.argv[1] == "1")
gptq_quantize(torch.randn(8, 256), torch.eye(256), config)  # loads the kernels and libraries first
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
gptq_quantize(weight, hessian, config)
print((rss("VmHWM:") - before) / (4 * K * K))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc to reset VmHWM")
@pytest.mark.parametrize("act_order", [False, True])
def test_the_solver_keeps_two_kxk_matrices_alive_at_a_time(act_order):
    """The peak memory of one solve above its inputs, in units of one fp32 K×K matrix (V): the
    Hessian copy handed to the inverse is freed once factored (2 V; it was 3.75 V before), which is
    what preflight's solver_workspace counts."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MEASURE_SOLVER, "1" if act_order else "0"], capture_output=True,
                          text=True, check=True)
    peak_in_v = float(done.stdout.strip().splitlines()[-1])
    assert peak_in_v < 2.4, peak_in_v  # U is 3 % of V here; allocator slack aside
