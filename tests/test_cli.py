"""The command line end to end on a tiny local model: exit codes, files written, errors with fixes."""

import json

import pytest
import torch

from neural_quantization import load_quantized
from neural_quantization.cli import main


def run_cli(*args):
    return main([str(a) for a in args])


def test_bare_form_quantizes_saves_and_reports(tiny_model_dir, text_dir, tmp_path, capsys):
    out, report = tmp_path / "ckpt", tmp_path / "report.json"
    code = run_cli(
        "--model-name", tiny_model_dir, "--output-dir", out, "--bits", "4", "--group-size", "32",
        "--calibration-data", text_dir, "--target-languages", "en", "fr", "--num-samples", "8", "--seq-len", "32",
        "--eval-data", text_dir, "--eval-seq-len", "32", "--report-json", report, "--quiet",
        "--max-degradation", "1000", "--max-language-degradation", "1000",
    )
    assert code == 0
    data = json.loads(report.read_text())
    assert set(data["languages"]) == {"en", "fr"}
    assert data["calibration"]["languages"] == ["en", "fr"] and data["calibration"]["tokens"] == 8 * 32
    assert data["gates"]["max_degradation"]["passed"] is True
    assert report.with_suffix(".md").is_file() and report.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    model = load_quantized(out)
    assert model.config.quantization_config["bits"] == 4
    printed = capsys.readouterr().out
    assert "Compression" in printed and "Checkpoint written" in printed


def test_failed_gate_exits_3_unless_disabled(tiny_model_dir, text_dir, tmp_path):
    common = ["--model-name", tiny_model_dir, "--bits", "2", "--group-size", "32", "--method", "rtn", "--calibration-data", text_dir,
              "--target-languages", "en", "fr", "--num-samples", "4", "--seq-len", "32", "--eval-data", text_dir,
              "--eval-seq-len", "32", "--quiet", "--max-language-degradation", "0"]
    assert run_cli(*common, "--output-dir", tmp_path / "a") == 3
    assert run_cli(*common, "--output-dir", tmp_path / "b", "--no-fail-on-gate") == 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--bits", "5"], "bits=5"),
        (["--group-size", "0"], "group_size"),
        (["--target-languages", "en", "xx"], "xx"),
        (["--seq-len", "100000"], "seq-len"),
    ],
)
def test_bad_input_exits_2_with_a_fix_and_writes_nothing(tiny_model_dir, text_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    code = run_cli("--model-name", tiny_model_dir, "--output-dir", out, "--calibration-data", text_dir,
                   "--target-languages", "en", "--quiet", *extra)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["texts"]


def test_unknown_model_and_existing_output_dir(tmp_path, capsys):
    assert run_cli("--model-name", "no-such-model", "--output-dir", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "smollm2-135m" in err and "gemma3-270m" in err
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "notes.txt").write_text("the user's")
    assert run_cli("--model-name", "no-such-model", "--output-dir", tmp_path / "exists") == 2
    assert "--overwrite" in capsys.readouterr().err


def test_empty_calibration_data_is_refused(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "en.txt").write_text("\n\n")
    assert run_cli("--model-name", tiny_model_dir, "--output-dir", tmp_path / "out", "--calibration-data", empty,
                   "--target-languages", "en", "--quiet") == 2
    assert "en" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_eval_subcommand_uses_the_recorded_base_model(tiny_model_dir, text_dir, tmp_path):
    out = tmp_path / "ckpt"
    assert run_cli("--model-name", tiny_model_dir, "--output-dir", out, "--group-size", "32", "--calibration-data",
                   text_dir, "--target-languages", "en", "--num-samples", "4", "--seq-len", "32", "--quiet") == 0
    report = tmp_path / "eval.json"
    code = run_cli("eval", "--model", out, "--eval-data", text_dir, "--target-languages", "en", "fr",
                   "--eval-seq-len", "32", "--report-json", report, "--quiet", "--no-fail-on-gate")
    assert code == 0
    data = json.loads(report.read_text())
    assert set(data["languages"]) == {"en", "fr"}
    assert data["languages"]["en"]["ppl_reference"] > 0


def test_help_lists_every_option_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    for option in ("--bits", "--group-size", "--asym", "--desc-act", "--damp", "--method", "--calibration-data",
                   "--num-samples", "--seq-len", "--target-languages", "--device", "--seed", "--report-json",
                   "--overwrite", "--eval-data", "--max-language-degradation"):
        assert option in text
    assert "(default: 128)" in text


def _subparsers():
    import argparse

    from neural_quantization.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub for name, sub in action.choices.items() if name != "bench"}


@pytest.mark.parametrize("command", ["quantize", "demo", "eval", "deploy-report"])
def test_help_is_true_every_option_explained_with_one_default(command):
    from neural_quantization.cli import _Formatter

    sub = _subparsers()[command]
    formatter = _Formatter(prog="neural-quantize")
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings} has no help"
        text = formatter._get_help_string(action) % {"default": action.default}
        assert text.lower().count("default") <= 1, (command, action.option_strings, text)
        if action.option_strings == ["--asym"]:
            assert "True" not in text


def test_flags_for_every_config_field_and_remote_code_off_by_default():
    import dataclasses

    from neural_quantization import QuantizationConfig
    from neural_quantization.cli import build_parser, config_from_args

    args = build_parser().parse_args(["quantize", "--model-name", "m", "--output-dir", "o", "--block-size", "64",
                                      "--no-true-sequential"])
    assert args.trust_remote_code is False
    config = config_from_args(args)
    assert (config.block_size, config.true_sequential) == (64, False)
    flags = {opt for a in _subparsers()["quantize"]._actions for opt in a.option_strings}
    spelled = {"damp_percent": "--damp", "quantize_lm_head": "--quantize-lm-head", "checkpoint_dtype": "--dtype"}
    for field in dataclasses.fields(QuantizationConfig):
        assert spelled.get(field.name, "--" + field.name.replace("_", "-")) in flags, field.name


def test_demo_can_turn_the_gate_back_on():
    from neural_quantization.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo"]).no_fail_on_gate is True
    assert parser.parse_args(["demo", "--fail-on-gate"]).no_fail_on_gate is False
    assert parser.parse_args(["quantize", "--model-name", "m", "--output-dir", "o"]).no_fail_on_gate is False


def test_bits_left_out_follow_the_cascade():
    from neural_quantization.cli import build_parser, config_from_args

    args = build_parser().parse_args(["quantize", "--model-name", "m", "--output-dir", "o", "--cascade-stages", "8", "2"])
    assert config_from_args(args).bits == 2  # --bits left out: the cascade's last width


def test_stream_weights_run_writes_a_sharded_checkpoint_and_cleans_its_work_dir(tiny_model_dir, text_dir, tmp_path):
    out = tmp_path / "streamed"
    code = run_cli(
        "--model-name", tiny_model_dir, "--output-dir", out, "--group-size", "32", "--calibration-data", text_dir,
        "--target-languages", "en", "fr", "--num-samples", "8", "--seq-len", "32", "--stream-weights", "--quiet",
    )
    assert code == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "streamed.work").exists()  # removed once the checkpoint is complete
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    assert torch.isfinite(load_quantized(out)(ids).logits).all()


def test_work_dir_options_that_cannot_work_exit_2_before_loading(tiny_model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    common = ("--model-name", tiny_model_dir, "--output-dir", out, "--calibration-data", text_dir, "--quiet")
    assert run_cli(*common, "--resume") == 2
    assert "holds no interrupted run" in capsys.readouterr().err
    assert run_cli(*common, "--stream-weights", "--eval-data", text_dir) == 2
    assert "neural-quantize eval" in capsys.readouterr().err
    (tmp_path / "ckpt.work").mkdir()
    (tmp_path / "ckpt.work" / "run.json").write_text("{}")
    assert run_cli(*common) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("args,options", [(["bench", "--help"], ["--batch-sizes", "--shapes"]),
                                          (["bench", "decode", "--help"], ["--compile", "--profile", "--no-fuse"])])
def test_bench_subcommands_list_their_options(args, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(option in out for option in options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("args,name", [(["bench"], "kernel benchmark"), (["bench", "decode"], "decode benchmark")])
def test_bench_without_a_gpu_exits_2_with_the_reason(args, name, capsys):
    assert main(args) == 2
    assert f"the {name} needs a CUDA GPU" in capsys.readouterr().err


def test_decode_profile_categories():
    from neural_quantization.bench.decode import kernel_category

    assert kernel_category("void nq_mma::mma_int4_kernel<__half, 2, 1, 1, 0, 2, 1, 1>(nq_mma::Params)") == \
        "int4 matmul (ours)"
    assert kernel_category("dot_slices_kernel") == "int4 matmul (ours)"
    assert kernel_category("nvjet_sm90_hsh_64x8_64x16_2x1_v_bz_TNT") == "cuBLAS matmul"
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16") == "attention"
    assert kernel_category("triton_poi_fused__unsafe_view_mul_silu_8") == "fused elementwise (torch.compile)"
    assert kernel_category("void at::native::vectorized_elementwise_kernel<8>") == "other (eager ops, copies)"


def test_demo_runs_end_to_end_on_self_written_text(tiny_model_dir, tmp_path, capsys):
    """The demo's own path: the model writes its calibration and held-out evaluation text; exit 0."""
    out = tmp_path / "demo"
    code = run_cli("demo", "--model-name", tiny_model_dir, "--output-dir", out, "--target-languages", "en",
                   "--num-samples", "2", "--seq-len", "16", "--eval-seq-len", "16", "--quiet")
    assert code == 0
    assert load_quantized(out).config.quantization_config["neural_quantization"]["calibration"]["self_generated"]
    assert "Quality per language" in capsys.readouterr().out
