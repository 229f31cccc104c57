"""neural-quantization: GPTQ quantization of Hugging Face causal LMs, measured per language.

Public API::

    from neural_quantization import QuantizationConfig, MistralQuantizer, load_quantized
    model, results = MistralQuantizer(QuantizationConfig(bits=4)).quantize_model(model, texts, tokenizer)
    model.save_pretrained("out/")
    model = load_quantized("out/")
    fuse_projections(model)  # optional, for serving: q/k/v and gate/up as one matmul each
"""

from neural_quantization._version import __version__
from neural_quantization.config import ConfigError, QuantizationConfig
from neural_quantization.export.checkpoint import load_quantized, save_quantized
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

__all__ = [
    "__version__",
    "ConfigError",
    "QuantizationConfig",
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
