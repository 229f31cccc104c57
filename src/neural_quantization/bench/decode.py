"""End-to-end decode speed: a Mistral-7B-shaped model, fp16 vs our int4, CUDA graphs + static KV cache.

    neural-quantize bench decode --output benchmarks/results/e2e_h100.json
    PYTHONPATH=src python benchmarks/e2e.py --output benchmarks/results/e2e_h100.json   (the same)

The model is built from ``transformers.MistralConfig`` (7B sizes: 32 layers, hidden 4096,
intermediate 14336, 32 heads, 8 KV heads, vocab 32000) with random fp16 weights directly on the GPU;
speed depends on shapes, not values. For each precision and batch size:

1. prefill a short random prompt eagerly into a ``StaticCache`` (this is also the first eager
   forward that prepares the kernel layout and picks the kernels for the shapes it sees: the
   stored choices, shipped or in the user's tuning cache, else the heuristic, as a user's run does);
2. run the single-token decode step a few times eagerly (with ``--compile``: through
   ``torch.compile``, for both precisions), then capture it in one CUDA graph;
3. replay the graph ``--steps`` times between CUDA events: tokens/s = batch · steps / time;
4. with ``--profile``: replay it under ``torch.profiler`` and record where a step's GPU time goes
   (kernel time per category and the top kernels; the rest of the step is the GPU idle between
   kernels);
5. unless ``--no-fuse``: fuse each block's q/k/v and gate/up projections of the int4 model
   (``neural_quantization.fuse_projections``, one matmul per group, the weights stored once) and
   measure it again (``int4_fused``). The fp16 baseline is always transformers' own model.

int4: every decoder ``nn.Linear`` (q, k, v, o, gate, up, down; embeddings and lm_head stay fp16) is
quantized with RTN (4 bits, group 128, symmetric) on the GPU and replaced by ``QuantLinear``
(kernel_backend "auto"). Peak memory is ``torch.cuda.max_memory_allocated`` over the decode run.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
from torch import nn

from neural_quantization.config import QuantizationConfig
from neural_quantization.core.rtn import rtn_quantize
from neural_quantization.formats.packing import pack
from neural_quantization.bench.kernels import environment
from neural_quantization.nn.fused_projections import fuse_projections
from neural_quantization.generation.loop import cache_counters, rewind_cache
from neural_quantization.kernels.timing import median_event_us
from neural_quantization.nn.qlinear import QuantLinear


def mistral_7b_config(layers: int):
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, sliding_window=None,
        torch_dtype="float16",
    )


def build_model(layers: int, device: str):
    from transformers import MistralForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = MistralForCausalLM(mistral_7b_config(layers))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


@torch.no_grad()
def quantize_linear_on_device(linear: nn.Linear, config: QuantizationConfig) -> QuantLinear:
    """RTN-quantize one ``nn.Linear`` where it lives and pack it into a ``QuantLinear`` (no CPU trip)."""
    qw = rtn_quantize(linear.weight.detach(), config)
    mask = (1 << qw.bits) - 1
    layer = QuantLinear(linear.in_features, linear.out_features, qw.bits, qw.group_size,
                        bias=linear.bias is not None, bias_dtype=linear.weight.dtype,
                        kernel_backend=config.kernel_backend, device=linear.weight.device)
    layer.qweight.copy_(pack(qw.codes.T, qw.bits, dim=0))
    layer.qzeros.copy_(pack((qw.zeros - 1) & mask, qw.bits, dim=1))
    layer.scales.copy_(qw.scales.half())
    layer.g_idx.copy_(qw.g_idx)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias)
    return layer


@torch.no_grad()
def quantize_decoder(model, config: QuantizationConfig) -> int:
    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, quantize_linear_on_device(child, config))
                    count += 1
                    del child
    return count


def kernel_category(name: str) -> str:
    """Which part of the decode step a kernel name belongs to (for the ``--profile`` breakdown)."""
    lowered = name.lower()
    ours = ("mma_int4", "gemv_int4", "dot_slices_kernel", "dot_splitk_kernel", "gemv_rows_kernel", "gemv_splitk_kernel",
            "dequantize_kernel")
    if any(key in lowered for key in ours):
        return "int4 matmul (ours)"
    if any(key in lowered for key in ("flash", "fmha", "attention", "sdpa", "softmax")):
        return "attention"
    if any(key in lowered for key in ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas")):
        return "cuBLAS matmul"
    if lowered.startswith("triton"):
        return "fused elementwise (torch.compile)"
    return "other (eager ops, copies)"


def profile_graph(graph, steps: int, step_ms: float) -> dict:
    """GPU time per step of a replayed CUDA graph, by kernel category and the ten largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us()
    categories: dict[str, float] = {}
    for name, (_, micros) in kernels.items():
        category = kernel_category(name)
        categories[category] = categories.get(category, 0.0) + micros / steps / 1000.0
    busy_ms = sum(categories.values())
    top = sorted(kernels.items(), key=lambda item: -item[1][1])[:10]
    return {
        "kernels_per_step": sum(count for count, _ in kernels.values()) / steps,
        "kernel_ms_per_step": busy_ms,
        "idle_ms_per_step": step_ms - busy_ms,
        "ms_per_step_by_category": dict(sorted(categories.items(), key=lambda item: -item[1])),
        "top_kernels": [{"name": name[:120], "calls_per_step": count / steps, "ms_per_step": micros / steps / 1000.0}
                        for name, (count, micros) in top],
    }


@torch.no_grad()
def decode_speed(model, batch: int, prompt_len: int, steps: int, repeats: int, max_cache_len: int,
                 compile_step: bool = False, profile_step: bool = False) -> dict:
    from transformers import StaticCache

    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    started = time.perf_counter()
    logits = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                   cache_position=torch.arange(prompt_len, device=device)).logits
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - started
    ids = logits[:, -1:].argmax(-1)
    if prompt_len + steps > max_cache_len:
        raise ValueError(f"--prompt-len {prompt_len} + --steps {steps} exceed --max-cache-len {max_cache_len}.")
    # Newer transformers advance the static cache's own position counter in every forward; every
    # timed run starts again from the prompt's end (a few tiny copies per run of ``steps`` steps).
    counters = cache_counters(cache)
    position = torch.full((batch, 1), prompt_len, device=device, dtype=torch.long)
    cache_position = torch.tensor([prompt_len], device=device, dtype=torch.long)

    # With compile_step the decode step's other work (norms, rotary, residuals, SiLU·mul) is fused by
    # torch.compile, for both precisions alike; the kernels of the quantized layers stay ours (custom op).
    forward = torch.compile(model.forward, dynamic=False) if compile_step else model

    def step(rewind: bool = True):
        if rewind:  # eager calls start from the prompt's end; the captured step advances (timed_run rewinds)
            rewind_cache(cache, counters)  # noqa: F821 (deleted only after the last call)
        return forward(input_ids=ids, position_ids=position, past_key_values=cache, use_cache=True,  # noqa: F821 (deleted only after the last call)
                       cache_position=cache_position).logits

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    eager_times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        eager_times.append(time.perf_counter() - start)
    torch.cuda.reset_peak_memory_stats()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(rewind=False)
    rewind_cache(cache, counters)
    graph.replay()
    torch.cuda.synchronize()
    replay = graph.replay  # one step per replay; ``steps`` replays per timed run

    def timed_run() -> None:
        rewind_cache(cache, counters)  # noqa: F821 (deleted only after the last call)
        for _ in range(steps):
            replay()

    step_s = median_event_us(timed_run, repeats) / 1e6 / steps
    finite = bool(torch.isfinite(out.float()).all())
    result = {
        "batch": batch, "prompt_len": prompt_len, "max_cache_len": max_cache_len,
        "step_ms_graph": step_s * 1000.0, "tokens_per_s_graph": batch / step_s,
        "step_ms_eager": statistics.median(eager_times) * 1000.0,
        "tokens_per_s_eager": batch / statistics.median(eager_times),
        "prefill_s_first_call": prefill_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "logits_finite": finite,
        "compiled": compile_step,
    }
    if profile_step:
        rewind_cache(cache, counters)
        result["profile"] = profile_graph(graph, steps, step_s * 1000.0)
    del graph, cache, out
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run(layers: int = 32, batches=(1, 8), prompt_len: int = 16, steps: int = 20, repeats: int = 5,
        max_cache_len: int = 256, output: str | None = None, compile_step: bool = False,
        profile_step: bool = False, fuse: bool = True) -> dict:
    torch.manual_seed(0)
    model = build_model(layers, "cuda")
    weights_fp16 = torch.cuda.memory_allocated() / 2**30
    results = {"environment": environment(),
               "settings": {"layers": layers, "batches": list(batches), "prompt_len": prompt_len, "steps": steps,
                            "repeats": repeats, "max_cache_len": max_cache_len, "compiled": compile_step,
                            "quantization": "RTN 4-bit, group 128, symmetric; decoder linears only",
                            "fused_projections": fuse},
               "fp16": [], "int4": []}
    results["fp16_model_memory_gib"] = weights_fp16
    for batch in batches:
        row = decode_speed(model, batch, prompt_len, steps, repeats, max_cache_len, compile_step, profile_step)
        results["fp16"].append(row)
        print("fp16", row, flush=True)
    started = time.perf_counter()
    count = quantize_decoder(model, QuantizationConfig(bits=4, group_size=128, sym=True, method="rtn"))
    torch._dynamo.reset()  # the fp16 model's compiled code must not serve the quantized one
    gc.collect()
    torch.cuda.empty_cache()
    results["quantize_seconds"] = time.perf_counter() - started
    results["quantized_linears"] = count
    results["int4_model_memory_gib"] = torch.cuda.memory_allocated() / 2**30
    for batch in batches:
        row = decode_speed(model, batch, prompt_len, steps, repeats, max_cache_len, compile_step, profile_step)
        results["int4"].append(row)
        print("int4", row, flush=True)
    results["speedup_tokens_per_s"] = {
        str(a["batch"]): b["tokens_per_s_graph"] / a["tokens_per_s_graph"] for a, b in zip(results["fp16"], results["int4"])
    }
    print("speedup (graph):", results["speedup_tokens_per_s"], flush=True)
    if fuse:
        # the same int4 model with q/k/v and gate/up fused (nn/fused_projections.py); the fp16 baseline
        # stays transformers' own (unfused) model
        groups = fuse_projections(model)
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        results["fused_groups"] = len(groups)
        results["int4_fused_model_memory_gib"] = torch.cuda.memory_allocated() / 2**30
        results["int4_fused"] = []
        for batch in batches:
            row = decode_speed(model, batch, prompt_len, steps, repeats, max_cache_len, compile_step, profile_step)
            results["int4_fused"].append(row)
            print("int4 fused", row, flush=True)
        results["speedup_tokens_per_s_fused"] = {
            str(a["batch"]): b["tokens_per_s_graph"] / a["tokens_per_s_graph"]
            for a, b in zip(results["fp16"], results["int4_fused"])
        }
        print("speedup (graph, fused projections):", results["speedup_tokens_per_s_fused"], flush=True)
    if output:
        with open(output, "w") as handle:
            json.dump(results, handle, indent=1)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neural-quantize bench decode", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the Mistral-7B-shaped model")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes to decode")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    parser.add_argument("--max-cache-len", type=int, default=256, help="length of the static KV cache")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (both precisions) before capturing it in a CUDA graph")
    parser.add_argument("--profile", action="store_true",
                        help="also record where each step's GPU time goes (torch.profiler over graph replays)")
    parser.add_argument("--no-fuse", action="store_true",
                        help="skip the second int4 run with q/k/v and gate/up fused (fuse_projections)")
    parser.add_argument("--output", default=None, help="write the JSON result here (default: print only)")
    return parser


def main(argv=None) -> int:
    """``neural-quantize bench decode [options]``: run :func:`run` (needs a CUDA GPU)."""
    args = build_parser().parse_args(argv)
    run(args.layers, [int(b) for b in args.batches.split(",")], args.prompt_len, args.steps, args.repeats,
        args.max_cache_len, args.output, args.compile, args.profile, not args.no_fuse)
    return 0

