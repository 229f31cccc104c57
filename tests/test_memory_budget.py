"""Memory budgets (``--max-gpu-memory`` / ``--max-cpu-memory``): the pre-flight estimate picks a plan
within the budget, the plan gives the unconstrained run's checkpoint, and a budget no plan meets is
refused before any work with what would fit."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from neural_quantization.cli import main
from neural_quantization.config import ConfigError, QuantizationConfig, RunOptions, parse_size
from neural_quantization.models import loading
from neural_quantization.models.preflight import FIT_MARGIN, BudgetError, estimate_run, plan_for_budget


def test_sizes_are_read_in_decimal_and_binary_units():
    assert parse_size("12GiB") == 12 * 2**30
    assert parse_size("3.2 GB") == 3_200_000_000
    assert parse_size("850MB") == 850_000_000 and parse_size(4096) == 4096
    for bad in ("12 apples", "-3GB", "0GiB", ""):
        with pytest.raises(ValueError, match="--max-gpu-memory"):
            parse_size(bad, "--max-gpu-memory")
    with pytest.raises(ConfigError, match="12GiB"):
        RunOptions("m", "out", max_cpu_memory="a lot")


def _common(model_dir, text_dir):
    return ["--model-name", str(model_dir), "--calibration-data", str(text_dir), "--target-languages", "en", "fr",
            "--num-samples", "4", "--seq-len", "32", "--group-size", "32", "--device", "cpu", "--quiet"]


def _meta_model(model_dir):
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)


def test_a_budget_that_needs_streaming_gives_the_unconstrained_checkpoint(tiny_model_dir, text_dir, tmp_path):
    """A host budget between the streamed and the in-memory plan's estimates: the run streams its
    layers from disk (a plan chosen, said and recorded), and writes the same tensors."""
    config = QuantizationConfig(group_size=32, num_samples=4, seq_len=32, device="cpu")
    meta = _meta_model(tiny_model_dir)
    in_memory = estimate_run(meta, config, 4, 32, torch.device("cpu")).host_peak_bytes
    streamed = estimate_run(meta, config, 4, 32, torch.device("cpu"), stream_weights=True).host_peak_bytes
    assert streamed < in_memory
    budget = int((in_memory + streamed) / 2 / FIT_MARGIN)
    plan = plan_for_budget(meta, config, 4, 32, torch.device("cpu"), host_budget=budget)
    assert plan.stream_weights and plan.calibration_batch_size == config.calibration_batch_size
    assert plan.estimate.host_peak_bytes <= FIT_MARGIN * budget

    assert main(["quantize", *_common(tiny_model_dir, text_dir), "--output-dir", str(tmp_path / "free")]) == 0
    assert main(["quantize", *_common(tiny_model_dir, text_dir), "--output-dir", str(tmp_path / "budget"),
                 "--max-cpu-memory", str(budget), "--report-json", str(tmp_path / "report.json")]) == 0
    free = load_file(tmp_path / "free" / "model.safetensors")
    shards = sorted((tmp_path / "budget").glob("*.safetensors"))
    assert len(shards) > 1  # streamed runs write shards
    budgeted = {name: t for shard in shards for name, t in load_file(shard).items()}
    assert free.keys() == budgeted.keys() and any(name.endswith(".qweight") for name in free)
    for name, tensor in free.items():
        assert torch.equal(tensor, budgeted[name]), name
    memory = json.loads((tmp_path / "report.json").read_text())["memory"]
    assert memory["max_cpu_memory"] == budget and memory["plan"]["stream_weights"] is True
    assert memory["plan"]["changes"] == ["decoder weights stream from disk (--stream-weights)"]
    assert memory["host_peak_rss_bytes"] > 0


def test_smaller_batches_are_the_last_resort_and_evaluation_rules_out_streaming(tiny_model_dir):
    """Where streaming is not allowed (an evaluated run), a budget just above the smallest batch's
    estimate is met with smaller calibration batches."""
    config = QuantizationConfig(group_size=32, num_samples=8, seq_len=32, device="cpu", calibration_batch_size=8)
    meta = _meta_model(tiny_model_dir)
    one = estimate_run(meta, config.replace(calibration_batch_size=1), 8, 32, torch.device("cpu")).host_peak_bytes
    eight = estimate_run(meta, config, 8, 32, torch.device("cpu")).host_peak_bytes
    assert one < eight
    budget = int(one / FIT_MARGIN) + 1
    plan = plan_for_budget(meta, config, 8, 32, torch.device("cpu"), host_budget=budget, can_stream=False)
    assert not plan.stream_weights and plan.calibration_batch_size < 8
    assert plan.changes == [f"--calibration-batch-size {plan.calibration_batch_size} (asked: 8)"]
    with pytest.raises(BudgetError, match="raise --max-cpu-memory"):
        plan_for_budget(meta, config, 8, 32, torch.device("cpu"), host_budget=budget // 2, can_stream=False)


def test_a_budget_no_plan_meets_exits_2_before_loading_anything(tiny_model_dir, text_dir, tmp_path, monkeypatch,
                                                                capsys):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although the budget could not be met")

    monkeypatch.setattr(loading, "load_model", never)
    out = tmp_path / "out"
    code = main(["quantize", *_common(tiny_model_dir, text_dir), "--output-dir", str(out),
                 "--max-cpu-memory", "64MiB"])
    message = capsys.readouterr()
    assert code == 2
    text = " ".join((message.out + message.err).split())
    assert "no plan fits the memory budget" in text and "--stream-weights" in text
    assert "raise --max-cpu-memory" in text
    assert not out.exists() and not (tmp_path / "out.work").exists()
    assert main(["quantize", *_common(tiny_model_dir, text_dir), "--output-dir", str(out),
                 "--max-gpu-memory", "twelve"]) == 2
    assert "--max-gpu-memory 'twelve'" in " ".join(capsys.readouterr().err.split())
