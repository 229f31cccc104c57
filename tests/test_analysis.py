"""analysis: statistics on constructed weights and activations with known outliers, the
sensitivity sweep (exact restore, a planted sensitive layer ranked first), and ``neural-quantize analyze``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokens

from neural_quantization.analysis import AnalysisError, analyze
from neural_quantization.analysis.sensitivity import layer_sensitivity, spearman, verdict
from neural_quantization.analysis.statistics import ActivationStatistics, recurring_outlier_channels, weight_statistics
from neural_quantization.cli import main


def test_weight_statistics_see_planted_outliers():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(256, 512, generator=g)
    plain = weight_statistics(gaussian)
    assert abs(plain["kurtosis"]) < 0.1 and plain["max_over_std"] < 6
    assert plain["top1pct_column_energy"] < 0.02  # 5 of 512 columns hold about 1 % of the energy
    spiky = gaussian.clone()
    spiky[:, 7] *= 40  # one outlier input channel
    stats = weight_statistics(spiky)
    assert stats["top1pct_column_energy"] > 0.7 and stats["max_over_std"] > 20 and stats["kurtosis"] > 10


def test_activation_statistics_find_outlier_channels_and_massive_positions():
    g = torch.Generator().manual_seed(1)
    stats = ActivationStatistics()
    for _ in range(3):
        x = torch.randn(2, 16, 64, generator=g)
        x[:, :, 3] *= 100  # an outlier dimension
        x[:, 0, 10] = 1e5  # a massive activation at the first position
        stats.update(x)
    summary = stats.summary()
    assert summary["outlier_channels"] == [3, 10] and summary["massive_positions"] == [0]
    assert summary["largest_position"] == 0 and summary["tokens"] == 3 * 2 * 16
    # channel 3 in three of four layers is an outlier dimension; channel 5 in one is not
    rows = recurring_outlier_channels({"a": [3], "b": [3, 5], "c": [3], "d": []}, min_share=0.5)
    assert rows == [{"channel": 3, "layers": 3, "share": 0.75}]


def test_spearman_and_verdicts():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert verdict(kl=0.6, share_of_uniform=0.6, median_kl=0.01) == "cliff"
    assert verdict(kl=1.5, share_of_uniform=0.1, median_kl=1.0) == "cliff"
    assert verdict(kl=0.04, share_of_uniform=0.1, median_kl=0.01) == "sensitive"
    assert verdict(kl=0.01, share_of_uniform=0.1, median_kl=0.01) == "safe"


def test_sweep_restores_the_weights_and_ranks_a_planted_sensitive_layer_first():
    model = tiny_model(num_hidden_layers=4, intermediate_size=128)
    with torch.no_grad():  # a layer that writes 20x more into the residual stream, its errors too,
        model.model.layers[2].mlp.down_proj.weight *= 20  # with one huge weight per group row that
        model.model.layers[2].mlp.down_proj.weight[:, ::32] *= 30  # stretches min/max grids
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = layer_sensitivity(model, tiny_tokens(4, 24), bits=(4, 3), group_size=32)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result["ranking"][0] == 2
    for b in ("4", "3"):
        assert result["uniform"][b]["kl"] > 0
        assert all(row["widths"][b]["kl"] >= 0 for row in result["layers"])
        # fewer bits never help the same layer here
    assert all(row["widths"]["3"]["kl"] >= row["widths"]["4"]["kl"] for row in result["layers"])
    assert result["layers"][2]["widths"]["3"]["verdict"] in ("sensitive", "cliff")


def test_analyze_report_and_bad_widths():
    model = tiny_model(intermediate_size=128)
    report = analyze(model, tiny_tokens(4, 24), tiny_tokens(2, 24, seed=2), bits=(4,), group_size=32)
    assert len(report["linears"]) == 2 * 7 and report["layers"] == 2
    assert {"max_over_std", "kurtosis", "act_outlier_channels"} <= set(report["linears"][0])
    with pytest.raises(AnalysisError, match="--bits"):
        analyze(model, tiny_tokens(4, 24), tiny_tokens(2, 24), bits=(5,))


def test_cli_analyze(tiny_model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "analysis.json"
    assert main(["analyze", str(tiny_model_dir), "--calibration-data", str(text_dir), "--target-languages", "en",
                 "--bits", "4", "3", "--group-size", "32", "--num-samples", "4", "--eval-windows", "2",
                 "--seq-len", "24", "--device", "cpu", "--report-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sensitivity"]["bits"] == [4, 3] and len(report["sensitivity"]["layers"]) == 2
    assert out.with_suffix(".md").read_text().startswith("# Quantization analysis")
    assert "most sensitive layers" in capsys.readouterr().out
    assert main(["analyze", str(tiny_model_dir), "--calibration-data", str(text_dir), "--target-languages", "en",
                 "--bits", "5", "--device", "cpu", "--report-json", str(tmp_path / "x.json")]) == 2
    assert "--bits" in capsys.readouterr().err
