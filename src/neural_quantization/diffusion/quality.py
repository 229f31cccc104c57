"""How close a quantized pipeline's images are to the float pipeline's, from the same seeds.

* PSNR: ``10 · log10(1 / MSE)`` over pixels in [0, 1] (higher is closer; identical images: inf);
* SSIM: the structural similarity of Wang et al. (2004) with their constants (C1 = 0.01², C2 =
  0.03²) and an 11×11 Gaussian window of σ = 1.5, per channel, averaged;
* per-step denoiser error, teacher-forced: the float pipeline's denoiser inputs at every step are
  recorded and fed to both denoisers, so step t's error ``‖ε_q − ε_f‖ / ‖ε_f‖`` is the quantized
  denoiser's own error at that step, not the drift of a diverging trajectory.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from neural_quantization.diffusion.calibration import sampling_kwargs
from neural_quantization.diffusion.pipeline import denoiser_name


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR in dB of ``image`` against ``reference`` (same shape, values in [0, 1])."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(image, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Mean SSIM of ``image`` against ``reference``: arrays (..., H, W, C) in [0, 1]."""
    a = torch.as_tensor(np.asarray(reference, np.float64)).reshape(-1, *reference.shape[-3:]).permute(0, 3, 1, 2)
    b = torch.as_tensor(np.asarray(image, np.float64)).reshape(-1, *image.shape[-3:]).permute(0, 3, 1, 2)
    channels = a.shape[1]
    coords = torch.arange(11, dtype=torch.float64) - 5
    gauss = torch.exp(-coords**2 / (2 * 1.5**2))
    gauss /= gauss.sum()
    window = (gauss[:, None] * gauss[None, :]).expand(channels, 1, 11, 11).contiguous()

    def blur(x):
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


@torch.no_grad()
def sample_images(pipe: Any, prompts: list[str], steps: int, seed: int, guidance_scale: float,
                  height: int | None = None, width: int | None = None) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1] for ``prompts`` from one seeded sampling call."""
    return pipe(**sampling_kwargs(pipe, prompts, steps, seed, guidance_scale, height, width), output_type="np").images


@torch.no_grad()
def record_denoiser_calls(pipe: Any, prompts: list[str], steps: int, seed: int, guidance_scale: float,
                          height: int | None = None, width: int | None = None) -> list[tuple[tuple, dict, torch.Tensor]]:
    """(args, kwargs, output) of every denoiser call of one seeded float sampling run."""
    denoiser = getattr(pipe, denoiser_name(pipe))
    calls: list[tuple[tuple, dict, torch.Tensor]] = []

    def hook(module, args, kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        calls.append((args, dict(kwargs), sample.detach().clone()))

    handle = denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(**sampling_kwargs(pipe, prompts, steps, seed, guidance_scale, height, width), output_type="latent")
    finally:
        handle.remove()
    return calls


@torch.no_grad()
def step_errors(denoiser: torch.nn.Module, calls: list[tuple[tuple, dict, torch.Tensor]]) -> list[float]:
    """Relative error of ``denoiser``'s output at each recorded call (see the module docstring)."""
    errors = []
    for args, kwargs, expected in calls:
        output = denoiser(*args, **kwargs)
        sample = output[0] if isinstance(output, tuple) else output.sample
        errors.append(float((sample.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)))
    return errors


def compare_images(reference: np.ndarray, images: np.ndarray) -> dict[str, float]:
    """PSNR (mean over images) and SSIM of ``images`` against ``reference``."""
    values = [psnr(r, i) for r, i in zip(reference, images)]
    finite = [v for v in values if math.isfinite(v)]
    return {"psnr_db": (sum(finite) / len(finite)) if finite else math.inf, "ssim": ssim(reference, images)}


def image_grid(rows: dict[str, np.ndarray], path: str) -> None:
    """A PNG with one row per setting (``{"float": images, "RTN W4": images, …}``), labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    columns = max(len(images) for images in rows.values())
    figure, axes = plt.subplots(len(names), columns, figsize=(2 * columns, 2 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c in range(columns):
            axis = axes[r][c]
            axis.axis("off")
            if c < len(rows[name]):
                axis.imshow(np.clip(rows[name][c], 0, 1))
            if c == 0:
                axis.set_title(name, fontsize=9, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def evaluate_pipelines(reference: Any, variants: dict[str, Any], prompts: list[str], steps: int, seed: int,
                       guidance_scale: float, height: int | None = None, width: int | None = None
                       ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Each variant against the float ``reference`` on the same prompts and seed: PSNR / SSIM of the
    images and the teacher-forced per-step denoiser error. Returns (results by name, images by name
    including ``"float"``)."""
    images = {"float": sample_images(reference, prompts, steps, seed, guidance_scale, height, width)}
    calls = record_denoiser_calls(reference, prompts, steps, seed, guidance_scale, height, width)
    results: dict[str, Any] = {}
    for name, pipe in variants.items():
        images[name] = sample_images(pipe, prompts, steps, seed, guidance_scale, height, width)
        errors = step_errors(getattr(pipe, denoiser_name(pipe)), calls)
        results[name] = {**compare_images(images["float"], images[name]), "step_errors": errors,
                         "mean_step_error": sum(errors) / len(errors)}
    return results, images
