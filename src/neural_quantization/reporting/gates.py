"""Quality gates: fail a release when quantization costs too much perplexity.

Two gates, both on the degradation ``d_l = (ppl_q / ppl_ref - 1) · 100`` % of each language l:

- ``max_degradation``: the average over languages, ``mean_l d_l <= limit`` (default 2.0 %).
- ``max_language_degradation``: every single language, ``max_l d_l <= limit`` (default 3.0 %).

A gate passes when its value is at most its limit; a NaN value (e.g. an infinite perplexity)
fails. :func:`evaluate_gates` returns a JSON-ready dict; the CLI exits with code 3 when
:func:`all_passed` is False (unless ``--no-fail-on-gate``).

Example::

    results = {"en": <d=1.0>, "hi": <d=4.5>}
    evaluate_gates(results, QualityGates())
    # {"max_degradation": {"limit": 2.0, "value": 2.75, "passed": False},
    #  "max_language_degradation": {"limit": 3.0, "value": 4.5, "passed": False,
    #                               "worst_language": "hi", "failed_languages": ["hi"]}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from neural_quantization.config import QualityGates

__all__ = ["QualityGates", "all_passed", "evaluate_gates", "summarize"]


def _degradation(result: Any) -> float:
    """The degradation of a LanguageResult or of its dict form."""
    value = result["degradation_pct"] if isinstance(result, Mapping) else result.degradation_pct
    return float("nan") if value is None else float(value)


def summarize(results: Mapping[str, Any], target: float) -> tuple[float | None, int]:
    """(average degradation % over languages, number of languages with degradation <= target).

    ``results`` maps language -> LanguageResult (or its dict). With no languages the average is
    None (nothing was measured) and the count 0.
    """
    if not results:
        return None, 0
    values = [_degradation(r) for r in results.values()]
    return sum(values) / len(values), sum(1 for v in values if v <= target)


def evaluate_gates(results: Mapping[str, Any], gates: QualityGates) -> dict[str, dict[str, Any]]:
    """Check ``results`` (language -> LanguageResult or dict) against ``gates``.

    Returns::

        {"max_degradation": {"limit", "value", "passed"},
         "max_language_degradation": {"limit", "value", "passed", "worst_language", "failed_languages"}}

    ``failed_languages`` lists the languages over the per-language limit, worst first. With no
    results, every ``value`` and ``passed`` is None and ``reason`` says nothing was evaluated.
    """
    if not results:
        reason = "no evaluation ran (pass --eval-data to measure quality)"
        return {
            "max_degradation": {
                "limit": gates.max_degradation,
                "value": None,
                "passed": None,
                "reason": reason,
            },
            "max_language_degradation": {
                "limit": gates.max_language_degradation,
                "value": None,
                "passed": None,
                "worst_language": None,
                "failed_languages": [],
                "reason": reason,
            },
        }
    per_lang = {lang: _degradation(r) for lang, r in results.items()}
    avg, _ = summarize(results, gates.max_language_degradation)

    # NaN sorts as the worst: a language whose perplexity could not be measured must not hide.
    def badness(lang: str) -> tuple[bool, float]:
        value = per_lang[lang]
        return (math.isnan(value), 0.0 if math.isnan(value) else value)

    order = sorted(per_lang, key=badness, reverse=True)  # worst first, NaN before any number
    worst = order[0]
    failed = [lang for lang in order if not per_lang[lang] <= gates.max_language_degradation]
    return {
        "max_degradation": {
            "limit": gates.max_degradation,
            "value": avg,
            "passed": bool(avg <= gates.max_degradation),
        },
        "max_language_degradation": {
            "limit": gates.max_language_degradation,
            "value": per_lang[worst],
            "passed": not failed,
            "worst_language": worst,
            "failed_languages": failed,
        },
    }


def all_passed(gates_dict: Mapping[str, Mapping[str, Any]], require_evaluated: bool = False) -> bool:
    """False when any gate failed.

    A gate that was not evaluated (``passed`` is None, no evaluation ran) does not fail the run
    unless ``require_evaluated`` is True.
    """
    for gate in gates_dict.values():
        passed = gate.get("passed")
        if passed is False or (passed is None and require_evaluated):
            return False
    return True
