"""The user's files: what --overwrite may replace, atomic replacement, stale staging, permissions,
Ctrl-C with --resume, finished work directories, and the dtype unquantized tensors are stored in."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors import safe_open

from neural_quantization import QuantizationConfig, Quantizer, load_quantized
from neural_quantization.cli import EXIT_INTERRUPTED, main
from neural_quantization.export.directories import (
    OutputExistsError,
    check_output_dir,
    remove_stale_staging,
    staged_directory,
)
from neural_quantization.models.layer_storage import WorkDir


def quantize_argv(model_dir, text_dir, out, *extra):
    return [str(a) for a in ["--model-name", model_dir, "--output-dir", out, "--calibration-data", text_dir,
                             "--target-languages", "en", "--num-samples", "4", "--seq-len", "32", "--group-size",
                             "32", "--quiet", *extra]]


@pytest.fixture
def checkpoint(tiny_model_dir, text_dir, tmp_path):
    out = tmp_path / "ckpt"
    assert main(quantize_argv(tiny_model_dir, text_dir, out)) == 0
    return out


def test_overwrite_replaces_our_checkpoint_and_nothing_else(tiny_model_dir, text_dir, tmp_path, checkpoint):
    first = (checkpoint / "model.safetensors").stat().st_ino
    assert main(quantize_argv(tiny_model_dir, text_dir, checkpoint, "--overwrite", "--bits", "8")) == 0
    assert json.loads((checkpoint / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert (checkpoint / "model.safetensors").stat().st_ino != first
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old copy left

    (checkpoint / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="mine.txt"):
        check_output_dir(checkpoint, overwrite=True)
    assert (checkpoint / "mine.txt").read_text() == "keep me"


def test_an_empty_directory_is_written_without_overwrite(tiny_model_dir, text_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(quantize_argv(tiny_model_dir, text_dir, tmp_path / "empty")) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_a_failed_replacement_keeps_the_old_checkpoint(checkpoint, tmp_path):
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_directory(checkpoint) as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("disk full")
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_stale_staging_of_dead_processes_is_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    dead, live, foreign = (tmp_path / ".out.partial-999999999-abc", tmp_path / f".out.partial-{os.getppid()}-x",
                           tmp_path / ".other.partial-1-x")
    for d in (dead, live, foreign):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    removed = remove_stale_staging(target)
    assert [(p.name, size) for p, size in removed] == [(dead.name, 1000)]
    assert live.exists() and foreign.exists() and not dead.exists()


def test_a_save_killed_between_its_two_renames_is_put_back(tmp_path):
    aside = tmp_path / ".out.old-999999999-abc"
    (aside / "previous").mkdir(parents=True)
    (aside / "previous" / "config.json").write_text("{}")
    remove_stale_staging(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == "{}" and not aside.exists()


def test_checkpoint_files_follow_the_umask(checkpoint):
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o777 & ~mask
    for file in checkpoint.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file.name


def test_ctrl_c_keeps_finished_layers_and_prints_the_resume_command(tiny_model_dir, text_dir, tmp_path, monkeypatch,
                                                                     capsys):
    out = tmp_path / "ckpt"
    original = WorkDir.write_layer

    def interrupted_after_layer_0(self, index, tensors, reports):
        original(self, index, tensors, reports)
        raise KeyboardInterrupt

    monkeypatch.setattr(WorkDir, "write_layer", interrupted_after_layer_0)
    argv = quantize_argv(tiny_model_dir, text_dir, out)
    assert main(argv) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{out}.work" in err and "--resume" in err
    assert (tmp_path / "ckpt.work" / "layers" / "layer-00000.safetensors").is_file() and not out.exists()
    monkeypatch.setattr(WorkDir, "write_layer", original)
    assert main(argv) == 2  # an interrupted run is never silently started over
    assert main([*argv, "--resume"]) == 0
    assert (out / "model.safetensors").is_file() and not (tmp_path / "ckpt.work").exists()


def test_ctrl_c_before_any_layer_leaves_nothing(tiny_model_dir, text_dir, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Quantizer, "quantize_model", interrupted)
    assert main(quantize_argv(tiny_model_dir, text_dir, tmp_path / "ckpt")) == EXIT_INTERRUPTED
    assert "nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts"]


def test_a_kept_work_dir_of_a_finished_run_does_not_block_the_next(tiny_model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(quantize_argv(tiny_model_dir, text_dir, out, "--keep-work-dir")) == 0
    assert WorkDir.is_finished(tmp_path / "ckpt.work")
    assert main(quantize_argv(tiny_model_dir, text_dir, out, "--resume", "--overwrite")) == 2  # nothing to resume
    capsys.readouterr()
    assert main(quantize_argv(tiny_model_dir, text_dir, out, "--overwrite")) == 0
    assert "work directory of a finished run" in capsys.readouterr().out
    assert not (tmp_path / "ckpt.work").exists()


@pytest.mark.parametrize("asked,stored", [(None, "bfloat16"), ("float16", "float16"), ("float32", "float32")])
def test_unquantized_tensors_are_stored_in_16_bit_unless_asked(tiny_model_dir, text_dir, tmp_path, asked, stored):
    out = tmp_path / "ckpt"  # the tiny model is float32: by default it is stored as bfloat16
    assert main(quantize_argv(tiny_model_dir, text_dir, out, *(["--dtype", asked] if asked else []))) == 0
    code = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[stored]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == code
        assert f.get_slice("model.layers.0.mlp.up_proj.scales").get_dtype() == "F16"  # GPTQ scales stay fp16
    assert json.loads((out / "config.json").read_text())["dtype"] == stored
    assert load_quantized(out).model.embed_tokens.weight.dtype == getattr(torch, stored)


def test_float16_is_refused_for_values_beyond_its_range():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from neural_quantization.config import ConfigError

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48,
                                                         num_hidden_layers=1, num_attention_heads=2))
    with torch.no_grad():
        model.model.norm.weight[0] = 1e6
    ids = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="bfloat16"):
        Quantizer(QuantizationConfig(bits=4, group_size=16, checkpoint_dtype="float16")).quantize_model(model, ids)


def test_checkpoint_size_matches_the_estimate_from_its_config(checkpoint, tmp_path):
    """deploy-report's estimate from config.json alone matches the tensors the checkpoint stores (on a
    model this small the safetensors headers, ~100 bytes a tensor, are counted apart; on SmolLM2 the
    whole file is 1.001x the estimate: benchmarks/checkpoint_size.py)."""
    import math

    from neural_quantization.deploy.memory import memory_report
    from neural_quantization.formats.integrity import DTYPE_BYTES, inspect_checkpoint

    inventory = inspect_checkpoint(checkpoint)
    tensor_bytes = sum(math.prod(t.shape) * DTYPE_BYTES[t.dtype] for t in inventory.tensors.values())
    measured = memory_report(checkpoint).weights["gptq"]["bytes"]
    assert measured - tensor_bytes < 150 * len(inventory.tensors)  # the rest is the header
    shutil.copy(checkpoint / "config.json", tmp_path / "config.json")
    estimated = memory_report(tmp_path / "config.json", bits=4, group_size=32).weights["gptq"]["bytes"]
    assert estimated <= tensor_bytes <= 1.05 * estimated, (tensor_bytes, estimated)
