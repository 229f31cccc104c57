"""The quantization grid: how a group of weights maps to integer codes and back.

A group of weights ``w`` (one output row, a run of input columns) is represented as

    w ≈ scale * (q - zero),   q ∈ {0, …, 2**bits - 1}

with one ``scale`` and one ``zero`` per (group, output row). This is the grid of the GPTQ paper and
of every GPTQ checkpoint:

* symmetric: ``zero = 2**(bits-1)`` (8 for 4 bits), so the codes reach ``-8·scale … +7·scale``, and
  ``scale`` puts the group's largest-magnitude weight exactly on the end code of its sign:
  ``scale = -min / 2**(bits-1)`` when it is negative, ``max / (2**(bits-1) - 1)`` when positive.
  A weight of the other sign beyond that end clips to it. At 8 bits ``scale = max|w| / 127`` for
  either sign (llama.cpp's Q8_0 grid, so the GGUF export holds every code);
* asymmetric: the grid spans ``[min(w, 0), max(w, 0)]`` and ``zero = round(-min / scale)``.

Why the symmetric scale is not the textbook ``2·max|w| / (2**bits - 1)`` (``max|w| / 7.5``, the
GPTQ reference's and compressed-tensors'): with it the largest weight sits on a rounding tie
(``±7.5`` steps), so it is shortened by half a step, or lengthened, depending on how the scale's
float16 rounding fell: about half of the groups lose 1/15 of their largest weight. Those weights
matter most. Measured on SmolLM2-135M at W4 g64 (mean next-token NLL on held-out calibration-corpus
text, float 3.435): round-to-nearest 3.855 with ``max|w| / 7.5``, 3.725 with the exact extreme;
GPTQ 3.728 and 3.704. The side-by-side benchmark (``benchmarks/quality_peers.py``) measures it on
both evaluation sets; ``docs/quality.md`` has the experiment.

Two details make the grid storable without loss:

* scales are rounded to fp16 here, because the checkpoint stores them in fp16; the solver then
  compensates the error of exactly the grid that will be saved;
* asymmetric zeros are kept in ``[1, 2**bits - 1]``. GPTQ checkpoints (``checkpoint_format: gptq``)
  store ``zero - 1``; a zero of 0 would be stored as -1, which wraps to ``2**bits - 1`` in a packed
  word and loads as ``2**bits``. A group whose weights are all ≥ 0 therefore gets ``zero = 1`` and a
  scale widened to ``max / (2**bits - 2)``: one code of range is lost, only for such groups.

Shapes: ``w`` is (rows, cols); ``scale`` and ``zero`` are (rows, 1) so they broadcast over columns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from neural_quantization.config import CLIP_SEARCHES

_MIN_SCALE = 1e-7  # smaller scales underflow fp16; weights that small are zero in practice


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def _round_scale_fp16(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=_MIN_SCALE).to(torch.float16).to(torch.float32)


def minmax_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero from the min/max of each row of ``w`` (rows, cols) -> ((rows,1), (rows,1))."""
    maxq = max_code(bits)
    w = w.float()
    xmin = w.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = w.max(dim=1, keepdim=True).values.clamp(min=0)
    if sym:
        half = (maxq + 1) // 2  # codes - zero run from -half to half - 1
        # At 8 bits the grid keeps to ±127 (llama.cpp's Q8_0 grid; one code of 256 unused), so a
        # negative extreme is not the -128 that Q8_0 cannot hold; at 2-4 bits the extra code matters.
        negative_extreme = (-xmin >= xmax) & (bits < 8)
        scale = torch.where(negative_extreme, -xmin / half, torch.maximum(-xmin, xmax) / (half - 1))
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return _round_scale_fp16(scale), torch.full_like(scale, float(half))
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = _round_scale_fp16((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale)
    # Keep zero >= 1 (see module docstring): widen the scale so the grid still reaches max(w).
    needs_shift = zero < 1
    if needs_shift.any():
        shifted = _round_scale_fp16(xmax / (maxq - 1))
        # fp16 rounding may land just under xmax/(maxq-1); the last code then clips by < 1 ulp.
        scale = torch.where(needs_shift, shifted, scale)
        zero = torch.where(needs_shift, torch.ones_like(zero), zero)
    return scale, zero.clamp(1, maxq)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(w / scale) + zero, 0, maxq)`` as int32 (same shape as ``w``)."""
    q = torch.round(w.float() / scale) + zero
    return q.clamp_(0, max_code(bits)).to(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (codes - zero)`` in fp32."""
    return scale * (codes.float() - zero)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``w`` onto the grid and map it back: what the quantized model will compute with."""
    return dequantize(quantize(w, scale, zero, bits), scale, zero)


def _search_clipping(
    w: torch.Tensor, bits: int, sym: bool, error_of: Callable[[torch.Tensor], torch.Tensor],
    max_shrink: float, steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The min/max grid of each row of ``w`` shrunk by the ratio (``1, 1 - 1/steps, …, max_shrink``)
    that gives the smallest ``error_of(w - fake_q(w))`` (one value per row, shape (rows, 1))."""
    best_scale, best_zero = minmax_params(w, bits, sym)
    best_err = error_of(fake_quantize(w, best_scale, best_zero, bits) - w)
    for i in range(1, steps + 1):
        ratio = 1 - i / steps
        if ratio < max_shrink - 1e-9:
            break
        # Scaling w scales its min/max range; the grid of w * ratio is the shrunk grid of w.
        scale, zero = minmax_params(w * ratio, bits, sym)
        err = error_of(fake_quantize(w, scale, zero, bits) - w)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def mse_params(
    w: torch.Tensor, bits: int, sym: bool, max_shrink: float = 0.8, steps: int = 100, norm: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max grid with a per-row clipping ratio chosen to minimise ``sum |w - fake_q(w)|**norm``.

    Tries ratios ``1, 1 - 1/steps, …, max_shrink`` of the min/max range (the search of the GPTQ
    reference code, norm 2.4), keeping for each row the ratio with the smallest error.
    """
    w = w.float()
    return _search_clipping(w, bits, sym, lambda e: e.abs_().pow_(norm).sum(dim=1, keepdim=True), max_shrink, steps)


def hessian_params(
    w: torch.Tensor, bits: int, sym: bool, hessian: torch.Tensor, max_shrink: float = 0.7, steps: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max grid with the per-row clipping ratio that minimises GPTQ's own objective for the group.

    ``w`` (rows, g) are the weights of one group and ``hessian`` (g, g) the block of
    ``H = 2/n Σ x xᵀ`` for the same columns. The rounding error ``e = w - fake_q(w)`` of a row
    changes the layer's output by ``e X_gᵀ``, whose energy is ``e H_gg eᵀ / 2``: the group's term of
    ``tr((W - Q) H (W - Q)ᵀ)`` before GPTQ compensates it. Weight MSE (:func:`mse_params`) counts
    every column alike; this search weights each column by how strongly its input fires, and the
    cross terms by how inputs co-vary, so it clips where clipping costs the output least.
    """
    w = w.float()
    h = hessian.float().to(w.device)
    return _search_clipping(w, bits, sym, lambda e: ((e @ h) * e).sum(dim=1, keepdim=True), max_shrink, steps)


def choose_params(
    w: torch.Tensor, bits: int, sym: bool, clip: str = "minmax", hessian: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid for the rows of ``w`` (rows, g) by the search ``clip`` (one of :data:`CLIP_SEARCHES`).

    "minmax": the plain min/max grid; "mse": clipped to minimise weight error; "hessian": clipped
    to minimise the Hessian-weighted error, which needs ``hessian`` (g, g), the block of ``H`` for
    the group's columns.
    """
    if clip == "minmax":
        return minmax_params(w, bits, sym)
    if clip == "mse":
        return mse_params(w, bits, sym)
    if clip == "hessian":
        if hessian is None:
            raise ValueError("clip='hessian' needs the Hessian block of the group's columns.")
        return hessian_params(w, bits, sym, hessian)
    raise ValueError(f"clip={clip!r} is unknown; use one of {CLIP_SEARCHES}.")
