"""Denoiser quantization quality on the tiny random pipelines (CPU): float vs RTN vs GPTQ, W8 and W4.

    python benchmarks/diffusion_quality.py --output benchmarks/results/diffusion_tiny.json

For each built-in tiny pipeline (``tiny-unet``: StableDiffusionPipeline; ``tiny-dit``:
PixArtAlphaPipeline; random weights, ``diffusion/tiny.py``) and each setting, a fresh copy of the
float pipeline is quantized from one calibration pass of the float pipeline over the shipped
prompts (``--steps`` DDIM steps; ``calibrate_pipeline``, shared by all settings); then
all settings and the float pipeline sample the held-out prompts (``diffusion/run.EVAL_PROMPTS``)
from the same seed. Recorded: the sum over layers of GPTQ's objective against RTN's, PSNR and SSIM
of the images against the float images, and the teacher-forced per-step denoiser error. A PNG grid
per pipeline (float / settings rows) is written beside the JSON. Random tiny models say whether
the method works end to end, not how a real pipeline looks at 4 bits.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from neural_quantization.bench.kernels import environment
from neural_quantization.diffusion import calibrate_pipeline, diffusion_config, quantize_pipeline
from neural_quantization.diffusion.quality import evaluate_pipelines, image_grid
from neural_quantization.diffusion.run import EVAL_PROMPTS
from neural_quantization.diffusion.tiny import TINY_PIPELINES, TINY_RESOLUTION, tiny_pipeline

SETTINGS = {"RTN W8": (8, "rtn"), "GPTQ W8": (8, "gptq"), "RTN W4": (4, "rtn"), "GPTQ W4": (4, "gptq"),
            "RTN W3": (3, "rtn"), "GPTQ W3": (3, "gptq")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", nargs="+", default=["tiny-unet", "tiny-dit"], choices=list(TINY_PIPELINES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    size = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
    result = {"environment": environment(), "protocol": {"steps": args.steps, "group_size": args.group_size,
              "eval_prompts": list(EVAL_PROMPTS), "seed": args.seed, "resolution": TINY_RESOLUTION},
              "pipelines": {}}
    for name in args.pipelines:
        reference = tiny_pipeline(name)
        reference.set_progress_bar_config(disable=True)
        variants, rows = {}, {}
        calibration = calibrate_pipeline(reference, steps=args.steps, **size)  # one pass serves every setting
        for label, (bits, method) in SETTINGS.items():
            pipe = copy.deepcopy(reference)
            started = time.perf_counter()
            report = quantize_pipeline(pipe, diffusion_config(bits, args.group_size, method), calibration=calibration)
            variants[label] = pipe
            rows[label] = {"bits": bits, "method": method, "seconds": round(time.perf_counter() - started, 2),
                           "layers": len(report.layers), "quantized_weights": report.quantized_weights,
                           "float_weights": report.float_weights,
                           "objective_over_rtn": sum(layer.loss for layer in report.layers)
                           / sum(layer.rtn_loss for layer in report.layers)}
        quality, images = evaluate_pipelines(reference, variants, list(EVAL_PROMPTS), args.steps, args.seed, 5.0,
                                             **size)
        for label, row in rows.items():
            row.update(quality[label])
            print(f"{name:9s} {label:8s} objective {row['objective_over_rtn']:.3f}x RTN  PSNR {row['psnr_db']:6.2f} dB  "
                  f"SSIM {row['ssim']:.4f}  step error {row['mean_step_error']:.4f}", flush=True)
        result["pipelines"][name] = {"denoiser": report.denoiser, "settings": rows}
        image_grid(images, str(Path(args.output).with_name(f"{Path(args.output).stem}_{name}.png")))
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
