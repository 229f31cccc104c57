"""A PixArt-α-sized DiT on the GPU: memory and per-step time, float (fp16) vs our W4 kernels.

    PYTHONPATH=src python benchmarks/diffusion_speed.py --output benchmarks/results/diffusion_speed_h200.json

No diffusion weights can be downloaded here, so the denoiser is built from PixArt-α's
configuration (``PixArtTransformer2DModel``: 28 blocks, width 1152 = 16 heads × 72, patch 2,
T5-XXL caption width 4096; ~611 M parameters) with random fp16 weights, directly on the GPU. Its
linears are then quantized to W4 with RTN on the GPU (``bench/decode.quantize_linear_on_device``):
with random weights the choice of GPTQ or RTN changes the numbers inside the tensors, not their
shapes, so memory and time are the same as for a GPTQ checkpoint of the real model.

One "step" is one call of the denoiser with classifier-free guidance's batch of 2 (what
``PixArtAlphaPipeline`` does per sampling step), at 512 px (latent 64 × 64, 1,024 image tokens
per image) and 1024 px (128 × 128, 4,096 tokens, with PixArt's resolution conditions), and a
120-token caption. Recorded for each precision and resolution:

* ``weights_gib``: bytes of the denoiser's parameters and buffers (the packed codes, scales and
  zeros for W4);
* ``peak_step_gib``: ``torch.cuda.max_memory_allocated`` during a step, the weights included;
* ``eager_ms``: median time of one step called eagerly (CUDA events around each call), as a
  diffusers user runs the pipeline;
* ``graph_ms``: the same step replayed from a captured CUDA graph (Python overhead removed);
* ``max_rel_diff``: the largest |W4 − fp16| of the step's output over the largest |fp16| (a sanity
  check that the quantized model computes the same function, not a quality figure: random weights).

Image tokens × 2 make the linears' M 2,048 (512 px) and 8,192 (1024 px): the large-M regime of the
kernels issue, where the int4 kernels are measured against fp16 cuBLAS in ``kernel_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

from neural_quantization.bench.decode import quantize_linear_on_device
from neural_quantization.bench.kernels import environment
from neural_quantization.config import QuantizationConfig
from neural_quantization.kernels.timing import median_event_us, time_in_graph

#: PixArt-α XL/2 (diffusers' PixArtTransformer2DModel configuration of PixArt-alpha/PixArt-XL-2-*)
PIXART_ALPHA = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    cross_attention_dim=1152, caption_channels=4096, patch_size=2, norm_type="ada_norm_single",
                    norm_elementwise_affine=False, norm_eps=1e-6, dropout=0.0, attention_bias=True,
                    num_embeds_ada_norm=1000, upcast_attention=False, activation_fn="gelu-approximate")
RESOLUTIONS = {512: 64, 1024: 128}  # pixels -> latent side (the VAE downsamples by 8)
CAPTION_TOKENS = 120


def build_denoiser(latent_side: int, device: str = "cuda") -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = PixArtTransformer2DModel(sample_size=latent_side, **PIXART_ALPHA,
                                             use_additional_conditions=latent_side == 128)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def step_inputs(latent_side: int, batch: int = 2, device: str = "cuda") -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(batch, 4, latent_side, latent_side, device=device, dtype=torch.float16,
                                     generator=generator),
        "encoder_hidden_states": torch.randn(batch, CAPTION_TOKENS, 4096, device=device, dtype=torch.float16,
                                             generator=generator),
        "encoder_attention_mask": torch.ones(batch, CAPTION_TOKENS, device=device, dtype=torch.float16),
        "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    if latent_side == 128:
        side = float(latent_side * 8)
        inputs["added_cond_kwargs"] = {
            "resolution": torch.tensor([[side, side]] * batch, device=device, dtype=torch.float16),
            "aspect_ratio": torch.tensor([[1.0]] * batch, device=device, dtype=torch.float16)}
    return inputs


@torch.no_grad()
def quantize_linears(model: nn.Module, config: QuantizationConfig) -> int:
    """Swap every ``nn.Linear`` of the transformer blocks for a W4 ``QuantLinear`` (on the GPU)."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.startswith("transformer_blocks.")]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, quantize_linear_on_device(getattr(owner, leaf), config))
    return len(names)


def stored_gib(model: nn.Module) -> float:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


@torch.no_grad()
def measure(model: nn.Module, inputs: dict, warmup: int, repeats: int) -> dict:
    def call():
        return model(**inputs, return_dict=False)[0]

    first_start = time.perf_counter()
    out = call()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - first_start
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    eager_us = median_event_us(call, repeats)
    try:
        graph_ms = round(time_in_graph([call], 1, repeats) / 1000.0, 3)
    except RuntimeError as error:  # a kernel path that cannot be captured is reported, not hidden
        graph_ms = f"capture failed: {str(error)[:200]}"
    return {"first_call_s": round(first_s, 2), "peak_step_gib": round(peak, 3),
            "eager_ms": round(eager_us / 1000.0, 3), "graph_ms": graph_ms, "output": out.float()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024], choices=sorted(RESOLUTIONS))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("diffusion_speed.py measures GPU memory and time: run it on a machine with a CUDA GPU.",
              file=sys.stderr)
        return 2
    import diffusers

    config = QuantizationConfig(bits=4, group_size=args.group_size, method="rtn", kernel_backend="auto")
    result = {"environment": {**environment(), "diffusers": diffusers.__version__},
              "model": "PixArt-α XL/2-shaped PixArtTransformer2DModel, random fp16 weights",
              "batch": 2, "caption_tokens": CAPTION_TOKENS, "bits": 4, "group_size": args.group_size,
              "quantizer": "RTN on the GPU (random weights: GPTQ gives the same shapes, memory and speed)",
              "resolutions": {}}
    for pixels in args.resolutions:
        side = RESOLUTIONS[pixels]
        torch.manual_seed(0)
        model = build_denoiser(side)
        inputs = step_inputs(side)
        row = {"parameters": sum(p.numel() for p in model.parameters()), "image_tokens": (side // 2) ** 2}
        fp16 = measure(model, inputs, args.warmup, args.repeats)
        reference = fp16.pop("output")
        row["fp16"] = {"weights_gib": round(stored_gib(model), 3), **fp16}
        row["quantized_linears"] = quantize_linears(model, config)
        torch.cuda.empty_cache()
        w4 = measure(model, inputs, args.warmup, args.repeats)
        output = w4.pop("output")
        row["w4"] = {"weights_gib": round(stored_gib(model), 3), **w4,
                     "max_rel_diff": round(float((output - reference).abs().max() / reference.abs().max()), 4)}
        row["w4_over_fp16"] = {key: round(row["w4"][key] / row["fp16"][key], 3)
                               for key in ("weights_gib", "peak_step_gib", "eager_ms", "graph_ms")
                               if isinstance(row["w4"][key], float) and isinstance(row["fp16"][key], float)}
        result["resolutions"][str(pixels)] = row
        print(pixels, json.dumps(row), flush=True)
        del model, inputs, reference, output
        torch.cuda.empty_cache()
        if args.output:
            with open(args.output, "w") as handle:
                json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
