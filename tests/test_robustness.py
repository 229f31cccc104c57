"""Bad input and broken checkpoints: every case exits 2 with one line that says what to fix, before
any model weight is read, and leaves the file system as it was.

The table below is what a new user gets wrong (and what breaks on disk); each row runs the real CLI
in-process with ``load_model`` replaced by a function that fails the test, so "refused before the
model loaded" is checked, not assumed. A property test then throws random option combinations at
the CLI and asserts it never ends in a traceback.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import save_tiny_llama
from neural_quantization.cli import main
from neural_quantization.export.checkpoint import CheckpointError, load_quantized


@dataclass
class Context:
    tmp: Path  # the test's directory: every output goes here
    model: Path  # a tiny float model
    texts: Path  # {en,fr}.{calib,eval}.txt
    checkpoint: Path  # a copy of a tiny quantized checkpoint, free to break
    streamed: Path  # a copy of a tiny sharded checkpoint, free to break

    def out(self, name: str = "out") -> Path:
        return self.tmp / name


@pytest.fixture(scope="session")
def saved_checkpoints(tmp_path_factory, tiny_model_dir):
    """A tiny GPTQ checkpoint and its sharded (streamed) twin, written once by the CLI."""
    root = tmp_path_factory.mktemp("checkpoints")
    texts = root / "texts"
    texts.mkdir()
    from conftest import TINY_CORPUS

    for lang, lines in {"en": TINY_CORPUS[:2], "fr": TINY_CORPUS[2:]}.items():
        (texts / f"{lang}.calib.txt").write_text("\n".join(lines * 20) + "\n")
    common = ["--model-name", tiny_model_dir, "--group-size", "32", "--calibration-data", texts,
              "--target-languages", "en", "--num-samples", "4", "--seq-len", "32", "--quiet"]
    assert main([str(a) for a in [*common, "--output-dir", root / "ckpt"]]) == 0
    assert main([str(a) for a in [*common, "--output-dir", root / "sharded", "--stream-weights"]]) == 0
    return root / "ckpt", root / "sharded"


@pytest.fixture
def ctx(tmp_path, tiny_model_dir, text_dir, saved_checkpoints, monkeypatch):
    checkpoint, streamed = saved_checkpoints
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    shutil.copytree(streamed, tmp_path / "sharded")
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("the user's file")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    import neural_quantization.models.loading as loading

    monkeypatch.setattr(loading, "load_model", no_loading)
    return Context(tmp_path, tiny_model_dir, text_dir, tmp_path / "ckpt", tmp_path / "sharded")


def snapshot(*roots: Path) -> dict[str, tuple]:
    state = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            state[str(p)] = (p.is_dir(), st.st_size, st.st_mtime_ns, st.st_mode)
    return state


def assert_refused(argv: list, needle: str, ctx: Context, capsys) -> str:
    """Exit 2, one line ``neural-quantize: error: ...`` containing ``needle``, nothing changed on disk."""
    capsys.readouterr()
    before = snapshot(ctx.tmp, ctx.model)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("neural-quantize: error: "), captured.err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(ctx.tmp, ctx.model) == before, "the file system changed"
    return lines[0]


def quantize(ctx: Context, *extra, out: Path | None = None, data: bool = True) -> list:
    argv = ["--model-name", ctx.model, "--output-dir", out or ctx.out(), "--target-languages", "en", "--quiet",
            "--num-samples", "4", "--seq-len", "32"]
    return argv + (["--calibration-data", ctx.texts] if data else []) + list(extra)


def _other_arch(ctx: Context) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = ctx.tmp / "qwen"
    AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 num_key_value_heads=1, max_position_embeddings=128)).save_pretrained(path)
    return path


def _interrupted_work_dir(ctx: Context) -> None:
    work = Path(str(ctx.out()) + ".work")
    work.mkdir()
    (work / "run.json").write_text("{}")


def _our_checkpoint_with_notes(ctx: Context) -> None:
    shutil.copytree(ctx.checkpoint, ctx.out())
    (ctx.out() / "notes.txt").write_text("the user's")


def _not_ours(ctx: Context) -> None:
    ctx.out().mkdir()
    (ctx.out() / "data.csv").write_text("1,2,3")
    (ctx.out() / "sub").mkdir()
    (ctx.out() / "sub" / "more.txt").write_text("x")


NO_GPU = torch.cuda.is_available()

# (id, setup or None, argv builder, text the one-line message must contain)
QUANTIZE_CASES = [
    ("bits-5", None, lambda c: quantize(c, "--bits", "5"), "bits=5"),
    ("group-size-0", None, lambda c: quantize(c, "--group-size", "0"), "group_size"),
    ("group-size-negative", None, lambda c: quantize(c, "--group-size", "-2"), "group_size"),
    ("damp-0", None, lambda c: quantize(c, "--damp", "0"), "damp_percent"),
    ("damp-over-1", None, lambda c: quantize(c, "--damp", "1.5"), "damp_percent"),
    ("num-samples-0", None, lambda c: quantize(c, "--num-samples", "0"), "num_samples"),
    ("seq-len-1", None, lambda c: quantize(c, "--seq-len", "1"), "seq_len"),
    ("seq-len-past-context", None, lambda c: quantize(c, "--seq-len", "100000"), "context of 256 tokens"),
    ("rtn-seq-len-past-context", None, lambda c: quantize(c, "--method", "rtn", "--seq-len", "100000"),
     "context of 256"),
    ("eval-seq-len-past-context", None, lambda c: quantize(c, "--eval-data", c.texts, "--eval-seq-len", "9999"),
     "--eval-seq-len 9999"),
    ("eval-seq-len-1", None, lambda c: quantize(c, "--eval-data", c.texts, "--eval-seq-len", "1"), "at least 2"),
    ("calibration-batch-0", None, lambda c: quantize(c, "--calibration-batch-size", "0"), "calibration_batch_size"),
    ("block-size-0", None, lambda c: quantize(c, "--block-size", "0"), "block_size"),
    ("language-without-text", None, lambda c: quantize(c, "--target-languages", "en", "xx"), "xx"),
    ("language-without-prompts", None, lambda c: quantize(c, "--target-languages", "xx", data=False),
     "--target-languages xx"),
    ("calibration-missing", None, lambda c: quantize(c, data=False) + ["--calibration-data", "nope"],
     "No such file or directory"),
    ("calibration-mistyped-relative", lambda c: (c.tmp / "work" / "data").mkdir(),
     lambda c: quantize(c, data=False) + ["--calibration-data", "data/multilingua"], "No such file or directory"),
    ("calibration-hub-id-without-datasets", None,
     lambda c: quantize(c, data=False) + ["--calibration-data", "someorg/somedata"], "datasets"),
    ("calibration-empty", lambda c: (c.tmp / "empty.txt").write_text("\n\n"),
     lambda c: quantize(c, data=False) + ["--calibration-data", c.tmp / "empty.txt"], "holds no text"),
    ("eval-data-missing", None, lambda c: quantize(c, "--eval-data", c.tmp / "nope"), "No such file or directory"),
    ("eval-language-missing", None, lambda c: quantize(c, "--eval-data", c.texts, "--target-languages", "en", "de"),
     "de"),
    ("device-invalid", None, lambda c: quantize(c, "--device", "gpu"), "--device 'gpu' is not a device"),
    ("device-index-missing" if NO_GPU else "device-cuda-without-gpu", None,
     lambda c: quantize(c, "--device", "cuda:63" if NO_GPU else "cuda"), "cuda"),
    ("devices-missing", None, lambda c: quantize(c, "--devices", "cuda:63"), "cuda:63"),
    ("devices-invalid", None, lambda c: quantize(c, "--devices", "cpu", "cuda:x"), "--devices 'cuda:x' is not"),
    ("gguf-group-size", None, lambda c: quantize(c, "--format", "gguf", "--group-size", "64"), "--group-size 32"),
    ("gguf-asym", None, lambda c: quantize(c, "--format", "gguf", "--group-size", "32", "--asym"), "--sym"),
    ("gguf-architecture", None,
     lambda c: quantize(c, "--format", "gguf", "--group-size", "32") + ["--model-name", _other_arch(c)], "'qwen2'"),
    ("compressed-tensors-3-bit", None, lambda c: quantize(c, "--format", "compressed-tensors", "--bits", "3"), "3"),
    ("compressed-tensors-group-does-not-divide", None, lambda c: quantize(c, "--format", "compressed-tensors"),
     "does not divide in_features=64"),
    ("nested-cascade-as-gguf", None, lambda c: quantize(c, "--cascade-mode", "nested", "--format", "gguf"),
     "nested cascade"),
    ("bits-disagree-with-cascade", None, lambda c: quantize(c, "--bits", "4", "--cascade-stages", "8", "2"),
     "cascade_stages=[8, 2] ends at 2 bits"),
    ("cascade-narrow-to-wide", None, lambda c: quantize(c, "--cascade-stages", "4", "8"), "wide to narrow"),
    ("cascade-resume", None, lambda c: quantize(c, "--cascade", "--resume"), "cascade runs cannot"),
    ("stream-and-evaluate", None, lambda c: quantize(c, "--stream-weights", "--eval-data", c.texts),
     "neural-quantize eval"),
    ("stream-as-gguf", None, lambda c: quantize(c, "--stream-weights", "--format", "gguf", "--group-size", "32"),
     "--stream-weights"),
    ("resume-without-run", None, lambda c: quantize(c, "--resume"), "holds no interrupted run"),
    ("interrupted-run-without-resume", _interrupted_work_dir, lambda c: quantize(c), "--resume"),
    ("work-dir-is-output-dir", None, lambda c: quantize(c, "--work-dir", c.out()), "must differ"),
    ("work-dir-not-ours", None, lambda c: quantize(c, "--work-dir", c.tmp / "work"), "not a work directory"),
    ("output-is-cwd", None, lambda c: quantize(c, "--overwrite", out=Path(".")), "current directory"),
    ("output-is-parent", None, lambda c: quantize(c, "--overwrite", out=Path("..")), "holds the current directory"),
    ("output-is-home", None, lambda c: quantize(c, "--overwrite", out=c.tmp / "home"), "home directory"),
    ("output-is-root", None, lambda c: quantize(c, "--overwrite", out=Path("/")), "current directory"),
    ("overwrite-not-ours", _not_ours, lambda c: quantize(c, "--overwrite"), "not a checkpoint written by"),
    ("overwrite-ours-with-notes", _our_checkpoint_with_notes, lambda c: quantize(c, "--overwrite"), "notes.txt"),
    ("output-exists", _not_ours, lambda c: quantize(c), "--overwrite"),
    ("output-is-a-file", lambda c: c.out().write_text("x"), lambda c: quantize(c, "--overwrite"),
     "is not a directory"),
    ("model-unknown", None, lambda c: quantize(c) + ["--model-name", "no-such-model"], "not a built-in alias"),
    ("model-missing-path", None, lambda c: quantize(c) + ["--model-name", "./missing"], "No file or directory"),
    ("model-dir-without-config", lambda c: (c.tmp / "empty-model").mkdir(),
     lambda c: quantize(c) + ["--model-name", c.tmp / "empty-model"], "without config.json"),
    ("model-is-our-checkpoint", None, lambda c: quantize(c) + ["--model-name", c.checkpoint], "load_quantized"),
    ("model-hub-id-offline", None, lambda c: quantize(c) + ["--model-name", "someorg/somemodel"], "offline mode"),
    ("model-file-not-gguf", None, lambda c: quantize(c) + ["--model-name", c.texts / "en.calib.txt"],
     "not a .gguf file"),
    ("gate-negative", None, lambda c: quantize(c, "--max-degradation", "-1"), "max_degradation"),
    ("eval-windows-0", None, lambda c: quantize(c, "--max-eval-windows", "0"), "--max-eval-windows 0"),
    ("edge-context-0", None, lambda c: quantize(c, "--optimize-for-edge", "--edge-context", "0"), "--edge-context"),
    ("marlin-asym", None, lambda c: quantize(c, "--kernel-backend", "marlin", "--asym"), "Marlin"),
    ("marlin-shapes", None, lambda c: quantize(c, "--kernel-backend", "marlin", "--group-size", "32"),
     "Marlin kernels"),
]


@pytest.mark.parametrize("setup,build,needle", [c[1:] for c in QUANTIZE_CASES], ids=[c[0] for c in QUANTIZE_CASES])
def test_bad_quantize_input_exits_2_before_loading_and_writes_nothing(ctx, capsys, setup, build, needle):
    if setup is not None:
        setup(ctx)
    assert_refused(build(ctx), needle, ctx, capsys)


# ---- broken checkpoints ------------------------------------------------------------------------


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _rewrite_tensors(path: Path, edit) -> None:
    file = path / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _truncate(file: Path, keep: int | None = None, cut: int = 100) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:keep] if keep is not None else data[:-cut])


SCALES = "model.layers.0.mlp.down_proj.scales"
QWEIGHT = "model.layers.0.mlp.down_proj.qweight"


def _nan_scales(tensors):
    tensors[SCALES] = tensors[SCALES].clone()
    tensors[SCALES][0, 0] = float("nan")


def _other_architecture(path: Path) -> None:
    other = save_tiny_llama(path.parent / "wider", hidden_size=96, intermediate_size=128)
    shutil.copy(other / "config.json", path / "config.json")
    _edit_config(path, lambda c: c.update(quantization_config=json.loads(
        (path.parent / "ckpt-config.json").read_text())))


def _shard_index_edit(path: Path, edit) -> None:
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    edit(index)
    index_file.write_text(json.dumps(index))


def _remap_to_wrong_shard(index):
    name = next(iter(index["weight_map"]))
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})
    index["weight_map"][name] = others[0]


BROKEN = [
    ("truncated-weights", lambda p: _truncate(p / "model.safetensors"), "is truncated"),
    ("truncated-header", lambda p: _truncate(p / "model.safetensors", keep=4), "truncated"),
    ("damaged-header", lambda p: (p / "model.safetensors").write_bytes((64).to_bytes(8, "little") + b"{" * 64),
     "damaged header"),
    ("bytes-appended", lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()
                                                                       + b"\0" * 16), "after its last tensor"),
    ("weights-missing", lambda p: (p / "model.safetensors").unlink(), "has no model.safetensors"),
    ("config-missing", lambda p: (p / "config.json").unlink(), "has no config.json"),
    ("config-not-json", lambda p: (p / "config.json").write_text("{not json"), "not valid JSON"),
    ("bits-edited", lambda p: _edit_config(p, lambda c: c["quantization_config"].update(bits=3)),
     "disagrees with the run record"),
    ("bits-invalid", lambda p: _edit_config(p, lambda c: c["quantization_config"].update(bits=5)), "bits=5"),
    ("group-size-edited-everywhere", lambda p: _edit_config(p, lambda c: (
        c["quantization_config"].update(group_size=16),
        c["quantization_config"]["neural_quantization"]["config"].update(group_size=16))), "does not match"),
    ("sym-not-bool", lambda p: _edit_config(p, lambda c: c["quantization_config"].update(sym="yes")),
     "expected true or false"),
    ("not-gptq", lambda p: _edit_config(p, lambda c: c["quantization_config"].update(quant_method="awq")),
     "not a GPTQ checkpoint"),
    ("other-checkpoint-format", lambda p: _edit_config(p, lambda c: c["quantization_config"].update(
        checkpoint_format="marlin")), "checkpoint_format"),
    ("nan-scales", lambda p: _rewrite_tensors(p, _nan_scales), "NaN"),
    ("qweight-wrong-dtype", lambda p: _rewrite_tensors(p, lambda t: t.update({QWEIGHT: t[QWEIGHT].float()})),
     "is F32"),
    ("scales-missing", lambda p: _rewrite_tensors(p, lambda t: t.pop(SCALES)), "no scales"),
    ("norm-missing", lambda p: _rewrite_tensors(p, lambda t: t.pop("model.norm.weight")), "lacks tensor model.norm"),
    ("unknown-tensor", lambda p: _rewrite_tensors(p, lambda t: t.update(extra=torch.zeros(2))), "tensor extra"),
    ("other-architecture", lambda p: (
        (p.parent / "ckpt-config.json").write_text(json.dumps(json.loads((p / "config.json").read_text())[
            "quantization_config"])), _other_architecture(p)), "another model's checkpoint"),
]

SHARDED_BROKEN = [
    ("shard-missing", lambda p: (p / "model-00001-of-00003.safetensors").unlink(), "which is missing"),
    ("index-points-at-missing-file", lambda p: _shard_index_edit(
        p, lambda i: i["weight_map"].update({"model.norm.weight": "model-99999.safetensors"})), "which is missing"),
    ("index-maps-to-wrong-shard", lambda p: _shard_index_edit(p, _remap_to_wrong_shard), "does not hold it"),
    ("index-damaged", lambda p: (p / "model.safetensors.index.json").write_text("[]"), "damaged"),
    ("shard-truncated", lambda p: _truncate(p / "model-00002-of-00003.safetensors"), "is truncated"),
]


@pytest.mark.parametrize("break_it,needle", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_checkpoint_fails_eval_in_one_line_before_any_work(ctx, capsys, break_it, needle):
    break_it(ctx.checkpoint)
    line = assert_refused(["eval", "--model", ctx.checkpoint, "--eval-data", ctx.texts, "--quiet"], needle, ctx, capsys)
    with pytest.raises(CheckpointError) as raised:
        load_quantized(ctx.checkpoint)
    assert str(raised.value) in line


@pytest.mark.parametrize("break_it,needle", [c[1:] for c in SHARDED_BROKEN], ids=[c[0] for c in SHARDED_BROKEN])
def test_broken_sharded_checkpoint_fails_eval_and_deploy_report(ctx, capsys, break_it, needle):
    break_it(ctx.streamed)
    assert_refused(["eval", "--model", ctx.streamed, "--eval-data", ctx.texts], needle, ctx, capsys)
    assert_refused(["deploy-report", ctx.streamed], needle, ctx, capsys)


def test_deploy_report_refuses_a_truncated_checkpoint_it_would_have_measured(ctx, capsys):
    _truncate(ctx.checkpoint / "model.safetensors")
    assert_refused(["deploy-report", ctx.checkpoint], "is truncated", ctx, capsys)
    assert_refused(["deploy-report", ctx.tmp / "nowhere"], "does not exist", ctx, capsys)
    assert_refused(["deploy-report", ctx.checkpoint, "--context", "0"], "--context", ctx, capsys)


def test_eval_refuses_bad_input_before_loading_the_reference(ctx, capsys):
    assert_refused(["eval", "--model", ctx.checkpoint], "--eval-data", ctx, capsys)
    assert_refused(["eval", "--model", ctx.tmp / "none", "--eval-data", ctx.texts], "not a directory", ctx, capsys)
    assert_refused(["eval", "--model", ctx.model, "--eval-data", ctx.texts], "not a GPTQ checkpoint", ctx, capsys)
    assert_refused(["eval", "--model", ctx.checkpoint, "--eval-data", ctx.texts, "--target-languages", "de"],
                   "de", ctx, capsys)
    assert_refused(["eval", "--model", ctx.checkpoint, "--eval-data", ctx.texts, "--device", "cuda:63"],
                   "cuda", ctx, capsys)


@pytest.mark.parametrize("argv", [["quantize", "--model-name", "m"], ["--bits", "four"], ["--dtype", "float8"],
                                  ["quantize", "--output-dir", "x"], ["eval"], ["nonsense"]])
def test_malformed_command_lines_exit_2_with_argparse_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


# ---- the property: random option combinations never end in a traceback --------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

OPTIONS = {
    "--bits": st.sampled_from(["2", "3", "4", "5", "8"]),
    "--group-size": st.sampled_from(["-1", "0", "16", "32", "48", "1000"]),
    "--damp": st.sampled_from(["0", "0.01", "0.5", "2"]),
    "--method": st.sampled_from(["gptq", "rtn"]),
    "--num-samples": st.sampled_from(["0", "1", "4"]),
    "--seq-len": st.sampled_from(["1", "8", "32", "5000"]),
    "--target-languages": st.sampled_from([["en"], ["en", "fr"], ["xx"]]),
    "--format": st.sampled_from(["gptq", "compressed-tensors", "gguf"]),
    "--cascade-stages": st.sampled_from([["8", "4"], ["4", "8"], ["8", "3"]]),
    "--cascade-mode": st.sampled_from(["sequential", "nested"]),
    "--device": st.sampled_from(["cpu", "auto", "cuda:63", "tpu"]),
    "--calibration-batch-size": st.sampled_from(["0", "2"]),
    "--eval-seq-len": st.sampled_from(["1", "16", "9999"]),
    "--dtype": st.sampled_from(["float16", "bfloat16", "float32"]),
}
FLAGS = ["--asym", "--desc-act", "--static-groups", "--mse-clip", "--overwrite", "--resume", "--no-true-sequential"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=5),
       flags=st.lists(st.sampled_from(FLAGS), unique=True, max_size=3), evaluate=st.booleans(), data=st.data())
def test_random_option_combinations_never_end_in_a_traceback(tiny_model_dir, text_dir, tmp_path, capsys,
                                                               chosen, flags, evaluate, data):
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
    argv = ["--model-name", str(tiny_model_dir), "--output-dir", str(out), "--calibration-data", str(text_dir),
            "--target-languages", "en", "--num-samples", "2", "--seq-len", "16", "--quiet",
            "--max-degradation", "1e9", "--max-language-degradation", "1e9"]
    for option in chosen:
        value = data.draw(OPTIONS[option], label=option)
        argv += [option, *(value if isinstance(value, list) else [value])]
    argv += flags + (["--eval-data", str(text_dir), "--eval-seq-len", "16"] if evaluate else [])
    code = main(argv)  # an uncaught exception fails the test: that is the property
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err)
    if code == 2:
        assert len([line for line in err.splitlines() if line.startswith("neural-quantize: error:")]) == 1, err
        assert not out.exists() and not Path(f"{out}.work").exists(), argv
    else:
        assert (out / "config.json").is_file()


def test_the_installed_command_refuses_bad_input_in_one_line(tmp_path):
    """The real entry point in a fresh process: exit 2, one line on stderr, no traceback."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "neural_quantization.cli", "--model-name", "no-such-model",
                             "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("neural-quantize: error: Cannot find model"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_unreachable_hub_fails_after_one_attempt(monkeypatch):
    """Outside offline mode a hub id gets one metadata request; without network it fails with the fix
    (instead of transformers' minute of retries ending in an OSError traceback)."""
    import huggingface_hub.constants as constants

    from neural_quantization.models.loading import ModelNotFoundError, check_hub_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelNotFoundError, match="Cannot reach the Hugging Face hub"):
        check_hub_model("someorg/somemodel")
