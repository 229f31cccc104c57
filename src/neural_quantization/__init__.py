"""neural-quantization: GPTQ quantization of Hugging Face causal LMs, measured per language.

Public API::

    from neural_quantization import QuantizationConfig, MistralQuantizer, load_quantized
    model, results = MistralQuantizer(QuantizationConfig(bits=4)).quantize_model(model, texts, tokenizer)
    model.save_pretrained("out/")
    model = load_quantized("out/")
    fuse_projections(model)  # optional, for serving: q/k/v and gate/up as one matmul each
    result = generate(model, tokenizer, ["Hello"], max_new_tokens=32)  # fast decoding set up for you

    # or the whole CLI run (checks, quantize, save, evaluate, report) in one call:
    outcome = run_quantization(RunOptions("smollm2-135m", "out/", QuantizationConfig(group_size=64)))
"""

from neural_quantization._version import __version__
from neural_quantization.config import ConfigError, EvalOptions, QualityGates, QuantizationConfig, RunOptions
from neural_quantization.export.checkpoint import load_quantized, save_quantized
from neural_quantization.generation import GenerationResult, generate
from neural_quantization.nn.fused_projections import fuse_projections
from neural_quantization.nn.qlinear import QuantLinear
from neural_quantization.quantizer import (
    GemmaQuantizer,
    LlamaQuantizer,
    MistralQuantizer,
    QuantizationResults,
    Quantizer,
    QwenQuantizer,
)
from neural_quantization.runner import RunOutcome, run_evaluation, run_quantization

__all__ = [
    "__version__",
    "ConfigError",
    "QuantizationConfig",
    "RunOptions",
    "EvalOptions",
    "QualityGates",
    "RunOutcome",
    "run_quantization",
    "run_evaluation",
    "generate",
    "GenerationResult",
    "Quantizer",
    "MistralQuantizer",
    "LlamaQuantizer",
    "GemmaQuantizer",
    "QwenQuantizer",
    "QuantizationResults",
    "QuantLinear",
    "fuse_projections",
    "load_quantized",
    "save_quantized",
]
