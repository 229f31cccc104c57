"""Tune ahead: time the kernels for given layer shapes and token counts, and save the choices.

A key of the dispatcher (``kernels/dispatch.py``) is a layer's shape and format plus the number of
activation rows M (bucketed) and their dtype. Values do not change a kernel's speed, so a layer is
timed on random codes of its shape: :func:`tune_shapes` builds one random kernel-order layer per
:class:`LayerShape`, tunes it at every requested M and dtype with ``dispatch.tune`` (which saves
each choice in the user's tuning cache, ``kernels/tuning_cache.py``) and reports, per key, the
tuned choice and time beside the heuristic's choice and time on the same weights, so how much
tuning buys over the untuned default is measured, not assumed.

``neural-quantize tune MODEL_DIR`` collects a model's shapes (``nn/kernel_tuning.py``) and calls
:func:`tune_shapes`; ``benchmarks/tuning_defaults.py`` does it for the common Llama / Mistral / Qwen
shapes to produce the shipped defaults.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neural_quantization.formats.packing import pack
from neural_quantization.kernels import dispatch

DEFAULT_TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class LayerShape:
    """One quantized linear as the kernels see it: ``y (M, N) = x (M, K) @ W^T``.

    ``group_size``: the checkpoint's (-1 or ≥ K: one group per column); ``act_order``: the input
    dimension is permuted (a ``desc_act`` checkpoint), ``symmetric``: every zero is the midpoint.
    """

    in_features: int
    out_features: int
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    act_order: bool = False

    def kernel_group_size(self) -> int:
        """The group length of the kernel layout (``kernels/layout.py``): one group is K + codes per word."""
        if self.group_size == -1 or self.group_size >= self.in_features:
            return self.in_features + 32 // self.bits
        return self.group_size

    def describe(self) -> str:
        flags = ("" if self.symmetric else " asym") + (" act-order" if self.act_order else "")
        group = "per-channel" if self.kernel_group_size() > self.in_features else f"g{self.group_size}"
        return f"{self.in_features}->{self.out_features} w{self.bits} {group}{flags}"


def random_layer(shape: LayerShape, device: torch.device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Kernel-order tensors of a random layer of this shape (codes, scales ~ 1e-2, zeros, permutation)."""
    K, N, bits = shape.in_features, shape.out_features, shape.bits
    group = shape.kernel_group_size()
    groups = -(-K // group)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (K, N), device=device, dtype=torch.int32, generator=generator)
    if shape.symmetric:
        zeros = torch.full((groups, N), (1 << (bits - 1)) - 1, device=device, dtype=torch.int32)
    else:
        zeros = torch.randint(0, maxq + 1, (groups, N), device=device, dtype=torch.int32, generator=generator)
    perm = None
    if shape.act_order:
        perm = torch.randperm(K, device=device, generator=generator).to(torch.int32)
    return {
        "qweight": pack(codes, bits, dim=0),
        "qzeros": pack(zeros, bits, dim=1),
        "scales": (torch.rand(groups, N, device=device, generator=generator) * 0.02 + 0.001).half(),
        "perm": perm,
    }


def tune_shapes(
    shapes: Sequence[LayerShape],
    token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
    dtypes: Sequence[torch.dtype] = (torch.float16,),
    device: str | torch.device = "cuda",
    retune: bool = False,
    log: Callable[[str], None] | None = None,
    deadline: float | None = None,
) -> list[dict]:
    """Tune every (shape, M, dtype) on ``device`` and save the choices; returns one row per key.

    A key that already has a stored choice (shipped defaults or the user's cache) is skipped unless
    ``retune``; with a ``deadline`` (a ``time.perf_counter()`` value) no key is started after it. Each row: the shape, M, dtype, the tuned choice and µs per call, the heuristic's
    choice and µs on the same weights and inputs, and the seconds the key took to tune (Triton
    compilations included).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("tuning times the kernels on an NVIDIA GPU; no CUDA device is available here")
    dispatch.load_stored_choices(device)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for shape in dict.fromkeys(shapes):
        layer = random_layer(shape, device, generator)
        copies = None
        group = shape.kernel_group_size()
        for dtype in dtypes:
            for m in dict.fromkeys(dispatch.m_bucket(count) for count in token_counts):
                x = torch.randn(m, shape.in_features, device=device, dtype=dtype, generator=generator)
                key = dispatch.tuning_key(x, shape.in_features, shape.out_features, shape.bits, group,
                                          shape.symmetric, shape.act_order)
                if not retune and dispatch.is_tuned(key):
                    continue
                if deadline is not None and time.perf_counter() > deadline:
                    return rows
                copies = copies or dispatch.weight_copies(layer["qweight"], layer["qzeros"], layer["scales"])
                args = (layer["perm"], None, shape.bits, group, shape.in_features, shape.symmetric)
                started = time.perf_counter()
                best = dispatch.tune(x, layer["qweight"], layer["qzeros"], layer["scales"], *args, copies=copies)
                seconds = time.perf_counter() - started
                tuned_us = dispatch.TUNING_LOG[-1]["best_us"]
                heuristic = dispatch.heuristic_config(x, layer["qweight"], layer["scales"], shape.bits, group,
                                                      shape.in_features)
                heuristic_us = dispatch.TUNING_LOG[-1]["timings_us"].get(heuristic.describe())
                if not isinstance(heuristic_us, float):
                    heuristic_us = dispatch.time_config(heuristic, x, copies, *args)
                row = {"shape": shape.describe(), "K": shape.in_features, "N": shape.out_features,
                       "bits": shape.bits, "group_size": shape.group_size, "symmetric": shape.symmetric,
                       "act_order": shape.act_order, "M": m, "dtype": str(dtype).removeprefix("torch."),
                       "tuned": best.describe(), "tuned_us": tuned_us, "heuristic": heuristic.describe(),
                       "heuristic_us": round(heuristic_us, 2),
                       "heuristic_over_tuned": round(heuristic_us / tuned_us, 3) if tuned_us else None,
                       "tune_seconds": round(seconds, 2)}
                rows.append(row)
                if log is not None:
                    log(f"{row['shape']} M={m} {row['dtype']}: {row['tuned']} {tuned_us:.1f} us "
                        f"(heuristic {row['heuristic_us']:.1f} us), {seconds:.1f} s")
    return rows
