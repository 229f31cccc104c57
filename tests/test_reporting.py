"""Report documents (JSON, Markdown, PNG), terminal tables and the progress bar."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field

import pytest
from rich.console import Console

from neural_quantization.config import QuantizationConfig
from neural_quantization.evaluation import LanguageResult, QualityGates
from neural_quantization.reporting import (
    build_report,
    layer_progress,
    plot_degradation,
    render_languages,
    render_summary,
    write_json,
    write_markdown,
)
from neural_quantization.reporting.report import NOT_MEASURED, summary_rows


def lang_result(deg: float, kl: float = 0.02, tokens: int = 1022) -> LanguageResult:
    return LanguageResult(
        ppl_reference=12.0,
        ppl_quantized=12.0 * (1 + deg / 100),
        degradation_pct=deg,
        kl_divergence=kl,
        kl_is_topk_approximation=True,
        tokens=tokens,
        windows=2,
        seq_len=512,
        top_k=64,
        top1_agreement=0.93,
    )


@dataclass
class FakeResults:
    """Shaped like the quantizer's results object: to_dict() with its key names."""

    final_compression_ratio: float = 3.76
    model_compression_ratio: float = 2.1
    memory_reduction: float = 52.4
    size_bytes: dict = field(default_factory=lambda: {"reference": 270_000_000, "quantized": 128_571_428})
    quantization_seconds: float = 83.5
    calibration: dict = field(
        default_factory=lambda: {
            "source": "self-generated",
            "languages": ["en", "hi"],
            "tokens": 65536,
            "self_generated": True,
        }
    )
    layers: list = field(
        default_factory=lambda: [
            {
                "name": "model.layers.0.self_attn.q_proj",
                "shape": [64, 64],
                "method": "gptq",
                "loss": 0.125,
                "damp_percent": 0.01,
                "seconds": 0.2,
                "note": "",
            }
        ]
    )
    warnings: list = field(default_factory=list)

    def to_dict(self):
        return self.__dict__.copy()


LANGS = {"en": lang_result(0.8), "hi": lang_result(4.2, kl=0.09), "ja": lang_result(2.9, kl=0.05)}


@pytest.fixture
def full_report():
    return build_report(
        model="gemma3-270m",
        config=QuantizationConfig(bits=4, group_size=128),
        quantization=FakeResults(),
        language_results=LANGS,
        gates=QualityGates(max_degradation=2.0, max_language_degradation=3.0),
    )


@pytest.fixture
def empty_report():
    """An evaluation-less, measurement-less run: nothing may be shown as achieved."""
    return build_report(model="tiny", config={"bits": 4, "group_size": 128})


def test_report_json_has_fields_and_types(full_report, tmp_path):
    path = write_json(full_report, tmp_path / "out" / "report.json")
    doc = json.loads(path.read_text())
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # atomic: no temp file left
    assert doc["model"] == "gemma3-270m" and doc["config"]["bits"] == 4 and doc["config"]["group_size"] == 128
    for key in ("compression_ratio", "memory_reduction_pct", "quantization_seconds", "avg_degradation_pct"):
        assert isinstance(doc[key], float), key
    assert doc["compression_ratio"] == 3.76 and doc["memory_reduction_pct"] == 52.4
    assert doc["size_bytes"]["reference"] == 270_000_000 and isinstance(doc["size_bytes"]["quantized"], int)
    assert doc["calibration"] == {
        "source": "self-generated",
        "languages": ["en", "hi"],
        "tokens": 65536,
        "self_generated": True,
    }
    assert set(doc["languages"]) == {"en", "hi", "ja"}
    for d in doc["languages"].values():
        for key in ("ppl_reference", "ppl_quantized", "degradation_pct", "kl_divergence"):
            assert isinstance(d[key], float), key
        assert isinstance(d["tokens"], int)
    assert doc["avg_degradation_pct"] == pytest.approx((0.8 + 4.2 + 2.9) / 3)
    assert doc["languages_under_target"] == 2 and doc["worst_language"] == "hi"
    assert doc["gates"]["max_degradation"] == {"limit": 2.0, "value": pytest.approx(7.9 / 3), "passed": False}
    lang_gate = doc["gates"]["max_language_degradation"]
    assert lang_gate["passed"] is False and lang_gate["failed_languages"] == ["hi"]
    assert doc["gates_passed"] is False
    assert doc["evaluation"]["kl_is_topk_approximation"] is True and doc["evaluation"]["kl_top_k"] == 64
    assert "lower bound" in doc["evaluation"]["kl_note"]
    env = doc["environment"]
    assert env["torch"] and env["transformers"] and env["python"] and env["device_name"] and env["date"]
    assert doc["layers"][0]["loss"] == 0.125


def test_report_derives_sizes_and_writes_nan_as_null(tmp_path):
    report = build_report(
        model="m",
        config={"bits": 8},
        quantization={"size_bytes": {"reference": 400, "quantized": 100}},
        language_results={"en": lang_result(float("nan"))},
    )
    assert report["memory_reduction_pct"] == pytest.approx(75.0)
    assert report["model_compression_ratio"] == pytest.approx(4.0)
    assert report["compression_ratio"] is None  # the linears' ratio was not measured: not invented
    doc = json.loads((write_json(report, tmp_path / "r.json")).read_text())  # strict JSON, no NaN literal
    assert doc["languages"]["en"]["degradation_pct"] is None
    assert doc["gates"]["max_language_degradation"]["passed"] is False
    with pytest.raises(ValueError, match="another name"):
        build_report(model="m", extra={"languages": {}})


def test_markdown_contains_languages_and_tables(full_report, tmp_path):
    chart = plot_degradation(full_report, tmp_path / "chart.png")
    text = write_markdown(full_report, tmp_path / "report.md", chart=chart).read_text()
    for lang in LANGS:
        assert re.search(rf"^\| {lang} \|", text, re.MULTILINE), lang
    assert "| Metric | Achieved | Target | Status |" in text
    assert (
        "model.layers.0.self_attn.q_proj" in text and "![Perplexity increase per language](chart.png)" in text
    )
    assert "failed: hi" in text
    empty = write_markdown(build_report(model="tiny"), tmp_path / "empty.md").read_text()
    assert "No evaluation ran" in empty and NOT_MEASURED in empty


def test_chart_is_a_png(full_report, tmp_path):
    path = plot_degradation(full_report, tmp_path / "sub" / "degradation.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="--eval-data"):
        plot_degradation(build_report(model="tiny"), tmp_path / "none.png")


def _cells(table, column: int) -> list[str]:
    return [str(c) for c in table.columns[column]._cells]


def test_summary_table_shows_only_measured_values(empty_report, full_report):
    console = Console(file=io.StringIO(), width=200, color_system=None)
    table = render_summary(empty_report, console)
    achieved = _cells(table, 1)
    assert achieved and all(NOT_MEASURED in c for c in achieved)
    assert all(c == "[dim]—[/]" for c in _cells(table, 3))
    printed = console.file.getvalue()
    assert "not measured" in printed and "4.00×" in printed  # the target is printed, in its own column

    table = render_summary(full_report, Console(file=io.StringIO(), width=200))
    rows = {r.metric: r for r in summary_rows(full_report)}
    achieved = _cells(table, 1)
    targets = _cells(table, 2)
    assert not set(achieved) & set(targets)
    assert all("≤" not in c and "ideal" not in c for c in achieved)
    assert rows["Average perplexity increase"].achieved == "+2.63 %"
    assert rows["Average perplexity increase"].status == "FAIL"
    assert rows["Worst language (hi)"].achieved == "+4.20 %"
    assert rows["Languages under target"].achieved == "2 / 3"
    assert rows["Compression, quantized linears (fp16 → packed)"].achieved == "3.76×"
    assert rows["Quantization time"].achieved == "1 min 24 s"


def test_languages_table(full_report, empty_report):
    console = Console(file=io.StringIO(), width=200, color_system=None)
    table = render_languages(full_report, console)
    assert _cells(table, 0) == ["en", "hi", "ja"]
    assert [c.split("]")[1].split("[")[0] for c in _cells(table, 7)] == ["pass", "FAIL", "pass"]
    assert "+4.20 %" in console.file.getvalue()
    quiet = Console(file=io.StringIO(), width=200)
    assert (
        render_languages(empty_report, quiet) is None
        and "No per-language evaluation" in quiet.file.getvalue()
    )


def test_layer_progress_counts_and_can_be_silenced():
    buffer = io.StringIO()
    with layer_progress(4, "Quantizing", console=Console(file=buffer, width=120)) as bar:
        for i in range(4):
            bar.update(description=f"layer {i}")
            bar.advance()
        assert bar.completed == 4
    assert "layer 4/4" in buffer.getvalue()  # not a TTY: drawn once, at the end
    silent = io.StringIO()
    with layer_progress(3, "Quantizing", console=Console(file=silent), enabled=False) as bar:
        bar.advance(3)
    assert bar.completed == 3 and silent.getvalue() == ""
