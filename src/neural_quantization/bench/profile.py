"""Launch one kernel configuration a few times on one layer shape, for ``ncu`` (Nsight Compute).

    ncu --kernel-name regex:gemv_rows --launch-skip 2 --launch-count 1 --section SpeedOfLight \\
        python -m neural_quantization.bench.profile --shape 4096x28672 --m 1 \\
        --config gemv_rows,1,512,64,8,4,1

``--config strategy,block_m,block_n,block_k,split_k,num_warps,num_stages[,variant]`` (the fields
of ``dispatch.LaunchConfig``, e.g. ``cuda_mma,8,32,64,1,8,1,5``); without it the untuned default
configuration is launched. Prints the time per call (CUDA events, no graph).
"""

from __future__ import annotations

import argparse

import torch

from neural_quantization.kernels import ops
from neural_quantization.bench.kernels import random_gptq_layer
from neural_quantization.kernels import dispatch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="4096x28672")
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--config", default=None)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args(argv)
    k, n = (int(v) for v in args.shape.lower().split("x"))
    t = random_gptq_layer(k, n, 4, 128, True, "cuda")
    layout = ops.prepare(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, k)
    x = torch.randn(args.m, k, device="cuda", dtype=getattr(torch, args.dtype))
    if args.config:
        f = args.config.split(",")
        config = dispatch.LaunchConfig(f[0], *map(int, f[1:]))
    else:
        config = dispatch.default_config(args.m, k, n, 4, dispatch._sm_count(x.device), layout.group_size,
                                         dispatch.cuda_mma_ready(x.device), t["scales"].dtype)
    dispatch.reserve_tickets(x.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(args.calls):
        if i == args.calls - 1:
            start.record()
        dispatch.launch(config, x, layout.qweight, t["qzeros"], t["scales"], None, None, 4, layout.group_size, k,
                        layout.symmetric)
    end.record()
    end.synchronize()
    print(f"{config.describe()} {args.shape} M={args.m}: {start.elapsed_time(end) * 1000:.1f} us (last call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
