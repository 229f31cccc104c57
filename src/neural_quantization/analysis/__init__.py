"""Analysis: where quantization hurts (weight and activation statistics, per-layer sensitivity)."""

from neural_quantization.analysis.analyze import AnalysisError, analyze, write_analysis

__all__ = ["AnalysisError", "analyze", "write_analysis"]
