"""Eager host overhead per call: our ``QuantLinear`` against ``nn.Linear`` (GPU).

    PYTHONPATH=src python benchmarks/host_overhead.py --output benchmarks/results/host_overhead_h200.json

What a user without CUDA graphs pays on the CPU for every layer call. The layers are small
(``--features``, default 256 → 256, M = 1) so the GPU finishes each kernel before the host has
issued the next one: the wall time per call, over ``--calls`` back-to-back eager calls with one
synchronisation at the end, is then the host's cost of a call (Python, dispatch, launch), not the
kernel's. Reported per layer kind: median over ``--repeats`` of µs per call, and the GPU time of
one call from a CUDA graph of the same calls (to show the GPU was not the bottleneck).

Layers: ``nn.Linear`` in fp16 (cuBLAS; PyTorch's own overhead is the floor a user knows),
``QuantLinear`` W4 g128 symmetric (the eager path: ``PreparedMatmul`` after the first call), and
the same through ``torch.ops`` custom op (what ``torch.compile`` sees).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from neural_quantization.bench.decode import quantize_linear_on_device
from neural_quantization.bench.kernels import environment
from neural_quantization.config import QuantizationConfig
from neural_quantization.kernels.timing import time_in_graph


def per_call_us(fn, calls: int, repeats: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, nargs=2, default=[256, 256], metavar=("K", "N"))
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_overhead.py times eager GPU calls: run it on a machine with a CUDA GPU.", file=sys.stderr)
        return 2
    k, n = args.features
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
    quantized = quantize_linear_on_device(linear, QuantizationConfig(bits=4, group_size=128, method="rtn"))
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    quantized(x)  # prepares the kernel layout and plan (the first call's one-time work)
    from neural_quantization.kernels import ops

    layout = quantized._kernel_layout
    rows = {
        "nn.Linear fp16": lambda: linear(x),
        "QuantLinear W4 (eager path)": lambda: quantized(x),
    }
    if layout:
        group_size, symmetric, act_order = layout
        rows["quant_linear_prepared custom op"] = lambda: ops.quant_linear_prepared(
            x, quantized.kernel_qweight if act_order else quantized.qweight, quantized.qzeros, quantized.scales,
            quantized.kernel_perm if act_order else None, None, 4, group_size, k, symmetric, "auto")
    result = {"environment": environment(), "features": [k, n], "calls": args.calls, "repeats": args.repeats,
              "rows": {}}
    for name, fn in rows.items():
        row = {"eager_us_per_call": round(per_call_us(fn, args.calls, args.repeats), 2),
               "graph_us_per_call": round(time_in_graph([fn], 50, args.repeats), 2)}
        result["rows"][name] = row
        print(name, row, flush=True)
    base = result["rows"]["nn.Linear fp16"]["eager_us_per_call"]
    for row in result["rows"].values():
        row["over_nn_linear_us"] = round(row["eager_us_per_call"] - base, 2)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
