"""Shared steps of the quality benchmarks: quantize a fresh copy of the reference and score it.

Each benchmark loads the reference model once, runs it once over the evaluation windows
(``evaluation.reference_languages``), then calls :func:`measure_variant` per variant, so every
variant is compared on exactly the same tokens against the same reference statistics.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from neural_quantization import QuantizationConfig, Quantizer
from neural_quantization.evaluation import compare_languages

REPO = Path(__file__).resolve().parents[1]
#: ``../shared`` beside the checkout; NQ_SHARED points elsewhere (a machine where it is not beside it)
SHARED = Path(os.environ.get("NQ_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data" / "multilingual"
SECOND_DOMAIN = SHARED / "data" / "cv-sentences"  # a second domain, evaluation only


def measure_variant(
    reference: torch.nn.Module,
    tokenizer: Any,
    model_name: str,
    config: QuantizationConfig,
    calibration_ids: torch.Tensor,
    references: dict[str, Any],
) -> dict[str, Any]:
    """Quantize a deep copy of ``reference`` with ``config`` and compare it per language."""
    model, results = Quantizer(config).quantize_model(
        copy.deepcopy(reference), calibration_ids, tokenizer=tokenizer, model_name=model_name
    )
    languages = {lang: r.to_dict() for lang, r in compare_languages(model, references).items()}
    degradations = [r["degradation_pct"] for r in languages.values()]
    return {
        "config": config.to_dict(),
        "quantization_seconds": results.quantization_seconds,
        "compression_ratio": results.final_compression_ratio,
        "memory_reduction_pct": results.memory_reduction,
        "avg_degradation_pct": sum(degradations) / len(degradations),
        "worst_degradation_pct": max(degradations),
        "mean_kl_divergence": sum(r["kl_divergence"] for r in languages.values()) / len(languages),
        "mean_layer_loss": results.mean_layer_loss,
        "calibration_tokens": int(calibration_ids.numel()),
        "languages": languages,
    }


def summary_line(name: str, variant: dict[str, Any]) -> str:
    return (
        f"{name:>22}: avg Δppl {variant['avg_degradation_pct']:+.2f} %  worst {variant['worst_degradation_pct']:+.2f} %"
        f"  KL {variant['mean_kl_divergence']:.4f}  time {variant['quantization_seconds']:.1f} s"
    )


def print_and_save(document: dict[str, Any], output: str | None, omit: tuple[str, ...] = ()) -> None:
    """Print ``document`` without its long ``omit`` entries; write all of it as JSON to ``output`` if given."""
    print(json.dumps({k: v for k, v in document.items() if k not in omit}, indent=1))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(document, indent=2) + "\n")
