"""The pre-flight estimate: a 70B configuration on the meta device, and a measured run on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from conftest import TINY_CONFIG, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

from neural_quantization import QuantizationConfig, Quantizer
from neural_quantization.export.checkpoint import unique_state_items
from neural_quantization.models import preflight
from neural_quantization.models.preflight import GIB, estimate_run, format_estimate

REPO_ROOT = Path(__file__).resolve().parents[1]

LLAMA_70B = dict(
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
)
# Wide enough that the run's tensors (Hessians of 3072 inputs, 16 × 256 tokens of activations) stand
# well above the interpreter's noise, small enough to quantize on one core in about 15 s.
SMALL = dict(
    vocab_size=512, hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=256,
)
NUM_SAMPLES, SEQ_LEN = 16, 256


def meta_model(**config):
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.bfloat16)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def llama_70b():
    return meta_model(**LLAMA_70B)


def test_70b_estimate_on_meta_device(llama_70b):
    """A 70B config never materialized: peak on the GPTQ solve of down_proj, checkpoint ~37 GiB."""
    config = QuantizationConfig(bits=4, group_size=128, num_samples=128, seq_len=2048)
    before = rss_bytes() if Path("/proc/self/status").exists() else 0
    estimate = estimate_run(llama_70b, config, 128, 2048, torch.device("cuda"))
    if before:
        assert rss_bytes() - before < 64 * 2**20  # nothing of the model's 131 GiB was allocated
    assert all(p.device.type == "meta" for p in llama_70b.parameters())

    assert 10 * GIB < estimate.device_peak_bytes < 80 * GIB
    assert "down_proj" in estimate.peak_phase  # K = 28672: its fp32 Hessian alone is 3.1 GiB
    assert estimate.breakdown["device.hessians"] == 4 * 28672**2
    assert estimate.breakdown["device.hidden_states"] == 128 * 2048 * 8192 * 2  # bf16 activations
    # W4 g128: 80 layers x 0.86 B weights at ~0.52 bytes each, plus bf16 embeddings and lm_head
    assert 35 * GIB < estimate.disk_bytes < 40 * GIB
    assert estimate.breakdown["disk.other_weights"] == 2 * 128256 * 8192 * 2 + 8192 * 2  # + final norm
    # without streaming the host holds every float weight once (131 GiB)
    assert estimate.host_peak_bytes > 130 * GIB
    assert estimate.seconds > 60  # hours on CPU, minutes on an H100; never instant
    assert estimate.to_dict()["breakdown"] == estimate.breakdown


def test_options_move_memory_where_they_should(llama_70b):
    config = QuantizationConfig(num_samples=128, seq_len=2048)
    cuda = torch.device("cuda")
    plain = estimate_run(llama_70b, config, 128, 2048, cuda)
    streamed = estimate_run(llama_70b, config, 128, 2048, cuda, stream_weights=True)
    offloaded = estimate_run(llama_70b, config, 128, 2048, cuda, activations_on_host=True)
    assert streamed.device_peak_bytes == plain.device_peak_bytes
    assert streamed.host_peak_bytes < 12 * GIB  # runtime + embeddings/lm_head, or one layer + its packing
    # the activations (128 x 2048 x 8192 bf16 = 4 GiB, twice: the quantized and, for GPTAQ, the
    # float model's stream) leave the device; one batch of each stays
    assert config.gptaq
    activations = 2 * 128 * 2048 * 8192 * 2
    saved = plain.device_peak_bytes - offloaded.device_peak_bytes
    assert activations - 2 * 8 * 2048 * 8192 * 2 <= saved <= activations
    assert offloaded.host_peak_bytes >= plain.host_peak_bytes
    fewer = estimate_run(llama_70b, config.replace(num_samples=32), 32, 2048, cuda)
    assert fewer.device_peak_bytes < plain.device_peak_bytes
    assert fewer.seconds < plain.seconds


def test_format_says_what_to_change_when_the_host_is_too_small(llama_70b, monkeypatch):
    monkeypatch.setattr(preflight, "host_memory", lambda: (64 * GIB, 60 * GIB))
    monkeypatch.setattr(preflight, "_device_memory", lambda model, device: (None, None))  # as without a GPU
    config = QuantizationConfig(num_samples=128, seq_len=2048)
    estimate = estimate_run(llama_70b, config, 128, 2048, torch.device("cuda"))
    assert not estimate.fits
    text = format_estimate(estimate)
    assert "fits           NO" in text and "--stream-weights" in text
    assert any(line.startswith("use --stream-weights") for line in estimate.advice)

    streamed = estimate_run(llama_70b, config, 128, 2048, torch.device("cuda"), stream_weights=True)
    assert streamed.fits  # the GPU is not visible here: its fit is not checked, and says so
    assert any("device fit is not checked" in note for note in streamed.notes)
    assert "fits           yes" in format_estimate(streamed)


@pytest.mark.parametrize("lm_head", [False, True])
@pytest.mark.parametrize("arch", ["llama-tied", "gemma3", "qwen2", "phi3"])  # + q/k/v biases, fused projections
def test_disk_estimate_is_the_quantized_models_bytes(arch, lm_head):
    """Checkpoint size to the byte: packed linears (+ biases), norms, embeddings, (un)tied lm_head."""
    model = tiny_model("llama", tie_word_embeddings=True) if arch == "llama-tied" else tiny_model(arch)
    config = QuantizationConfig(bits=4, group_size=16, num_samples=4, seq_len=16, device="cpu", quantize_lm_head=lm_head)
    estimate = estimate_run(model, config, 4, 16, torch.device("cpu"))
    Quantizer(config).quantize_model(model, torch.randint(2, TINY_CONFIG["vocab_size"], (4, 16)))
    assert estimate.disk_bytes == sum(t.numel() * t.element_size() for _, t in unique_state_items(model))


MEASURE = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config
    from neural_quantization import QuantizationConfig, Quantizer
    from neural_quantization.export.checkpoint import unique_state_items

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    model_config, config, num_samples, seq_len = json.loads(sys.argv[1])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**model_config), dtype=torch.float32).eval()
    ids = torch.randint(0, model_config["vocab_size"], (num_samples, seq_len), generator=torch.Generator().manual_seed(1))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS:")
    Quantizer(QuantizationConfig(**config)).quantize_model(model, ids)
    added = status("VmHWM:") - before
    stored = sum(t.numel() * t.element_size() for _, t in unique_state_items(model))
    print(json.dumps({"added": added, "stored": stored}))
    """
)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc to reset VmHWM")
def test_estimate_within_20_percent_of_measured_cpu_run():
    """Quantize a small fp32 Llama on CPU in a fresh process and compare its peak memory increase.

    On CPU the model is already in memory before the run, so the comparison is between what the
    run adds (VmHWM during ``quantize_model`` minus VmRSS before it) and ``working_bytes`` (the
    device peak without the float weights it includes). glibc is told to hand freed blocks back at
    once (``MALLOC_MMAP_THRESHOLD_``): otherwise its heap keeps freed memory, which the estimate
    of live tensors does not model.
    """
    config = dict(bits=4, group_size=128, num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, device="cpu")
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps([SMALL, config, NUM_SAMPLES, SEQ_LEN])],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL), dtype=torch.float32)
    estimate = estimate_run(model, QuantizationConfig(**config), NUM_SAMPLES, SEQ_LEN, torch.device("cpu"))

    assert estimate.disk_bytes == measured["stored"]  # the checkpoint's tensors, to the byte
    error = estimate.working_bytes / measured["added"] - 1
    assert abs(error) < 0.20, (
        f"estimated {estimate.working_bytes / 2**20:.1f} MiB, measured {measured['added'] / 2**20:.1f} MiB "
        f"({error:+.1%}); peak phase {estimate.peak_phase}: {estimate.breakdown}"
    )
