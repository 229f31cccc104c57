"""First-call cost: seconds from a ready model to its first token, fp16 vs int4, by tuning-cache state (GPU).

    PYTHONPATH=src python benchmarks/first_forward.py --output benchmarks/results/first_forward_h100.json

Each scenario runs in a fresh Python process on a Mistral-7B-shaped model (random fp16 weights;
int4 = RTN W4 g128 on the GPU, ``bench/decode.py``'s builder). Timed in the child, eagerly, as a
transformers user runs it: the first prefill of a ``--prompt``-token prompt, then the first decode
step (one token, dynamic KV cache), then the same again (a second prompt and ``--steps`` decode
steps: the steady state). The first call's extra cost is first minus steady.

Scenarios (the Triton compile cache starts empty in each "cold" one, as on a new machine; the CUDA
extension is built once before them, and that one-time build is reported on its own):

* ``fp16``: the float model;
* ``int4-heuristic``: no shipped defaults, empty tuning cache: every shape takes the heuristic;
* ``int4-shipped``: the shipped defaults for this GPU, empty user cache (what a new user gets);
* ``int4-warm``: the same again with the Triton cache and tuning cache that run left (a second start);
* ``int4-autotune``: ``NQ_KERNEL_AUTOTUNE=1``, no defaults, empty cache: every shape tuned at first
  use (the behaviour before the cache, the 94 s stall of the kernels issue).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def child(kind: str, layers: int, prompt: int, steps: int) -> dict:
    from neural_quantization import QuantizationConfig
    from neural_quantization.bench.decode import build_model, quantize_decoder

    torch.manual_seed(0)
    model = build_model(layers, "cuda")
    if kind != "fp16":
        quantize_decoder(model, QuantizationConfig(bits=4, group_size=128, method="rtn"))
    torch.cuda.synchronize()
    generator = torch.Generator(device="cuda").manual_seed(0)

    def first_token(ids):
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        return prefill, time.perf_counter() - start, out.past_key_values, token

    with torch.no_grad():
        ids = torch.randint(0, 32000, (1, prompt), device="cuda", generator=generator)
        first_prefill, first_decode, _, _ = first_token(ids)
        ids = torch.randint(0, 32000, (1, prompt), device="cuda", generator=generator)
        steady_prefill, _, cache, token = first_token(ids)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = out.past_key_values
        torch.cuda.synchronize()
        steady_decode = (time.perf_counter() - start) / steps
    return {"first_prefill_s": round(first_prefill, 3), "first_decode_s": round(first_decode, 3),
            "steady_prefill_s": round(steady_prefill, 4), "steady_decode_ms": round(1e3 * steady_decode, 2),
            "first_token_extra_s": round(first_prefill + first_decode - steady_prefill - steady_decode, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def run_child(kind: str, env: dict, args) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--layers", str(args.layers), "--prompt", str(args.prompt),
               "--steps", str(args.steps)]
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scenarios", nargs="+",
                        default=["fp16", "int4-heuristic", "int4-shipped", "int4-warm", "int4-autotune"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.prompt, args.steps)))
        return 0
    from neural_quantization.bench.kernels import environment
    from neural_quantization.kernels.cuda import extension

    root = tempfile.mkdtemp(prefix="first_forward_")
    started = time.perf_counter()
    extension_ok = extension.available()
    result = {"environment": environment(), "layers": args.layers, "prompt": args.prompt,
              "cuda_extension_build_s": round(time.perf_counter() - started, 1), "cuda_extension": extension_ok,
              "scenarios": {}}
    shipped_cache = os.path.join(root, "shipped-cache")
    shipped_triton = os.path.join(root, "shipped-triton")
    envs = {
        "fp16": {"TRITON_CACHE_DIR": os.path.join(root, "fp16-triton")},
        "int4-heuristic": {"NQ_TUNING_DEFAULTS": "0", "NQ_TUNING_CACHE": os.path.join(root, "heuristic-cache"),
                           "TRITON_CACHE_DIR": os.path.join(root, "heuristic-triton")},
        "int4-shipped": {"NQ_TUNING_CACHE": shipped_cache, "TRITON_CACHE_DIR": shipped_triton},
        "int4-warm": {"NQ_TUNING_CACHE": shipped_cache, "TRITON_CACHE_DIR": shipped_triton},
        "int4-autotune": {"NQ_KERNEL_AUTOTUNE": "1", "NQ_TUNING_DEFAULTS": "0",
                          "NQ_TUNING_CACHE": os.path.join(root, "autotune-cache"),
                          "TRITON_CACHE_DIR": os.path.join(root, "autotune-triton")},
    }
    for name in args.scenarios:
        result["scenarios"][name] = run_child("fp16" if name == "fp16" else "int4", envs[name], args)
        print(name, json.dumps(result["scenarios"][name])[:400], flush=True)
        if args.output:
            with open(args.output, "w") as handle:
                json.dump(result, handle, indent=1)
    fp16 = result["scenarios"].get("fp16", {})
    for name, row in result["scenarios"].items():
        if name != "fp16" and "first_token_extra_s" in row and "first_token_extra_s" in fp16:
            row["extra_over_fp16_s"] = round(row["first_token_extra_s"] - fp16["first_token_extra_s"], 3)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=1)
    print(json.dumps({k: v.get("extra_over_fp16_s") for k, v in result["scenarios"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
