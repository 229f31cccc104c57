"""Reports of a run: JSON, Markdown, a degradation chart, terminal tables and a progress bar."""

from neural_quantization.reporting.progress import LayerProgress, layer_progress
from neural_quantization.reporting.report import (
    build_report,
    environment_info,
    plot_degradation,
    render_markdown,
    summary_rows,
    write_json,
    write_markdown,
)
from neural_quantization.reporting.terminal import render_languages, render_summary

__all__ = [
    "LayerProgress",
    "build_report",
    "environment_info",
    "layer_progress",
    "plot_degradation",
    "render_languages",
    "render_markdown",
    "render_summary",
    "summary_rows",
    "write_json",
    "write_markdown",
]
