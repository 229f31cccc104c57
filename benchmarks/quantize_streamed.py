"""A model larger than memory on one GPU: a 70B-shaped checkpoint quantized with streamed weights.

Step 1 writes a Llama-3-70B-shaped checkpoint with random bf16 weights to disk, one safetensors
shard per decoder layer (never holding the model in memory). Step 2, in a fresh process (so its
peak host memory is its own), quantizes it with ``stream_weights=True`` and a work directory,
saves the sharded GPTQ checkpoint, and records seconds per layer, peak GPU memory, peak host memory
(RSS), and the disk used, next to the pre-flight estimate for the same run. The last step
extrapolates the measured per-layer cost to the full layer count.

    python benchmarks/quantize_streamed.py --layers 4 --workspace /tmp/q70 \
        --output benchmarks/results/quantize_streamed_llama70b_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import print_and_save

LLAMA_70B = dict(
    vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)
# --tiny: the same code path on a CPU-sized model (a smoke test of this script, not a measurement)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def write_random_checkpoint(directory: Path, layers: int, device: str) -> dict[str, int]:
    """A Llama-70B-shaped checkpoint with ``layers`` decoder layers of random bf16 weights, sharded per layer."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**LLAMA_70B, "num_hidden_layers": layers}, dtype="bfloat16")
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device).manual_seed(0)
    shards: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, param in skeleton.named_parameters():
        key = f"layer-{int(name.split('.')[2]):03d}" if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, []).append((name, tuple(param.shape)))
    weight_map, total = {}, 0
    for index, (_, tensors) in enumerate(sorted(shards.items())):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, shape in tensors:
            if name.endswith("norm.weight"):
                data[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                fan_in = shape[-1]
                data[name] = (torch.randn(shape, generator=generator, device=device) / fan_in**0.5).to(
                    torch.bfloat16).cpu()
            weight_map[name] = file
            total += data[name].numel() * 2
        save_file(data, str(directory / file), metadata={"format": "pt"})
        del data
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    return {"checkpoint_bytes": total, "shards": len(shards)}


def quantize(args: argparse.Namespace) -> dict:
    """Step 2 (own process): stream, quantize, save; measure."""
    from neural_quantization import QuantizationConfig, Quantizer
    from neural_quantization.models.loading import load_model
    from neural_quantization.models.preflight import estimate_run

    workspace = Path(args.workspace)
    if args.tiny:
        LLAMA_70B.update(TINY)
    device = torch.device("cpu" if args.tiny else "cuda")
    qconfig = QuantizationConfig(bits=4, group_size=128, num_samples=args.num_samples, seq_len=args.seq_len,
                                 calibration_batch_size=args.batch_size, device=str(device))
    loaded = load_model(workspace / "float", stream_weights=True)
    estimate = estimate_run(loaded.model, qconfig, args.num_samples, args.seq_len, device,
                            stream_weights=True, activations_on_host=args.offload_activations)
    ids = torch.randint(0, LLAMA_70B["vocab_size"], (args.num_samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    layer_done: list[float] = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, results = Quantizer(qconfig).quantize_model(
        loaded, ids, stream_weights=True, work_dir=workspace / "work", offload_activations=args.offload_activations,
        on_layer_done=lambda i, n: (sync(), layer_done.append(time.perf_counter())),
    )
    quantize_seconds = time.perf_counter() - start
    save_start = time.perf_counter()
    model.save_pretrained(workspace / "quantized")
    save_seconds = time.perf_counter() - save_start
    per_layer = [b - a for a, b in zip([start, *layer_done[:-1]], layer_done)]
    output_bytes = sum(f.stat().st_size for f in (workspace / "quantized").iterdir())
    return {
        "quantize_seconds": quantize_seconds,
        "save_seconds": save_seconds,
        "per_layer_seconds": per_layer,
        "median_layer_seconds": sorted(per_layer)[len(per_layer) // 2],
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "output_bytes": output_bytes,
        "estimate": estimate.to_dict(),
        "size_bytes": results.size_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers to build (Llama-3-70B has 80)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--offload-activations", action="store_true")
    parser.add_argument("--workspace", required=True, help="scratch directory (float and quantized checkpoints)")
    parser.add_argument("--tiny", action="store_true", help="smoke test on CPU with a tiny Llama shape")
    parser.add_argument("--step", choices=("all", "quantize"), default="all", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.tiny:
        LLAMA_70B.update(TINY)
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --tiny for a CPU smoke test)")
    device = "cuda" if not args.tiny else "cpu"
    workspace = Path(args.workspace)
    if args.step == "quantize":
        print(json.dumps(quantize(args)))
        return

    shutil.rmtree(workspace, ignore_errors=True)
    start = time.perf_counter()
    written = write_random_checkpoint(workspace / "float", args.layers, device)
    write_seconds = time.perf_counter() - start
    child = subprocess.run([sys.executable, *sys.argv, "--step", "quantize"], capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(child.stderr[-4000:])
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    hidden = LLAMA_70B["hidden_size"]
    kv_width = hidden // LLAMA_70B["num_attention_heads"] * LLAMA_70B["num_key_value_heads"]
    # q and o (hidden x hidden), k and v (hidden x kv_width), gate/up/down (hidden x intermediate)
    layer_params = 2 * hidden * (hidden + kv_width) + 3 * hidden * LLAMA_70B["intermediate_size"]
    full_layers = LLAMA_70B["num_hidden_layers"]
    quantized_dir = workspace / "quantized"
    layer_files = sorted(p for p in quantized_dir.glob("model-*.safetensors"))[:-1]
    per_layer_disk = sum(p.stat().st_size for p in layer_files) / len(layer_files)
    rest_bytes = measured["output_bytes"] - sum(p.stat().st_size for p in layer_files)
    document = {
        "benchmark": "quantize_streamed",
        "model": "Llama-3-70B config, random bf16 weights, streamed from a sharded safetensors checkpoint",
        "layers": args.layers,
        "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len, "batch_size": args.batch_size},
        "offload_activations": args.offload_activations,
        "write_checkpoint_seconds": write_seconds,
        "float_checkpoint_bytes": written["checkpoint_bytes"],
        "measured": measured,
        "layer_params": layer_params,
        "extrapolated_to_80_layers": {
            "note": "measured per-layer cost x 80 (median layer; the first layer includes kernel compilation)",
            "quantize_seconds": measured["median_layer_seconds"] * full_layers,
            "checkpoint_bytes": per_layer_disk * full_layers + rest_bytes,
            "float_checkpoint_bytes": layer_params * 2 * full_layers + (written["checkpoint_bytes"] - layer_params * 2
                                                                         * args.layers),
            "peak_gpu_memory_bytes": measured["peak_gpu_memory_bytes"],
            "peak_host_rss_bytes": measured["peak_host_rss_bytes"],
        },
        "environment": {
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    print(json.dumps({k: v for k, v in measured.items() if k not in ("estimate",)}, indent=1))
    print_and_save(document, args.output, omit=("measured",))


if __name__ == "__main__":
    main()
