"""Interop with the real readers and writers, on CPU: GPTQModel, llm-compressor, transformers.

Each peer runs in its own process (as a user would run it; GPTQModel patches transformers when
imported, so it must not share this process), writes its logits with ``torch.save`` and, where it
writes a checkpoint, the checkpoint; the test compares them with ours in the same precision.
The packages are installed by ``.ci/run`` (see README "Interop"); without them the tests skip and
say what to install.

The README's interop table names these tests cell by cell.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama

from neural_quantization import QuantizationConfig, Quantizer, load_quantized

PROBE = [[2, 5, 6, 7, 8, 3, 9, 4]]
CALIBRATION = torch.randint(2, 12, (8, 16), generator=torch.Generator().manual_seed(0))


def needs(package: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(package) is None,
        reason=f"{package} is not installed (.ci/run installs it; README 'Interop' says how)",
    )


def run_peer(script: str, *args: str | Path, cwd: Path) -> None:
    """Run ``script`` (Python source) in a fresh interpreter in ``cwd`` (a temporary directory:
    GPTQModel writes ``logs/`` there); fail with its output if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GPTQMODEL_CPU_WORKERS": "2"}  # GPTQModel refuses to start on 2 cores with its default of 1
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=cwd)
    assert done.returncode == 0, f"peer failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


def our_logits(checkpoint: Path, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return load_quantized(checkpoint, dtype=dtype)(torch.tensor(PROBE)).logits.float()


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("interop") / "tiny-llama")


# -- GPTQModel reads ours --------------------------------------------------------------------------

GPTQMODEL_LOAD = """
import sys, torch
from gptqmodel import BACKEND, GPTQModel
model = GPTQModel.load(sys.argv[1], backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
with torch.no_grad():
    logits = model.model(torch.tensor(%r)).logits.float()
torch.save(logits, sys.argv[2])
""" % (PROBE,)

OUR_SETTINGS = {
    "w4-sym": dict(bits=4, sym=True),
    "w4-asym": dict(bits=4, sym=False),
    "w4-asym-act-order-dynamic": dict(bits=4, sym=False, desc_act=True, static_groups=False),
    "w4-sym-act-order-static": dict(bits=4, sym=True, desc_act=True, static_groups=True),
    "w8-asym": dict(bits=8, sym=False),
}


TRANSFORMERS_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16, device_map="cpu")
with torch.no_grad():
    torch.save(model(torch.tensor(%r)).logits.float(), sys.argv[2])
""" % (PROBE,)


@needs("gptqmodel")
@needs("optimum")
@pytest.mark.parametrize("setting", list(OUR_SETTINGS))
def test_gptqmodel_and_transformers_load_our_checkpoint_with_our_logits(setting, float_dir, tmp_path):
    config = QuantizationConfig(group_size=32, num_samples=8, seq_len=16, **OUR_SETTINGS[setting])
    model, _ = Quantizer(config).quantize_model(str(float_dir), CALIBRATION)
    checkpoint = model.save_pretrained(tmp_path / "ours")
    quant = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert quant["checkpoint_format"] == ("gptq" if config.sym else "gptq_v2")
    ours = our_logits(checkpoint, torch.float16)
    # GPTQModel's torch backend, and transformers (GPTQ through optimum + GPTQModel) as a user calls it
    for reader, script in (("gptqmodel", GPTQMODEL_LOAD), ("transformers", TRANSFORMERS_LOAD)):
        run_peer(script, checkpoint, tmp_path / f"{reader}.pt", cwd=tmp_path)
        # the same fp16 weights and activations: equal up to the matmuls' summation order
        torch.testing.assert_close(ours, torch.load(tmp_path / f"{reader}.pt"), rtol=0, atol=2e-2, msg=reader)


# -- we read GPTQModel's -----------------------------------------------------------------------------

GPTQMODEL_QUANTIZE = """
import sys, torch
from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
source, out, logits_path, sym = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "sym"
ids = torch.randint(2, 12, (8, 16), generator=torch.Generator().manual_seed(0))
model = GPTQModel.load(source, quantize_config=QuantizeConfig(bits=4, group_size=32, sym=sym, desc_act=False),
                       device="cpu", dtype=torch.float32)
model.quantize([{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids], batch_size=4,
               backend=BACKEND.TORCH)
model.save(out)
reloaded = GPTQModel.load(out, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
with torch.no_grad():
    torch.save(reloaded.model(torch.tensor(%r)).logits.float(), logits_path)
""" % (PROBE,)


@needs("gptqmodel")
@pytest.mark.parametrize("grid", ["sym", "asym"])
def test_we_load_a_gptqmodel_checkpoint_with_its_logits(grid, float_dir, tmp_path):
    run_peer(GPTQMODEL_QUANTIZE, float_dir, tmp_path / "gptqmodel", tmp_path / "theirs.pt", grid, cwd=tmp_path)
    quant = json.loads((tmp_path / "gptqmodel" / "config.json").read_text())["quantization_config"]
    assert quant["sym"] is (grid == "sym") and quant["checkpoint_format"] == "gptq"
    torch.testing.assert_close(our_logits(tmp_path / "gptqmodel", torch.float16), torch.load(tmp_path / "theirs.pt"),
                               rtol=0, atol=2e-2)


# -- we read llm-compressor's ------------------------------------------------------------------------

LLMCOMPRESSOR_QUANTIZE = """
import sys, torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
source, out, logits_path, sym = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "sym"
model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
weights = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=32)
oneshot(model=model, recipe=QuantizationModifier(
    config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]))
with torch.no_grad():  # the quantized model as llm-compressor runs it (weights quantize-dequantized)
    torch.save(model(torch.tensor(%r)).logits.float(), logits_path)
model.save_pretrained(out, save_compressed=True)
AutoTokenizer.from_pretrained(source).save_pretrained(out)
""" % (PROBE,)


@pytest.fixture(scope="module")
def llmcompressor_checkpoints(float_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("llmcompressor")
    for grid in ("sym", "asym"):
        run_peer(LLMCOMPRESSOR_QUANTIZE, float_dir, root / grid, root / f"{grid}.pt", grid, cwd=root)
    return root


@needs("llmcompressor")
@pytest.mark.parametrize("grid", ["sym", "asym"])
def test_we_load_an_llmcompressor_checkpoint_with_its_logits(grid, llmcompressor_checkpoints):
    checkpoint = llmcompressor_checkpoints / grid
    quant = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    # fp32 on both sides; llm-compressor computes scale · (q - zero) in another order
    torch.testing.assert_close(our_logits(checkpoint, torch.float32), torch.load(llmcompressor_checkpoints / f"{grid}.pt"),
                               rtol=0, atol=1e-4)


@needs("llmcompressor")
def test_eval_reports_per_language_numbers_for_an_llmcompressor_checkpoint(llmcompressor_checkpoints, float_dir,
                                                                            text_dir, tmp_path):
    from neural_quantization.cli import main

    report = tmp_path / "eval.json"
    code = main(["eval", "--model", str(llmcompressor_checkpoints / "asym"), "--baseline", str(float_dir),
                 "--eval-data", str(text_dir), "--target-languages", "en", "fr", "--eval-seq-len", "32",
                 "--report-json", str(report), "--quiet", "--no-fail-on-gate"])
    assert code == 0
    data = json.loads(report.read_text())
    assert set(data["languages"]) == {"en", "fr"}
    for numbers in data["languages"].values():
        assert numbers["ppl_reference"] > 0 and numbers["ppl_quantized"] > 0 and numbers["kl_divergence"] >= 0


# -- llama.cpp reads our GGUF ------------------------------------------------------------------------

LLAMA_CPP_LOGITS = """
import sys, numpy as np, llama_cpp
low = llama_cpp.llama_cpp
default = low.llama_model_default_params

def params():  # llama.cpp's CPU repack/AMX buffers off: they died with SIGILL on these VMs (benchmarks/gguf_llamacpp.py)
    p = default()
    p.use_extra_bufts = False
    return p

low.llama_model_default_params = params
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False)
tokens = [int(t) for t in sys.argv[2].split(",")]
llm.eval(tokens)
np.save(sys.argv[3], np.asarray(llm.scores[: len(tokens)], dtype=np.float32))
"""


@needs("llama_cpp")
@pytest.mark.parametrize("bits", [4, 8])
def test_llama_cpp_runs_our_gguf_export_with_our_logits(bits, tmp_path):
    """Q4_0 / Q8_0 holding our GPTQ codes, run by llama.cpp itself. llama.cpp multiplies Q4_0/Q8_0
    weights with activations it rounds to 8 bits, so its logits match ours closely, not exactly."""
    import numpy as np
    from conftest import make_tiny_bpe_tokenizer, tiny_model, tiny_tokens

    from neural_quantization.export.gguf import save_checkpoint_with_gguf

    tokenizer = make_tiny_bpe_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), intermediate_size=128, bos_token_id=1, eos_token_id=0)
    ids = tiny_tokens(4, 16, vocab_size=len(tokenizer))
    config = QuantizationConfig(bits=bits, group_size=32, calibration_batch_size=4)
    model, _ = Quantizer(config).quantize_model(model, ids)
    path, report = save_checkpoint_with_gguf(model, tmp_path / "out", tokenizer=tokenizer)
    tokens = tiny_tokens(1, 24, seed=5, vocab_size=len(tokenizer))[0].tolist()
    run_peer(LLAMA_CPP_LOGITS, report.path, ",".join(map(str, tokens)), tmp_path / "llama.npy", cwd=tmp_path)
    theirs = torch.from_numpy(np.load(tmp_path / "llama.npy"))
    with torch.no_grad():
        ours = model.float()(torch.tensor([tokens])).logits[0]
    scale = ours.std()
    assert (theirs - ours).abs().mean() < 0.05 * scale  # observed on SmolLM2: mean 0.024 std
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
