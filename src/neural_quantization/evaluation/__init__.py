"""Quality of a quantized model per language: perplexity, KL divergence, quality gates.

See :mod:`neural_quantization.evaluation.language_eval` for the window protocol and the math.
"""

from neural_quantization.reporting.gates import QualityGates, all_passed, evaluate_gates, summarize
from neural_quantization.evaluation.language_eval import (
    DEFAULT_TOP_K,
    LanguageResult,
    ReferenceStats,
    compare_languages,
    compare_pass,
    degradation_pct,
    evaluate_languages,
    evaluate_languages_from_loaders,
    make_windows,
    perplexity,
    reference_languages,
    reference_pass,
    tokenizer_adds_bos,
)

__all__ = [
    "DEFAULT_TOP_K",
    "LanguageResult",
    "QualityGates",
    "ReferenceStats",
    "all_passed",
    "compare_languages",
    "compare_pass",
    "degradation_pct",
    "evaluate_gates",
    "evaluate_languages",
    "evaluate_languages_from_loaders",
    "make_windows",
    "perplexity",
    "reference_languages",
    "reference_pass",
    "summarize",
    "tokenizer_adds_bos",
]
