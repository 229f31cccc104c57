"""One command's work: load a pipeline, quantize its denoiser, save it, and (optionally) report quality.

``neural-quantize quantize-pipeline`` calls :func:`quantize_and_save`. The checkpoint is written to
a staging directory and renamed into place when complete (``export/directories.py``), so the
output directory never holds half a pipeline. With ``report_dir`` the float pipeline and, for
GPTQ, an RTN pipeline on the same grid are sampled beside the quantized one from the same
held-out prompts and seed, and ``report.json``, ``report.md`` and ``images.png`` (float / RTN /
GPTQ rows) are written there.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from neural_quantization.config import QuantizationConfig
from neural_quantization.diffusion.pipeline import load_pipeline, save_quantized_pipeline
from neural_quantization.diffusion.quality import evaluate_pipelines, image_grid
from neural_quantization.diffusion.quantize import quantize_pipeline
from neural_quantization.diffusion.tiny import TINY_PIPELINES, TINY_RESOLUTION, tiny_pipeline
from neural_quantization.export.directories import check_output_dir, staged_directory

#: held-out prompts for the report (none of them is a calibration prompt)
EVAL_PROMPTS = ("a lighthouse on a cliff above a stormy sea", "a plate of fresh strawberries on a white table",
                "ein roter Sportwagen auf einer Bergstraße", "un chat noir dormant sur un canapé")


def open_pipeline(source: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, dict[str, int]]:
    """The pipeline ``source`` names (a built-in tiny one, a directory or a hub id) and its default size."""
    if source in TINY_PIPELINES:
        pipe = tiny_pipeline(source).to(device)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
        return pipe, {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
    return load_pipeline(source, device, dtype), {}


def quantize_and_save(source: str, output_dir: str | Path, config: QuantizationConfig, prompts: list[str] | None,
                      steps: int, guidance_scale: float, height: int | None, width: int | None,
                      skip: tuple[str, ...], device: torch.device, dtype: torch.dtype, seed: int = 0,
                      report_dir: str | Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantize ``source``'s denoiser with ``config`` and save the pipeline to ``output_dir``; returns
    the quantization summary (and the quality results where ``report_dir`` is given)."""
    target = check_output_dir(output_dir, overwrite=False)
    pipe, size = open_pipeline(source, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    height = height or size.get("height")
    width = width or size.get("width")
    reference = copy.deepcopy(pipe) if report_dir is not None else None
    log(f"calibrating on {len(prompts) if prompts else 'the shipped'} prompts × {steps} steps, then {config.method} "
        f"W{config.bits} g{config.group_size} on the denoiser's linear layers")
    summary = quantize_pipeline(pipe, config, prompts, steps, seed, guidance_scale, height, width, skip)
    with staged_directory(target) as staging:
        save_quantized_pipeline(pipe, staging, summary.record())
    gain = sum(layer.loss for layer in summary.layers) / max(sum(layer.rtn_loss for layer in summary.layers), 1e-30)
    log(f"{len(summary.layers)} linear layers of the {summary.denoiser} quantized in {summary.seconds:.1f} s "
        f"({summary.denoiser_calls} denoiser calls); objective {gain:.3f}× RTN's; "
        f"{summary.quantized_weights:,} weights quantized, {summary.float_weights:,} left in float; saved to {target}")
    result: dict[str, Any] = {"pipeline": source, "output_dir": str(target), "quantization": summary.to_dict()}
    if report_dir is not None:
        variants = {f"{config.method.upper()} W{config.bits}": pipe}
        if config.method == "gptq":
            baseline = copy.deepcopy(reference)
            quantize_pipeline(baseline, config.replace(method="rtn"), prompts, steps, seed, guidance_scale,
                              height, width, skip)
            variants = {f"RTN W{config.bits}": baseline, **variants}
        quality, images = evaluate_pipelines(reference, variants, list(EVAL_PROMPTS), steps, seed + 1000,
                                             guidance_scale, height, width)
        result["quality"] = quality
        write_report(Path(report_dir), result, images)
        log(f"report written to {report_dir} (report.json, report.md, images.png)")
    return result


def report_markdown(result: dict[str, Any]) -> str:
    lines = [f"# {result['pipeline']}: denoiser quantization", "",
             "| setting | PSNR vs float (dB) | SSIM | mean step error |", "|---|---|---|---|"]
    for name, row in result.get("quality", {}).items():
        lines.append(f"| {name} | {row['psnr_db']:.2f} | {row['ssim']:.4f} | {row['mean_step_error']:.4f} |")
    return "\n".join(lines) + "\n"


def write_report(directory: Path, result: dict[str, Any], images: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (directory / "report.md").write_text(report_markdown(result), encoding="utf-8")
    image_grid(images, str(directory / "images.png"))
