"""Tune the kernels for the common Llama / Mistral / Qwen layer shapes: the shipped defaults (GPU).

    NQ_TUNING_CACHE=/tmp/tuned PYTHONPATH=src python benchmarks/tuning_defaults.py \
        --budget-seconds 300 --output benchmarks/results/tuning_defaults_h100.json
    cp /tmp/tuned/<GPU>-nq<version>.json src/neural_quantization/kernels/tuned/<GPU>.json

Shapes (W4 g128 symmetric, no act-order permutation, as our default checkpoints are: static groups
keep ``g_idx`` ascending; the dispatcher serves asymmetric and act-order layers from the same
entries), each decoder's q, k/v, o, gate/up, down and the fused q/k/v and gate/up that
``generate`` runs. Keys are tuned in order of how often users hit them, until the time budget is
spent: fp16 decode (M = 1 … 16) for the 7-8B models, then the smaller and larger models, bf16 decode,
then prefill buckets (M = 32 … 4096). Every key is saved to the tuning cache as it is tuned
(``NQ_TUNING_CACHE``: point it at an empty directory so the file holds this run only) and the rows
(tuned choice and time, the heuristic's choice and time on the same weights, seconds to tune) go
to ``--output``, rewritten after every model so a run stopped at its limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from neural_quantization.bench.kernels import environment
from neural_quantization.kernels import tuning, tuning_cache

#: hidden, intermediate, query width (heads × head dim), key/value width (kv heads × head dim)
MODELS = {
    "Llama-3-8B / Mistral-7B": (4096, 14336, 4096, 1024),
    "Qwen2.5-7B": (3584, 18944, 3584, 512),
    "Llama-3.2-3B": (3072, 8192, 3072, 1024),
    "Llama-3.2-1B": (2048, 8192, 2048, 512),
    "Qwen2.5-1.5B": (1536, 8960, 1536, 256),
    "Llama-3-70B": (8192, 28672, 8192, 1024),
}
DECODE = (1, 2, 4, 8, 16)
PREFILL = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def model_shapes(hidden: int, intermediate: int, q_width: int, kv_width: int) -> list[tuning.LayerShape]:
    widths = [(hidden, q_width), (hidden, kv_width), (q_width, hidden), (hidden, intermediate),
              (intermediate, hidden), (hidden, q_width + 2 * kv_width), (hidden, 2 * intermediate)]
    return [tuning.LayerShape(k, n, 4, 128, True, False) for k, n in dict.fromkeys(widths)]


def plan(models: list[str]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(model, token counts, dtype) steps in priority order."""
    main, rest = models[:1], models[1:]
    steps = [(name, DECODE, torch.float16) for name in main + rest]
    steps += [(name, DECODE, torch.bfloat16) for name in main + rest]
    steps += [(name, PREFILL, torch.float16) for name in main + rest]
    steps += [(name, PREFILL, torch.bfloat16) for name in main + rest]
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--budget-seconds", type=float, default=300, help="stop starting new steps after this")
    parser.add_argument("--retune", action="store_true",
                        help="tune keys already stored too (to measure the heuristic against the tuned choice)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tuning_defaults needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = {"environment": environment(), "gpu": torch.cuda.get_device_name(),
              "cache_file": str(tuning_cache.user_cache_file(torch.cuda.get_device_name())), "steps": [], "rows": []}
    for name, counts, dtype in plan(args.models):
        if time.perf_counter() - started > args.budget_seconds:
            result["stopped"] = f"budget of {args.budget_seconds:.0f} s spent before {name} M={counts} {dtype}"
            break
        step_start = time.perf_counter()
        rows = tuning.tune_shapes(model_shapes(*MODELS[name]), counts, (dtype,), log=print, retune=args.retune,
                                  deadline=started + args.budget_seconds)
        for row in rows:
            row["model"] = name
        result["rows"].extend(rows)
        result["steps"].append({"model": name, "M": list(counts), "dtype": str(dtype), "keys": len(rows),
                                "seconds": round(time.perf_counter() - step_start, 1)})
        result["seconds"] = round(time.perf_counter() - started, 1)
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=1)
        print(f"== {name} {dtype} M={counts}: {len(rows)} keys in {result['steps'][-1]['seconds']} s", flush=True)
    ratios = [row["heuristic_over_tuned"] for row in result["rows"] if row["heuristic_over_tuned"]]
    if ratios:
        ratios.sort()
        result["heuristic_over_tuned"] = {"keys": len(ratios), "median": ratios[len(ratios) // 2],
                                          "worst": ratios[-1],
                                          "within_10_percent": sum(r <= 1.10 for r in ratios) / len(ratios)}
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result.get("heuristic_over_tuned"), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
