"""One report per run: a JSON document, a Markdown rendering and a chart of degradation per language.

Every number in the report is measured (or derived from measured numbers); what was not measured is
``null`` in JSON and "not measured" when rendered. The document's main fields::

    model                    str    the model that was quantized (hub id, path or alias)
    config                   dict   QuantizationConfig.to_dict()
    compression_ratio        float  fp16 bytes of the quantized linears / bytes of their packed tensors
                                    (qweight + qzeros + scales + g_idx); ideal 16/bits before scales
    model_compression_ratio  float  fp16 bytes of the whole model / bytes of the quantized model
    memory_reduction_pct     float  (1 - quantized / reference bytes) · 100 for the whole model
    size_bytes               dict   {"reference": int, "quantized": int, ...}
    quantization_seconds     float  wall time of calibration + layer-by-layer quantization
    calibration              dict   {"source": str, "languages": [str], "tokens": int, ...}
    evaluation               dict   {"ran", "seq_len", "kl_top_k", "kl_is_topk_approximation", "kl_note", ...}
    languages                dict   lang -> {"ppl_reference", "ppl_quantized", "degradation_pct",
                                             "kl_divergence", "tokens", ...}
    avg_degradation_pct      float  mean over languages of degradation_pct
    worst_language           str
    languages_under_target   int    languages with degradation_pct <= the per-language gate limit
    mean_kl_divergence       float  mean over languages of kl_divergence (nats)
    gates                    dict   see reporting.gates.evaluate_gates; "gates_passed": bool | None
    layers                   list   per quantized linear: name, shape, method, loss, damp_percent, seconds
    warnings                 list   e.g. group sizes that some serving kernels cannot run
    environment              dict   python / torch / transformers / neural-quantization versions,
                                    device name, date (UTC)

Non-finite floats (an infinite perplexity) are written as ``null`` so the file stays valid JSON.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neural_quantization.reporting.gates import QualityGates, all_passed, evaluate_gates, summarize

SCHEMA_VERSION = 1
NOT_MEASURED = "not measured"


# --------------------------------------------------------------------------------------------------
# Building the document
# --------------------------------------------------------------------------------------------------


def _as_dict(obj: Any) -> dict[str, Any]:
    """A plain dict from a Mapping, an object with ``to_dict()`` or a dataclass (None -> {})."""
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"expected a dict, a dataclass or an object with to_dict(); got {type(obj).__name__}.")


def _first(d: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    return None


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment_info(device: str | None = None) -> dict[str, Any]:
    """Versions, device name and date, so a reader knows where the numbers came from.

    ``device`` is the device the run used ("cuda", "cuda:1", "cpu"); None means CUDA device 0 if
    one is visible, else the CPU.
    """
    import torch

    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        index = torch.device(device).index if device and ":" in str(device) else 0
        device_name = torch.cuda.get_device_name(index or 0)
    else:
        device_name = f"CPU: {_cpu_name()} ({os.cpu_count()} cores)"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "neural_quantization": _package_version("neural-quantization"),
        "cuda": torch.version.cuda if use_cuda else None,
        "device": str(device) if device is not None else ("cuda" if use_cuda else "cpu"),
        "device_name": device_name,
    }


def _language_dicts(language_results: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    required = ("ppl_reference", "ppl_quantized", "degradation_pct", "kl_divergence", "tokens")
    out: dict[str, dict[str, Any]] = {}
    for lang, result in (language_results or {}).items():
        d = _as_dict(result)
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(
                f"language {lang!r} result lacks {missing}; pass LanguageResult objects from evaluate_languages."
            )
        d["tokens"] = int(d["tokens"])
        for key in ("ppl_reference", "ppl_quantized", "degradation_pct", "kl_divergence"):
            d[key] = _float_or_none(d[key])
        out[str(lang)] = d
    return out


def build_report(
    *,
    model: str,
    config: Any = None,
    quantization: Any = None,
    calibration: Mapping[str, Any] | None = None,
    language_results: Mapping[str, Any] | None = None,
    gates: QualityGates | None = None,
    evaluation: Mapping[str, Any] | None = None,
    device: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report document (a JSON-ready dict; see the module docstring for the fields).

    Args:
        model: the model's name (hub id, path or alias).
        config: ``QuantizationConfig`` or its dict.
        quantization: the ``results`` of ``quantize_model`` (``QuantizationResults`` or a dict). Keys
            read: ``final_compression_ratio`` (or ``compression_ratio``), ``model_compression_ratio``,
            ``memory_reduction`` (or ``memory_reduction_pct``), ``size_bytes``, ``quantization_seconds``,
            ``calibration``, ``layers``, ``warnings``, ``device``. Missing ones are reported as not
            measured; whole-model ratio and memory reduction are derived from ``size_bytes`` if absent.
            None for an evaluation-only run.
        calibration: ``{"source", "languages", "tokens", ...}``; overrides ``quantization["calibration"]``.
        language_results: ``{lang: LanguageResult}`` (or their dicts); None or {} when no evaluation ran.
        gates: the quality gates to check (default ``QualityGates()``).
        evaluation: extra facts about the evaluation (e.g. ``{"data": "./eval", "reference_model": ...}``).
        device: the device the run used, for the environment block.
        extra: more top-level fields to add (they may not replace the standard ones).
    """
    if not isinstance(model, str) or not model:
        raise ValueError("model must be the model's name or path as a non-empty string.")
    q = _as_dict(quantization)
    cfg = _as_dict(config) if config is not None else _as_dict(q.get("config"))
    gates = gates if gates is not None else QualityGates()

    size_bytes = {k: int(v) for k, v in (q.get("size_bytes") or {}).items() if v is not None}
    ref_bytes, quant_bytes = size_bytes.get("reference"), size_bytes.get("quantized")
    model_ratio = _float_or_none(q.get("model_compression_ratio"))
    if model_ratio is None and ref_bytes and quant_bytes:
        model_ratio = ref_bytes / quant_bytes
    memory_pct = _float_or_none(_first(q, "memory_reduction_pct", "memory_reduction"))
    if memory_pct is None and ref_bytes and quant_bytes:
        memory_pct = (1 - quant_bytes / ref_bytes) * 100

    calib = dict(calibration if calibration is not None else (q.get("calibration") or {}))
    calib.setdefault("source", None)
    calib["languages"] = list(calib.get("languages") or [])
    calib["tokens"] = None if calib.get("tokens") is None else int(calib["tokens"])

    languages = _language_dicts(language_results)
    avg, under = summarize(languages, gates.max_language_degradation)
    gate_results = evaluate_gates(languages, gates)
    kls = [d["kl_divergence"] for d in languages.values() if d["kl_divergence"] is not None]
    approx = any(d.get("kl_is_topk_approximation") for d in languages.values())
    top_ks = sorted({d.get("kl_top_k") for d in languages.values() if d.get("kl_top_k") is not None})
    seq_lens = sorted({d.get("seq_len") for d in languages.values() if d.get("seq_len") is not None})
    eval_block: dict[str, Any] = {
        "ran": bool(languages),
        "seq_len": seq_lens[0] if len(seq_lens) == 1 else (seq_lens or None),
        "kl_top_k": top_ks[0] if len(top_ks) == 1 else (top_ks or None),
        "kl_is_topk_approximation": approx,
        "kl_note": (
            "KL(P_ref || P_q) per predicted token, averaged, in nats. "
            + (
                "Computed from the reference's top-k tokens plus one bucket for the rest of its mass: "
                "a lower bound of the full KL (log-sum inequality)."
                if approx
                else "Exact, over the full vocabulary."
            )
        )
        if languages
        else None,
        "degradation_definition": "(ppl_quantized / ppl_reference - 1) * 100",
    }
    eval_block.update(evaluation or {})

    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "config": cfg,
        "compression_ratio": _float_or_none(_first(q, "compression_ratio", "final_compression_ratio")),
        "model_compression_ratio": model_ratio,
        "memory_reduction_pct": memory_pct,
        "size_bytes": {"reference": ref_bytes, "quantized": quant_bytes, **size_bytes},
        "quantization_seconds": _float_or_none(q.get("quantization_seconds")),
        "calibration": calib,
        "evaluation": eval_block,
        "languages": languages,
        "avg_degradation_pct": avg,
        "worst_language": gate_results["max_language_degradation"]["worst_language"],
        "languages_under_target": under,
        "languages_evaluated": len(languages),
        "mean_kl_divergence": sum(kls) / len(kls) if kls else None,
        "gates": gate_results,
        "gates_passed": all_passed(gate_results) if languages else None,
        "layers": [_as_dict(layer) for layer in (_first(q, "layers", "per_layer") or [])],
        "warnings": list(q.get("warnings") or []),
        "environment": environment_info(device or q.get("device")),
    }
    for key, value in (extra or {}).items():
        if key in report:
            raise ValueError(
                f"extra field {key!r} would replace a standard report field; give it another name."
            )
        report[key] = value
    return report


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return _jsonable(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return str(value)


def _atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write the report as indented JSON, atomically (temporary file in the same folder, then rename)."""
    text = json.dumps(_jsonable(report), indent=2, ensure_ascii=False, allow_nan=False)
    return _atomic_write_text(path, text + "\n")


# --------------------------------------------------------------------------------------------------
# Summary rows (shared by the terminal table and the Markdown report)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryRow:
    """One line of the results table. ``achieved`` is always a measured value or "not measured"."""

    metric: str
    achieved: str
    target: str
    status: str  # "pass", "FAIL" or "—"


def _pct(value: float | None, signed: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_MEASURED
    return f"{value:+.2f} %" if signed else f"{value:.1f} %"


def _status(passed: bool | None) -> str:
    return "—" if passed is None else ("pass" if passed else "FAIL")


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return NOT_MEASURED
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {sec:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"


def summary_rows(report: Mapping[str, Any]) -> list[SummaryRow]:
    """The README's results table, Metric / Achieved / Target / Status, from measured values only.

    A row whose value was not measured says "not measured" with status "—". Targets are the gate
    limits of the run and, for compression, the ideal 16/bits of the quantized linears (what fp16
    weights would shrink to with no scales or zeros stored: an upper bound, hence no status).
    """
    gates = report.get("gates") or {}
    avg_gate = gates.get("max_degradation") or {}
    lang_gate = gates.get("max_language_degradation") or {}
    languages = report.get("languages") or {}
    avg_limit, lang_limit = avg_gate.get("limit"), lang_gate.get("limit")
    rows = [
        SummaryRow(
            "Average perplexity increase",
            _pct(report.get("avg_degradation_pct")),
            f"≤ {avg_limit:.1f} %" if avg_limit is not None else "—",
            _status(avg_gate.get("passed")) if languages else "—",
        ),
        SummaryRow(
            f"Worst language ({report['worst_language']})"
            if report.get("worst_language")
            else "Worst language",
            _pct(lang_gate.get("value")) if languages else NOT_MEASURED,
            f"≤ {lang_limit:.1f} %" if lang_limit is not None else "—",
            _status(lang_gate.get("passed")) if languages else "—",
        ),
        SummaryRow(
            "Languages under target",
            f"{report.get('languages_under_target', 0)} / {len(languages)}" if languages else NOT_MEASURED,
            f"{len(languages)} / {len(languages)}" if languages else "all evaluated",
            _status(report.get("languages_under_target") == len(languages)) if languages else "—",
        ),
    ]
    kl = report.get("mean_kl_divergence")
    approx = (report.get("evaluation") or {}).get("kl_is_topk_approximation")
    rows.append(
        SummaryRow(
            "Mean KL divergence (nats)" + (", top-k lower bound" if approx else ""),
            NOT_MEASURED if kl is None else f"{kl:.3g}",
            "—",
            "—",
        )
    )
    bits = (report.get("config") or {}).get("bits")
    ratio = report.get("compression_ratio")
    rows.append(
        SummaryRow(
            "Compression, quantized linears (fp16 → packed)",
            NOT_MEASURED if ratio is None else f"{ratio:.2f}×",
            f"{16 / bits:.2f}× ideal (16/{bits} bits, before scales)" if bits else "—",
            "—",
        )
    )
    model_ratio = report.get("model_compression_ratio")
    rows.append(
        SummaryRow(
            "Compression, whole model (fp16 → quantized)",
            NOT_MEASURED if model_ratio is None else f"{model_ratio:.2f}×",
            "—",
            "—",
        )
    )
    rows.append(
        SummaryRow(
            "Memory reduction, whole model", _pct(report.get("memory_reduction_pct"), signed=False), "—", "—"
        )
    )
    rows.append(SummaryRow("Quantization time", format_seconds(report.get("quantization_seconds")), "—", "—"))
    return rows


def language_rows(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """Per-language rows as display strings: ppl ref, ppl quant, Δ%, KL, top-1, tokens, status."""
    limit = ((report.get("gates") or {}).get("max_language_degradation") or {}).get("limit")
    rows = []
    for lang, d in (report.get("languages") or {}).items():
        deg = d.get("degradation_pct")
        passed = None if deg is None or limit is None else deg <= limit

        def num(x: Any, fmt: str) -> str:
            return NOT_MEASURED if x is None else format(x, fmt)

        rows.append(
            {
                "language": lang,
                "ppl_reference": num(d.get("ppl_reference"), ".3f"),
                "ppl_quantized": num(d.get("ppl_quantized"), ".3f"),
                "degradation": _pct(deg),
                "kl": num(d.get("kl_divergence"), ".3g"),
                "top1": NOT_MEASURED
                if d.get("top1_agreement") is None
                else f"{100 * d['top1_agreement']:.1f} %",
                "tokens": num(d.get("tokens"), ","),
                "status": _status(passed),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _md_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None
) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: Mapping[str, Any], chart: str | None = None) -> str:
    """The report as Markdown: summary, per-language table, gates, calibration, layers, environment.

    ``chart``: a path (relative to the Markdown file) of the degradation chart to embed.
    """
    env = report.get("environment") or {}
    cfg = report.get("config") or {}
    out = [f"# Quantization report: {report.get('model')}", ""]
    setting = ", ".join(
        f"{k}={cfg[k]}" for k in ("method", "bits", "group_size", "sym", "desc_act") if k in cfg
    )
    if setting:
        out += [f"Setting: {setting}.", ""]
    out += [f"Measured on {env.get('device_name', 'unknown device')}, {env.get('date', '')}.", ""]

    out += ["## Summary", ""]
    out.append(
        _md_table(
            ["Metric", "Achieved", "Target", "Status"],
            [(r.metric, r.achieved, r.target, r.status) for r in summary_rows(report)],
        )
    )
    out.append("")

    out += ["## Quality per language", ""]
    rows = language_rows(report)
    if rows:
        ev = report.get("evaluation") or {}
        out.append(
            _md_table(
                [
                    "Language",
                    "PPL reference",
                    "PPL quantized",
                    "Δ PPL",
                    "KL (nats)",
                    "Top-1 agreement",
                    "Tokens",
                    "Status",
                ],
                [
                    (
                        r["language"],
                        r["ppl_reference"],
                        r["ppl_quantized"],
                        r["degradation"],
                        r["kl"],
                        r["top1"],
                        r["tokens"],
                        r["status"],
                    )
                    for r in rows
                ],
                ["l", "r", "r", "r", "r", "r", "r", "l"],
            )
        )
        out.append("")
        if ev.get("seq_len") is not None:
            out.append(
                f"Windows of {ev['seq_len']} tokens, stride equal to the length; Δ PPL = (ppl_q / ppl_ref − 1) × 100."
            )
        if ev.get("kl_note"):
            out.append(ev["kl_note"])
        out.append("")
        if chart:
            out += [f"![Perplexity increase per language]({chart})", ""]
    else:
        out += ["No evaluation ran (pass `--eval-data DIR` to measure perplexity and KL per language).", ""]

    gates = report.get("gates") or {}
    if gates:
        out += ["## Quality gates", ""]
        gate_rows = []
        for name, g in gates.items():
            value = g.get("value")
            detail = ""
            if g.get("failed_languages"):
                detail = "failed: " + ", ".join(g["failed_languages"])
            elif g.get("worst_language"):
                detail = f"worst: {g['worst_language']}"
            gate_rows.append((name, f"{g.get('limit')} %", _pct(value), _status(g.get("passed")), detail))
        out.append(_md_table(["Gate", "Limit", "Value", "Status", "Detail"], gate_rows))
        out.append("")

    calib = report.get("calibration") or {}
    out += ["## Calibration", ""]
    tokens = calib.get("tokens")
    out.append(f"- Source: {calib.get('source') or NOT_MEASURED}")
    out.append(f"- Languages: {', '.join(calib.get('languages') or []) or '—'}")
    out.append(f"- Tokens: {f'{tokens:,}' if tokens is not None else NOT_MEASURED}")
    if calib.get("self_generated"):
        out.append(
            "- Self-generated by the reference model from short prompts (no calibration data was given)."
        )
    out.append("")

    if cfg:
        out += ["## Configuration", ""]
        out.append(_md_table(["Option", "Value"], sorted((k, v) for k, v in cfg.items())))
        out.append("")

    layers = report.get("layers") or []
    if layers:
        out += ["## Per-layer results", ""]
        out.append(
            _md_table(
                ["Layer", "Shape (out × in)", "Method", "Loss", "Damp %", "Seconds", "Note"],
                [
                    (
                        layer.get("name", ""),
                        " × ".join(str(s) for s in layer.get("shape") or []),
                        layer.get("method", ""),
                        "—" if layer.get("loss") is None else f"{layer['loss']:.4g}",
                        "—" if layer.get("damp_percent") is None else f"{100 * layer['damp_percent']:.2f}",
                        "—" if layer.get("seconds") is None else f"{layer['seconds']:.2f}",
                        layer.get("note", ""),
                    )
                    for layer in layers
                ],
                ["l", "l", "l", "r", "r", "r", "l"],
            )
        )
        out += ["", "Loss: tr((W − Q) H (W − Q)ᵀ), the Hessian-weighted error GPTQ minimises.", ""]

    warnings = report.get("warnings") or []
    if warnings:
        out += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]

    out += ["## Environment", ""]
    out += [f"- {k}: {v}" for k, v in env.items()]
    out.append("")
    return "\n".join(out)


def write_markdown(report: Mapping[str, Any], path: str | Path, chart: str | Path | None = None) -> Path:
    """Write :func:`render_markdown` to ``path`` atomically; ``chart`` is embedded relative to it."""
    path = Path(path)
    rel = None
    if chart is not None:
        chart = Path(chart)
        try:
            rel = os.path.relpath(chart.resolve(), path.resolve().parent)
        except ValueError:  # another drive on Windows
            rel = str(chart)
    return _atomic_write_text(path, render_markdown(report, chart=rel))


# --------------------------------------------------------------------------------------------------
# Chart
# --------------------------------------------------------------------------------------------------


def plot_degradation(report: Mapping[str, Any], path_png: str | Path) -> Path:
    """Bar chart of perplexity increase (%) per language, with the per-language limit as a line.

    Bars over the limit are red, the others green; the average is a dotted line. Uses matplotlib's
    Agg canvas directly (no pyplot, no global backend change), so it works headless.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is an optional extra
        raise ImportError("the chart needs matplotlib: pip install matplotlib.") from err

    languages = report.get("languages") or {}
    if not languages:
        raise ValueError("the report has no per-language results to plot; evaluate first (--eval-data DIR).")
    langs = list(languages)
    values = [languages[lang].get("degradation_pct") for lang in langs]
    finite = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
    gates = report.get("gates") or {}
    limit = (gates.get("max_language_degradation") or {}).get("limit")
    avg = report.get("avg_degradation_pct")

    fig = Figure(figsize=(max(6.0, 0.6 * len(langs) + 2.5), 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = [
        "#c0392b" if (limit is not None and (v is None or not v <= limit)) else "#2e8b57" for v in values
    ]
    bars = ax.bar(langs, finite, color=colors, edgecolor="black", linewidth=0.5, zorder=2)
    for bar, v in zip(bars, values):
        label = "n/a" if v is None or not math.isfinite(v) else f"{v:+.2f}"
        y = bar.get_height()
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, y),
            xytext=(0, 3 if y >= 0 else -10),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
        )
    if limit is not None:
        ax.axhline(
            limit, color="#c0392b", linestyle="--", linewidth=1.2, label=f"per-language limit {limit:.1f} %"
        )
    if avg is not None and math.isfinite(avg):
        avg_limit = (gates.get("max_degradation") or {}).get("limit")
        avg_label = f"average {avg:+.2f} %" + (f" (limit {avg_limit:.1f} %)" if avg_limit is not None else "")
        ax.axhline(avg, color="#34495e", linestyle=":", linewidth=1.2, label=avg_label)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("Perplexity increase vs reference (%)")
    ax.set_xlabel("Language")
    cfg = report.get("config") or {}
    setting = " ".join(
        s
        for s in (
            f"W{cfg['bits']}" if cfg.get("bits") else "",
            (f"g{cfg['group_size']}" if cfg.get("group_size", -1) != -1 else "per-channel")
            if "group_size" in cfg
            else "",
            str(cfg.get("method", "")).upper(),
        )
        if s
    )
    ax.set_title(
        f"{report.get('model')}{' ' + setting if setting else ''}\nperplexity increase per language",
        fontsize=11,
    )
    ax.grid(axis="y", alpha=0.3, zorder=0)
    top = max(finite + [limit or 0.0, 0.0])
    bottom = min(finite + [0.0])
    span = (top - bottom) or 1.0
    ax.set_ylim(bottom - 0.08 * span if bottom < 0 else 0, top + 0.15 * span)
    if limit is not None or avg is not None:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()

    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


__all__ = [
    "NOT_MEASURED",
    "SummaryRow",
    "build_report",
    "environment_info",
    "format_seconds",
    "language_rows",
    "plot_degradation",
    "render_markdown",
    "summary_rows",
    "write_json",
    "write_markdown",
]
