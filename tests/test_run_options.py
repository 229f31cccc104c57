"""Run options: one owner for every option rule (CLI and Python refuse the same things), the
``--config FILE`` reader, and the shipped templates."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neural_quantization.cli import build_parser, config_from_args, main, options_from_args
from neural_quantization.config import ConfigError, QuantizationConfig, RunOptions

TEMPLATES = sorted((Path(__file__).parent.parent / "templates").glob("*.*"))


def parse(*argv):
    return build_parser().parse_args(["quantize", "--model-name", "m", "--output-dir", "o", *map(str, argv)])


def test_explicit_bits_always_win_and_a_contradiction_is_refused():
    assert QuantizationConfig(cascade_stages=[8, 2]).bits == 2  # left out: the cascade's last width
    assert QuantizationConfig(bits=3).bits == 3
    for bits in (3, 4):  # no hidden rewrite: both contradictions are refused the same way
        with pytest.raises(ConfigError, match="Leave bits out"):
            config_from_args(parse("--bits", bits, "--cascade-stages", 8, 2))
        with pytest.raises(ConfigError, match="Leave bits out"):
            QuantizationConfig(bits=bits, cascade_stages=[8, 2])
    assert config_from_args(parse("--bits", 2, "--cascade-stages", 8, 2)).bits == 2


def test_a_cascade_mode_alone_means_the_default_stages_in_python_as_on_the_command_line():
    python = QuantizationConfig(cascade_mode="nested")
    assert python.cascade_stages == [8, 4] and python.bits == 4 and python.static_groups is False
    assert config_from_args(parse("--cascade-mode", "nested")) == python
    assert config_from_args(parse("--cascade")) == QuantizationConfig(cascade_stages=[8, 4])
    direct = QuantizationConfig()
    assert direct.cascade_stages is None and QuantizationConfig.from_dict(direct.to_dict()) == direct
    assert direct.replace(seed=3).cascade_stages is None  # replace() does not start a cascade


@pytest.mark.parametrize("options, message", [
    (dict(export_format="onnx"), "--format 'onnx' is unknown"),
    (dict(export_format="gguf", config=QuantizationConfig(cascade_mode="nested")), "cannot hold a nested cascade"),
    (dict(eval_seq_len=1), "at least 2"),
    (dict(edge_batch=0), "--edge-batch 0 must be positive"),
    (dict(stream_weights=True, eval_data="texts/"), "without evaluating it"),
    (dict(stream_weights=True, config=QuantizationConfig(rotate=True)), "--rotate"),
    (dict(work_dir="w", config=QuantizationConfig(cascade_stages=[8, 4])), "cascade runs cannot"),
    (dict(work_dir="out"), "must differ from --output-dir"),
])
def test_run_options_refuse_combinations_that_cannot_work(options, message):
    with pytest.raises(ConfigError, match=message):
        RunOptions("m", "out", **options)


def test_the_cli_builds_the_same_run_options_python_users_build():
    args = parse("--bits", 3, "--group-size", 64, "--format", "compressed-tensors", "--no-fail-on-gate")
    assert options_from_args(args) == RunOptions(
        "m", "o", QuantizationConfig(bits=3, group_size=64), export_format="compressed-tensors", fail_on_gate=False)
    assert RunOptions("m", "o").work_path == Path("o.work")
    assert RunOptions("m", "o", QuantizationConfig(cascade_stages=[8, 4])).work_path is None
    assert RunOptions("m", "o").offload_activations is None  # automatic unless asked


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.name for t in TEMPLATES])
def test_every_template_is_valid_for_the_quantize_command(template, tmp_path):
    from neural_quantization.cli import _parse

    args = _parse(build_parser(), ["quantize", "--config", str(template), "--model-name", "m",
                                   "--output-dir", str(tmp_path / "o")])
    options = options_from_args(args)
    assert options.config.bits == 4
    assert template.read_text().startswith("#")  # says what it is for and how to run it


def test_config_file_errors_name_the_key_and_the_fix(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    for text, message in [('bitz = 4', "unknown option 'bitz'"), ('bits = "four"', "not a valid value"),
                          ('format = "onnx"', "choose from gptq"), ('asym = 1', "is a flag"), ('bits = [', "not valid TOML")]:
        bad.write_text(text)
        assert main(["quantize", "--config", str(bad), "--model-name", "m", "--output-dir", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_file_and_flags_give_the_checkpoint_of_the_same_flags_alone(tiny_model_dir, text_dir, tmp_path):
    """The file holds some options (and the required model name), the command line overrides one."""
    common = ["--calibration-data", text_dir, "--target-languages", "en", "fr", "--num-samples", "4",
              "--seq-len", "32", "--quiet"]
    flags = ["--model-name", tiny_model_dir, "--bits", "3", "--group-size", "32", "--asym", "--no-desc-act"]
    assert main(["quantize", *map(str, flags + common), "--output-dir", str(tmp_path / "flags")]) == 0
    config = tmp_path / "run.yaml"
    config.write_text(f"model-name: {tiny_model_dir}\nbits: 4\ngroup-size: 32\nasym: true\ndesc-act: false\n")
    assert main(["quantize", "--config", str(config), "--bits", "3", *map(str, common),
                 "--output-dir", str(tmp_path / "file")]) == 0
    by_flags = load_file(tmp_path / "flags" / "model.safetensors")
    by_file = load_file(tmp_path / "file" / "model.safetensors")
    assert by_flags.keys() == by_file.keys() and any(k.endswith(".qweight") for k in by_file)
    for name, tensor in by_flags.items():
        assert torch.equal(tensor, by_file[name]), name


def test_run_quantization_from_python_does_what_the_cli_does(tiny_model_dir, text_dir, tmp_path):
    from neural_quantization import QualityGates, load_quantized, run_quantization

    config = QuantizationConfig(group_size=32, num_samples=4, seq_len=32, target_languages=["en", "fr"])
    outcome = run_quantization(RunOptions(
        str(tiny_model_dir), tmp_path / "ckpt", config, calibration_data=text_dir, eval_data=text_dir,
        eval_seq_len=32, gates=QualityGates(max_degradation=0.0, max_language_degradation=1e9), show_progress=False,
        report_json=tmp_path / "report.json",
    ))
    assert outcome.checkpoint == (tmp_path / "ckpt").resolve() or outcome.checkpoint == tmp_path / "ckpt"
    assert set(outcome.report["languages"]) == {"en", "fr"}
    # the gates given in Python are the ones checked, and their verdict is the report's
    average = outcome.report["gates"]["max_degradation"]
    assert average["limit"] == 0.0 and outcome.gates_passed == (average["value"] <= 0.0)
    assert json.loads((tmp_path / "report.json").read_text())["gates_passed"] == outcome.gates_passed
    assert load_quantized(outcome.checkpoint).config.quantization_config["bits"] == 4
    assert not (tmp_path / "ckpt.work").exists()  # the work directory is removed once the checkpoint is saved
