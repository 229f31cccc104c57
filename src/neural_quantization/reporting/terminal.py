"""Rich tables for the end of a run: the results summary and the per-language breakdown.

Both read a report document from :func:`neural_quantization.reporting.report.build_report`, so the
terminal, the JSON and the Markdown always show the same numbers. The "Achieved" column only ever
holds a measured value or "not measured"; targets live in their own column.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from neural_quantization.reporting.report import NOT_MEASURED, language_rows, summary_rows

_STATUS_STYLE = {"pass": "bold green", "FAIL": "bold red", "—": "dim"}


def _styled(status: str) -> str:
    style = _STATUS_STYLE.get(status)
    return f"[{style}]{status}[/]" if style else status


def _achieved(text: str) -> str:
    return f"[dim italic]{text}[/]" if text == NOT_MEASURED else text


def summary_table(report: Mapping[str, Any]) -> Table:
    """The results table (Metric / Achieved / Target / Status) as a rich Table."""
    env = report.get("environment") or {}
    table = Table(
        title=f"Results: {report.get('model')}",
        caption=f"measured on {env.get('device_name', 'unknown device')}, {env.get('date', '')}",
        title_justify="left",
    )
    table.add_column("Metric")
    table.add_column("Achieved", justify="right")
    table.add_column("Target", justify="right")
    table.add_column("Status", justify="center")
    for row in summary_rows(report):
        table.add_row(row.metric, _achieved(row.achieved), row.target, _styled(row.status))
    return table


def languages_table(report: Mapping[str, Any]) -> Table | None:
    """Per-language table (ppl ref, ppl quant, Δ%, KL, top-1, tokens, status); None with no results."""
    rows = language_rows(report)
    if not rows:
        return None
    ev = report.get("evaluation") or {}
    kl_header = "KL (nats)" + (f", top-{ev['kl_top_k']}" if ev.get("kl_is_topk_approximation") else "")
    table = Table(
        title="Quality per language",
        title_justify="left",
        caption="Δ PPL = (ppl_q / ppl_ref − 1) × 100"
        + (
            "; KL over the reference's top-k tokens + one tail bucket is a lower bound"
            if ev.get("kl_is_topk_approximation")
            else ""
        ),
    )
    for name, justify in (
        ("Language", "left"),
        ("PPL ref", "right"),
        ("PPL quant", "right"),
        ("Δ PPL", "right"),
        (kl_header, "right"),
        ("Top-1", "right"),
        ("Tokens", "right"),
        ("Status", "center"),
    ):
        table.add_column(name, justify=justify)
    for r in rows:
        table.add_row(
            r["language"],
            r["ppl_reference"],
            r["ppl_quantized"],
            _achieved(r["degradation"]),
            r["kl"],
            r["top1"],
            r["tokens"],
            _styled(r["status"]),
        )
    return table


def render_summary(report: Mapping[str, Any], console: Console | None = None) -> Table:
    """Print the results table on ``console`` (default: a new stdout console) and return it."""
    console = console or Console()
    table = summary_table(report)
    console.print(table)
    return table


def render_languages(report: Mapping[str, Any], console: Console | None = None) -> Table | None:
    """Print the per-language table, or a one-line note when no evaluation ran; returns the table."""
    console = console or Console()
    table = languages_table(report)
    if table is None:
        console.print("[dim]No per-language evaluation ran (pass --eval-data DIR to measure it).[/]")
    else:
        console.print(table)
    return table
