"""The deployment report in the terminal (rich) and as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from neural_quantization.deploy.memory import MemoryReport
from neural_quantization.formats.units import format_bytes


def render_memory_report(report: MemoryReport, console: Any) -> None:
    """A table: one row per device, with what the memory figure is made of and whether it fits."""
    from rich.table import Table

    shape = report.shape
    weights = ", ".join(
        f"{fmt} {format_bytes(w['bytes'])} ({'measured' if 'files' in w else 'estimated, ' + w['settings']})"
        for fmt, w in report.weights.items()
    )
    console.print(
        f"[bold]Deployment memory[/bold] for {report.source}: {shape['layers']} layers, "
        f"{shape['kv_heads']} KV heads × {shape['head_dim']}, context {report.context} × batch {report.batch}"
    )
    console.print(f"  weights: {weights}")
    console.print(f"  KV cache: {format_bytes(report.kv_cache_bytes)} "
                  f"({report.kv_bytes_per_element:g} bytes/element); overhead: {report.assumptions['overhead']}")
    table = Table(show_lines=False)
    for column, justify in (("device", "left"), ("format", "left"), ("weights", "right"),
                            ("KV", "right"), ("overhead", "right"), ("needed", "right"),
                            ("usable", "right"), ("fits", "center"), ("headroom", "right")):
        table.add_column(column, justify=justify)
    for fit in report.devices:
        table.add_row(
            fit.device, f"{fit.format} ({fit.runtime.split(' (')[0]})", format_bytes(fit.weights_bytes),
            format_bytes(fit.kv_cache_bytes), format_bytes(fit.overhead_bytes), format_bytes(fit.needed_bytes),
            format_bytes(fit.usable_bytes), "[green]yes[/green]" if fit.fits else "[red]no[/red]",
            format_bytes(fit.headroom_bytes),
        )
    console.print(table)
    notes = sorted({fit.weights_source for fit in report.devices if "size used" in fit.weights_source})
    for note in notes:
        console.print(f"  [yellow]note:[/yellow] {note}")
    console.print("  Formats: GGUF/llama.cpp where CUDA int4 kernels do not run (Maxwell/Volta Jetsons, Apple, "
                  "CPU); GPTQ (vLLM Marlin or our kernels) on Ampere and newer. Usable memory assumptions: "
                  "neural_quantization/deploy/devices.py.")


def write_memory_report_json(report: MemoryReport, path: str | os.PathLike) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report.to_dict(), indent=2))
    return target
