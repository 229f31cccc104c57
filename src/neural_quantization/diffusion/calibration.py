"""Calibration for a diffusion denoiser: its own inputs along real sampling trajectories.

A denoiser sees a different input distribution at every timestep (pure noise at the start, a
nearly clean latent at the end), so calibrating on one timestep, or on random latents, fits the
grid to inputs it will rarely meet (Q-Diffusion, PTQ4DiT). Here the float pipeline samples every
prompt from its seed, and a hook on each linear layer of the denoiser folds the layer's inputs at
every call into its Hessian ``H = 2/n · Σ x xᵀ`` (``core/gptq.accumulate_hessian``). Every call is
one timestep with the same number of rows (batch × latent positions, doubled by classifier-free
guidance), so the running mean over rows weights the timesteps equally: "balanced across
timesteps" by construction. The text encoders run in float and are not hooked.

All Hessians are collected in one pass of the float pipeline (each layer sees the float model's
inputs, not those of already-quantized earlier layers): one sampling run instead of one per block,
and the memory of one K×K fp32 matrix per linear (SD-1.5's UNet: about 1.3 GB).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neural_quantization.core.gptq import accumulate_hessian

#: shipped calibration prompts (several languages; CLIP-tokenized pipelines see mostly the Latin ones)
DEFAULT_PROMPTS = (
    "a photograph of a red fox sitting in fresh snow, morning light",
    "an oil painting of a harbour with fishing boats at sunset",
    "a bowl of ramen with an egg and spring onions, studio photo",
    "a watercolor sketch of an old stone bridge over a river",
    "un vélo bleu appuyé contre un mur de briques, photo de rue",
    "ein gemütliches Wohnzimmer mit Bücherregal und Kamin, warmes Licht",
    "una playa tropical con palmeras y agua turquesa, fotografía aérea",
    "uma xícara de café sobre uma mesa de madeira, fotografia macro",
    "futuristic city skyline at night with neon signs, digital art",
    "a portrait of an elderly man with a grey beard, black and white",
    "雪の中の赤い鳥居、冬の風景写真",
    "山间的小村庄，清晨的薄雾，中国水墨画",
)


class CalibrationError(ValueError):
    """Bad calibration input (exit 2 on the command line)."""


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    file = Path(path)
    if not file.is_file():
        raise CalibrationError(f"--prompts {file} does not exist; give a text file with one prompt per line.")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise CalibrationError(f"--prompts {file} holds no prompt; write one prompt per line (or leave --prompts "
                               "out to use the shipped prompts).")
    return prompts


def denoiser_linears(denoiser: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The denoiser's ``nn.Linear`` layers by name, minus those whose name contains a ``skip`` entry."""
    return {name: module for name, module in denoiser.named_modules()
            if isinstance(module, nn.Linear) and not any(part in name for part in skip)}


def sampling_kwargs(pipe: Any, prompts: list[str], steps: int, seed: int, guidance_scale: float,
                    height: int | None, width: int | None) -> dict[str, Any]:
    """The keyword arguments of one deterministic sampling call (shared by calibration and evaluation).

    A size given explicitly is sampled as given: pipelines that snap sizes to their training
    resolutions (PixArt's ``use_resolution_binning``) are told not to."""
    kwargs: dict[str, Any] = {"prompt": prompts, "num_inference_steps": steps, "guidance_scale": guidance_scale,
                              "generator": torch.Generator().manual_seed(seed)}
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    parameters = inspect.signature(pipe.__call__).parameters
    if (height is not None or width is not None) and "use_resolution_binning" in parameters:
        kwargs["use_resolution_binning"] = False
    if "clean_caption" in parameters and not _caption_cleaning_available():
        kwargs["clean_caption"] = False  # what the pipeline falls back to, without its warning per call
    return kwargs


def _caption_cleaning_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("bs4", "ftfy"))


@torch.no_grad()
def trajectory_hessians(pipe: Any, linears: dict[str, nn.Linear], prompts: list[str], steps: int = 20,
                        seed: int = 0, guidance_scale: float = 5.0, height: int | None = None,
                        width: int | None = None, batch_size: int = 4) -> tuple[dict[str, torch.Tensor], int]:
    """Hessians of ``linears`` (name -> (K, K) fp32) over the float pipeline's trajectories of
    ``prompts`` (``batch_size`` prompts per sampling call, seeds ``seed``, ``seed + 1``, …), and
    the number of denoiser calls they saw."""
    if not prompts:
        raise CalibrationError("no calibration prompt; pass --prompts FILE or use the shipped prompts.")
    hessians: dict[str, torch.Tensor | None] = dict.fromkeys(linears)
    counts = dict.fromkeys(linears, 0)
    calls = [0]

    def hook_for(name: str):
        def hook(module, inputs):
            hessians[name], counts[name] = accumulate_hessian(hessians[name], counts[name], inputs[0].detach())
        return hook

    handles = [linear.register_forward_pre_hook(hook_for(name)) for name, linear in linears.items()]
    denoiser = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    handles.append(denoiser.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1)))
    try:
        for index, start in enumerate(range(0, len(prompts), batch_size)):
            batch = list(prompts[start:start + batch_size])
            pipe(**sampling_kwargs(pipe, batch, steps, seed + index, guidance_scale, height, width), output_type="latent")
    finally:
        for handle in handles:
            handle.remove()
    unseen = [name for name, h in hessians.items() if h is None]
    if unseen:
        raise CalibrationError(f"{len(unseen)} linear layers of the denoiser never ran during sampling "
                               f"(first: {unseen[0]}); pass them in --skip.")
    return {name: h for name, h in hessians.items() if h is not None}, calls[0]
