"""Every script in ``examples/`` runs, as a user would run it, on the tiny saved Llama.

Each example is started as its own process (``python examples/NAME.py --model DIR ...``) with
small calibration settings; the test then checks what the script says it leaves behind (a
checkpoint that loads, the exports, the JSON of measured numbers). A new example without an entry
in ``EXAMPLE_ARGS`` fails ``test_every_example_is_run_here``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, make_tiny_bpe_tokenizer, save_tiny_llama

EXAMPLES = REPO_ROOT / "examples"

#: The arguments each example gets besides --model and --output-dir: the fewest calibration tokens
#: that still exercise the whole script.
EXAMPLE_ARGS = {
    "quantize_and_evaluate.py": ["--num-samples", "4", "--seq-len", "32", "--group-size", "32",
                                 "--languages", "en", "fr", "--eval-seq-len", "16"],
    "export_for_vllm_and_llamacpp.py": ["--num-samples", "4", "--seq-len", "32", "--languages", "en"],
    "nested_cascade.py": ["--num-samples", "4", "--seq-len", "32", "--group-size", "32", "--languages", "en"],
    "stream_large_model.py": ["--num-samples", "4", "--seq-len", "16", "--group-size", "32"],
}


def run_example(name: str, model_dir: Path, output_dir: Path, *extra: str) -> str:
    command = [sys.executable, str(EXAMPLES / name), "--model", str(model_dir), "--output-dir", str(output_dir),
               *EXAMPLE_ARGS[name], *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_example_is_run_here():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXAMPLE_ARGS)


def test_quantize_and_evaluate(tiny_model_dir, tmp_path):
    from neural_quantization import load_quantized

    out, report = tmp_path / "w4", tmp_path / "scores.json"
    stdout = run_example("quantize_and_evaluate.py", tiny_model_dir, out, "--json", str(report))
    scores = json.loads(report.read_text())
    assert set(scores["languages"]) == {"en", "fr"}
    for lang, numbers in scores["languages"].items():
        assert numbers["ppl_reference"] > 0 and numbers["ppl_quantized"] > 0
        assert numbers["kl_divergence"] >= 0
        assert f"\n{lang} " in stdout
    assert scores["compression"] > 1
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    load_quantized(out)(torch.tensor([[2, 5, 6, 7]]))  # the checkpoint loads and runs


def test_export_for_vllm_and_llamacpp(tmp_path):
    gguf = pytest.importorskip("gguf")
    # The GGUF export writes tokenizer metadata for byte-level BPE tokenizers (as Llama 3's, SmolLM2's).
    model_dir = save_tiny_llama(tmp_path / "tiny-llama", tokenizer=make_tiny_bpe_tokenizer())
    out = tmp_path / "exports"
    stdout = run_example("export_for_vllm_and_llamacpp.py", model_dir, out)
    vllm_dir = out / "tiny-llama-w4g32-compressed-tensors"
    config = json.loads((vllm_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    (gguf_file,) = (out / "tiny-llama-w4g32-gguf").glob("*.gguf")
    types = {t.tensor_type.name for t in gguf.GGUFReader(gguf_file).tensors}
    assert "Q4_0" in types
    assert f"vllm serve {vllm_dir}" in stdout and str(gguf_file) in stdout


def test_nested_cascade(tiny_model_dir, tmp_path):
    stdout = run_example("nested_cascade.py", tiny_model_dir, tmp_path / "nested")
    assert json.loads((tmp_path / "nested" / "config.json").read_text())["quantization_config"]["bits"] == 8
    # The script compares the 4-bit read from disk with narrow_model in memory: they must agree.
    assert "4-bit read from disk equals narrow_model(model, 4) in memory: True" in stdout


def test_stream_large_model(tiny_model_dir, tmp_path):
    from neural_quantization import load_quantized

    out = tmp_path / "streamed"
    run_example("stream_large_model.py", tiny_model_dir, out)
    assert not Path(f"{out}.work").exists()  # the script removes its work directory when done
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
    load_quantized(out)(torch.tensor([[2, 5, 6, 7]]))  # the assembled shards load and run


@pytest.mark.parametrize("name", sorted(EXAMPLE_ARGS))
def test_examples_explain_how_to_run_them(name):
    """Each script's docstring says what it shows and how to run it (the help text is its first line)."""
    doc = (EXAMPLES / name).read_text().split('"""')[1]
    assert "What it shows" in doc and f"python examples/{name}" in doc
