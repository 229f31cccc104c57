"""How long one GPTQ solve takes on a GPU, per Mistral-7B linear shape: fused column kernel vs torch loop.

The solve (``core/gptq.py``: Cholesky factor of the damped inverse Hessian, the column loop, the
lazy block updates) is timed alone on random weights and a random positive definite Hessian, with
the column loop as one Triton launch per block (``core/gptq_columns.py``) and as the
eager torch loop (``NQ_GPTQ_COLUMN_KERNEL=0``).

    python benchmarks/gptq_solve_speed.py --output benchmarks/results/gptq_solve_speed_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
from common import print_and_save

from neural_quantization import QuantizationConfig
from neural_quantization.core.gptq import gptq_quantize

# (name, out_features N, in_features K) of one Mistral-7B decoder layer
MISTRAL_7B_LINEARS = [
    ("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("v_proj", 1024, 4096), ("o_proj", 4096, 4096),
    ("gate_proj", 14336, 4096), ("up_proj", 14336, 4096), ("down_proj", 4096, 14336),
]


def time_solve(weight: torch.Tensor, hessian: torch.Tensor, config: QuantizationConfig, column_kernel: bool) -> float:
    os.environ["NQ_GPTQ_COLUMN_KERNEL"] = "1" if column_kernel else "0"
    gptq_quantize(weight, hessian, config)  # warm-up (compiles the kernel once)
    torch.cuda.synchronize()
    start = time.perf_counter()
    gptq_quantize(weight, hessian, config)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--desc-act", action="store_true")
    parser.add_argument("--skip-torch-loop", action="store_true", help="time only the fused kernel")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    config = QuantizationConfig(bits=4, group_size=args.group_size, desc_act=args.desc_act)
    torch.manual_seed(0)
    rows = []
    for name, n_out, n_in in MISTRAL_7B_LINEARS:
        weight = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(4 * n_in, n_in, device="cuda")
        hessian = 2 * x.T @ x / x.shape[0]
        del x
        row = {"linear": name, "shape": [n_out, n_in], "fused_seconds": time_solve(weight, hessian, config, True)}
        if not args.skip_torch_loop:
            row["torch_loop_seconds"] = time_solve(weight, hessian, config, False)
            row["speedup"] = row["torch_loop_seconds"] / row["fused_seconds"]
        print(json.dumps(row))
        rows.append(row)
    document = {
        "benchmark": "gptq_solve_speed",
        "config": config.to_dict(),
        "per_linear": rows,
        "layer_fused_seconds": sum(r["fused_seconds"] for r in rows),
        "layer_torch_loop_seconds": sum(r.get("torch_loop_seconds", 0.0) for r in rows) or None,
        "environment": {
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    print_and_save(document, args.output, omit=("per_linear",))


if __name__ == "__main__":
    main()
