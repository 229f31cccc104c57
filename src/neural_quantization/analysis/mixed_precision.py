"""Mixed precision to a target: one width per decoder layer, chosen by measured sensitivity.

Given the sensitivity sweep (``analysis/sensitivity.py``: KL of the whole model when only layer
``i`` is at width ``b``) and the layers' linear shapes, choose ``b_i`` from the candidate widths to

    minimise  Σ_i KL_i(b_i)   subject to   Σ_i bytes_i(b_i) ≤ target_bits / 8 · Σ_i weights_i

where ``bytes_i(b)`` is what layer ``i``'s GPTQ tensors take at width ``b`` (codes, fp16 scales,
zero points and ``g_idx``: ``formats/gptq.gptq_layer_bytes``), so "bits per weight" counts the
scales. Summing single-layer KLs assumes their damage adds, which holds to first order for small
perturbations; the plan is then measured, not trusted (see ``docs/analysis.md``). Solved exactly
by dynamic programming over the budget in 1/4096 steps of the total (every layer's cost rounded
up, so the plan never exceeds the target).

The plan is a ``dynamic`` table (GPTQModel's and vLLM's per-module overrides) with one entry per
decoder layer, ``"+:<prefix>\\.<i>\\.": {"bits": b}`` (so ``--bits`` does not matter for them), a
pattern vLLM's ``re.match`` also matches for its fused ``qkv_proj`` / ``gate_up_proj`` names;
``bits`` is the most common width.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from neural_quantization.formats.gptq import gptq_layer_bytes

STEPS = 4096


class PlanError(ValueError):
    """A target the candidate widths cannot meet; the message says how to fix it."""


def layer_bytes(shapes: Sequence[tuple[int, int]], bits: int, group_size: int) -> int:
    """Bytes of one decoder layer's GPTQ tensors at ``bits``: ``shapes`` are its linears' (K, N)."""
    return sum(gptq_layer_bytes(bits, group_size, k, n) for k, n in shapes)


def plan_widths(
    sensitivity: dict,
    layer_shapes: Sequence[Sequence[tuple[int, int]]],
    target_bits: float,
    layers_prefix: str,
    widths: Sequence[int] | None = None,
) -> dict:
    """The plan of the module docstring: ``{"bits", "group_size", "dynamic", "widths", "average_bits",
    "predicted_kl", "target_bits"}``. ``sensitivity`` is ``analyze(...)["sensitivity"]``."""
    group_size = sensitivity["group_size"]
    measured = [int(b) for b in sensitivity["bits"]]
    widths = sorted(widths or measured)
    missing = sorted(set(widths) - set(measured))
    if missing:
        raise PlanError(f"the sensitivity sweep has no measurement at {missing} bits; run "
                        f"`neural-quantize analyze ... --bits {' '.join(map(str, widths))}` first.")
    if not 2 <= target_bits <= 8:
        raise PlanError(f"--target-bits {target_bits}: choose an average between 2 and 8 bits per weight.")
    if len(layer_shapes) != len(sensitivity["layers"]):
        raise PlanError(f"the sweep measured {len(sensitivity['layers'])} layers, the model has {len(layer_shapes)}; "
                        "run analyze on this model.")
    weights = sum(k * n for shapes in layer_shapes for k, n in shapes)
    budget = target_bits / 8 * weights
    cost = [{b: layer_bytes(shapes, b, group_size) for b in widths} for shapes in layer_shapes]
    smallest = sum(min(c.values()) for c in cost)
    if smallest > budget:
        raise PlanError(f"--target-bits {target_bits} is below the smallest mix these widths allow "
                        f"({8 * smallest / weights:.3f} bits per weight with scales, every layer at {widths[0]} bits); "
                        "raise the target or add a narrower width.")
    unit = budget / STEPS
    steps = [{b: math.ceil(c[b] / unit) for b in widths} for c in cost]
    kl = [{b: row["widths"][str(b)]["kl"] for b in widths} for row in sensitivity["layers"]]
    # best[s] = (total KL, choices) using at most s budget steps, layer by layer
    best: list[tuple[float, tuple[int, ...]] | None] = [(0.0, ())] + [None] * STEPS
    for i in range(len(layer_shapes)):
        nxt: list[tuple[float, tuple[int, ...]] | None] = [None] * (STEPS + 1)
        for s, entry in enumerate(best):
            if entry is None:
                continue
            for b in widths:
                t = s + steps[i][b]
                if t <= STEPS:
                    value = (entry[0] + kl[i][b], entry[1] + (b,))
                    if nxt[t] is None or value[0] < nxt[t][0]:
                        nxt[t] = value
        best = nxt
    reachable = [e for e in best if e is not None]
    if not reachable:  # only rounding up can cause this: the exact smallest fits, its step count may not
        raise PlanError(f"--target-bits {target_bits} is within rounding of the smallest mix; raise it slightly.")
    total_kl, chosen = min(reachable, key=lambda e: e[0])
    used = sum(cost[i][b] for i, b in enumerate(chosen))
    common = Counter(chosen).most_common(1)[0][0]
    prefix = re.escape(layers_prefix)
    dynamic = {f"+:{prefix}\\.{i}\\.": {"bits": b} for i, b in enumerate(chosen)}
    return {"bits": common, "group_size": group_size, "dynamic": dynamic, "widths": list(chosen),
            "average_bits": 8 * used / weights, "target_bits": target_bits, "predicted_kl_sum": total_kl,
            "candidate_widths": widths}
