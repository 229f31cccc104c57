"""Generation: :func:`generate` runs a quantized or float model with fast decoding set up for it."""

from neural_quantization.generation.loop import GenerationError, GenerationResult, generate

__all__ = ["GenerationError", "GenerationResult", "generate"]
