"""One command's work: load a pipeline, quantize its denoiser, save it, and (optionally) report quality.

``neural-quantize quantize-pipeline`` calls :func:`quantize_and_save`. The checkpoint is written to
a staging directory and renamed into place when complete (``export/directories.py``), so the
output directory never holds half a pipeline. With ``report_dir`` the float pipeline and, for
GPTQ, an RTN pipeline on the same grid (quantized from the same calibration pass) are sampled beside the quantized one from the same
held-out prompts and seed, and ``report.json``, ``report.md`` and ``images.png`` (float / RTN /
GPTQ rows) are written there. With ``gguf`` the quantized denoiser is also written as a GGUF file
that diffusers' ``from_single_file`` loads (``export/diffusers_gguf.py``); its configuration and
the denoiser's class are checked before any calibration, and a file inside ``output_dir`` is
written with the pipeline, in one atomic step.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from neural_quantization.config import QuantizationConfig
from neural_quantization.diffusion.calibration import denoiser_linears
from neural_quantization.diffusion.pipeline import (
    denoiser_name,
    export_gguf,
    load_pipeline,
    quantization_record,
    save_quantized_pipeline,
)
from neural_quantization.diffusion.quality import evaluate_pipelines, image_grid
from neural_quantization.diffusion.quantize import calibrate_pipeline, quantize_pipeline
from neural_quantization.diffusion.tiny import TINY_PIPELINES, TINY_RESOLUTION, tiny_pipeline
from neural_quantization.export.diffusers_gguf import check_denoiser, check_gguf_config, check_gguf_path
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
                      report_dir: str | Path | None = None, log: Callable[[str], None] = print,
                      gguf: str | Path | None = None) -> dict[str, Any]:
    """Quantize ``source``'s denoiser with ``config`` and save the pipeline to ``output_dir`` (and the
    denoiser as the GGUF file ``gguf``); returns the quantization summary (and the quality results
    where ``report_dir`` is given)."""
    target = check_output_dir(output_dir, overwrite=False)
    gguf_path = check_gguf_path(gguf) if gguf is not None else None
    if gguf_path is not None:
        check_gguf_config(config)
    pipe, size = open_pipeline(source, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if gguf_path is not None:
        denoiser = getattr(pipe, denoiser_name(pipe))
        check_denoiser(denoiser, list(denoiser_linears(denoiser, skip)))
    height = height or size.get("height")
    width = width or size.get("width")
    reference = copy.deepcopy(pipe) if report_dir is not None else None
    log(f"calibrating on {len(prompts) if prompts else 'the shipped'} prompts × {steps} steps, then {config.method} "
        f"W{config.bits} g{config.group_size} on the denoiser's linear layers")
    calibration = calibrate_pipeline(pipe, prompts, steps, seed, guidance_scale, height, width, skip)
    summary = quantize_pipeline(pipe, config, skip=skip, calibration=calibration)
    inside = gguf_path is not None and gguf_path.resolve().is_relative_to(target.resolve())
    gguf_report = None
    with staged_directory(target) as staging:
        save_quantized_pipeline(pipe, staging, summary.record())
        record = quantization_record(staging)  # what quantization.json holds, into the GGUF's metadata
        if inside:
            gguf_report = export_gguf(pipe, staging / gguf_path.resolve().relative_to(target.resolve()), record)
            gguf_report.path = str(gguf_path)
    if gguf_path is not None and not inside:
        gguf_report = export_gguf(pipe, gguf_path, record)
    gain = sum(layer.loss for layer in summary.layers) / max(sum(layer.rtn_loss for layer in summary.layers), 1e-30)
    log(f"{len(summary.layers)} linear layers of the {summary.denoiser} quantized in {summary.seconds:.1f} s "
        f"({summary.denoiser_calls} denoiser calls); objective {gain:.3f}× RTN's; "
        f"{summary.quantized_weights:,} weights quantized, {summary.float_weights:,} left in float; saved to {target}")
    result: dict[str, Any] = {"pipeline": source, "output_dir": str(target), "quantization": summary.to_dict()}
    if gguf_report is not None:
        result["gguf"] = gguf_report.to_dict()
        clamped = f", {gguf_report.clamped_codes:,} codes -128 clamped to -127" if gguf_report.clamped_codes else ""
        log(f"GGUF for diffusers' from_single_file written to {gguf_report.path} ({gguf_report.file_bytes:,} bytes; "
            f"{gguf_report.tensor_types}{clamped})")
    if report_dir is not None:
        variants = {f"{config.method.upper()} W{config.bits}": pipe}
        if config.method == "gptq":
            baseline = copy.deepcopy(reference)
            quantize_pipeline(baseline, config.replace(method="rtn"), skip=skip, calibration=calibration)
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
