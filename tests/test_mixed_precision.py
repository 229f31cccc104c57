"""Per-module widths (``dynamic``) end to end, and the mixed-precision plan meeting its budget."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_model, tiny_tokens

from neural_quantization import QuantizationConfig, QuantLinear, Quantizer, load_quantized
from neural_quantization.analysis.mixed_precision import PlanError, layer_bytes, plan_widths
from neural_quantization.cli import main
from neural_quantization.config import ConfigError, dynamic_override

DYNAMIC = {r"+:model\.layers\.1\.": {"bits": 8}, r"+:model\.layers\.0\.mlp\.": {"bits": 3, "group_size": 64}}


def test_dynamic_widths_are_quantized_saved_and_loaded_back_exactly(tmp_path):
    model = tiny_model(intermediate_size=128)
    config = QuantizationConfig(bits=4, group_size=32, dynamic=DYNAMIC, num_samples=4, seq_len=16)
    model, _ = Quantizer(config).quantize_model(model, tiny_tokens(4, 16))
    widths = {name: (m.bits, m.group_size) for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert widths["model.layers.1.self_attn.q_proj"] == (8, 32)
    assert widths["model.layers.0.mlp.down_proj"] == (3, 64)
    assert widths["model.layers.0.self_attn.o_proj"] == (4, 32)
    path = model.save_pretrained(tmp_path / "ckpt")
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    assert quant["dynamic"] == DYNAMIC and quant["bits"] == 4
    loaded = load_quantized(path, dtype=torch.float32)
    assert {n: (m.bits, m.group_size) for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == widths
    ids = tiny_tokens(2, 12, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.float()(ids).logits, rtol=0, atol=0)


def test_dynamic_matches_the_way_vllm_reads_it():
    """vLLM's get_dynamic_override: re.match of the pattern (without '+:') on the layer's prefix,
    which for fused layers is e.g. model.layers.1.self_attn.qkv_proj: our per-layer patterns match."""
    for name in ("model.layers.1.self_attn.qkv_proj", "model.layers.1.mlp.gate_up_proj", "model.layers.1.mlp.down_proj"):
        matches = [p for p in DYNAMIC if re.match(p.removeprefix("+:"), name)]
        assert matches == [r"+:model\.layers\.1\."]
        assert dynamic_override(DYNAMIC, name) == {"bits": 8}
    assert dynamic_override(DYNAMIC, "model.layers.10.mlp.down_proj") == {}  # 1 is not a prefix of 10 here


@pytest.mark.parametrize("dynamic, message", [
    ({"-:lm_head": {}}, "not supported yet"),
    ({"+:model\\.layers\\.(": {"bits": 8}}, "regular expression"),
    ({"+:x": {"bits": 5}}, "bits=5"),
    ({"+:x": {"damp": 0.1}}, "non-empty dict"),
])
def test_bad_dynamic_tables_are_refused(dynamic, message):
    with pytest.raises(ConfigError, match=message):
        QuantizationConfig(dynamic=dynamic)


def sweep(kls: dict[int, list[float]], group_size=32):
    layers = len(next(iter(kls.values())))
    return {"group_size": group_size, "bits": sorted(kls),
            "layers": [{"widths": {str(b): {"kl": kls[b][i]} for b in kls}} for i in range(layers)]}


def test_plan_meets_the_budget_and_spends_bits_where_the_damage_is():
    shapes = [[(128, 128)] * 4] * 4
    # layer 2 is the sensitive one: it should get the wide width
    sensitivity = sweep({3: [0.1, 0.1, 5.0, 0.1], 4: [0.05, 0.05, 1.0, 0.05], 8: [0.0, 0.0, 0.01, 0.0]})
    weights = 4 * 4 * 128 * 128
    four = 8 * 4 * layer_bytes(shapes[0], 4, 32) / weights  # bits per weight of all-W4, scales included
    plan = plan_widths(sensitivity, shapes, four, "model.layers")
    assert plan["average_bits"] <= four
    uniform = sum(row["widths"]["4"]["kl"] for row in sensitivity["layers"])
    assert plan["predicted_kl_sum"] <= uniform  # never worse than all-W4 at no more bits, by the sweep's numbers
    # a budget for three layers at 3 bits and one at 8: the 8 bits go to the sensitive layer
    mix = 8 * (3 * layer_bytes(shapes[0], 3, 32) + layer_bytes(shapes[0], 8, 32)) / weights + 0.01
    plan = plan_widths(sensitivity, shapes, mix, "model.layers")
    assert plan["widths"] == [3, 3, 8, 3] and plan["average_bits"] <= mix
    assert plan["dynamic"][r"+:model\.layers\.2\."] == {"bits": 8} and len(plan["dynamic"]) == 4
    with pytest.raises(PlanError, match="below the smallest mix"):
        plan_widths(sensitivity, shapes, 2.0, "model.layers")
    with pytest.raises(PlanError, match="between 2 and 8"):
        plan_widths(sensitivity, shapes, 9.0, "model.layers")
    with pytest.raises(PlanError, match="--bits 2 3"):
        plan_widths(sensitivity, shapes, 3.5, "model.layers", widths=[2, 3])


def test_analyze_plans_and_quantize_takes_the_plan(tiny_model_dir, text_dir, tmp_path, capsys):
    report, plan = tmp_path / "a.json", tmp_path / "plan.json"
    common = ["--calibration-data", str(text_dir), "--target-languages", "en", "--group-size", "32",
              "--num-samples", "4", "--seq-len", "24", "--device", "cpu"]
    assert main(["analyze", str(tiny_model_dir), *common, "--bits", "3", "4", "8", "--eval-windows", "2",
                 "--report-json", str(report), "--target-bits", "5", "--plan-json", str(plan)]) == 0
    data = json.loads(plan.read_text())
    assert data["average_bits"] <= 5 and set(data["widths"]) <= {3, 4, 8}
    out = tmp_path / "ckpt"
    assert main(["quantize", "--model-name", str(tiny_model_dir), "--output-dir", str(out), "--dynamic", str(plan),
                 *common, "--quiet"]) == 0
    loaded = load_quantized(out)
    widths = sorted({m.bits for m in loaded.model.layers[0].modules() if isinstance(m, QuantLinear)})
    assert widths == [data["widths"][0]]
    capsys.readouterr()
    assert main(["analyze", str(tiny_model_dir), *common, "--target-bits", "1.5"]) == 2
    assert "between 2 and 8" in capsys.readouterr().err
    assert main(["quantize", "--model-name", str(tiny_model_dir), "--output-dir", str(tmp_path / "x"),
                 "--dynamic", str(plan), "--format", "gguf", *common, "--quiet"]) == 2
    assert "--format gptq" in capsys.readouterr().err
