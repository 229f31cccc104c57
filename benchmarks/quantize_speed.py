"""How long GPTQ takes on a Mistral-7B-shaped model on one GPU (the pipeline's per-layer cost).

GPTQ's cost depends on shapes, not values, so the model is built from Mistral-7B's config with
random bf16 weights directly on the GPU, and calibrated on random token ids (default 128 × 2048).

    python benchmarks/quantize_speed.py --layers 32 --output benchmarks/results/quantize_speed_h100.json

Records seconds per decoder layer and in total, peak GPU and CPU memory, the per-linear solve times
and where the time went (``phases``: capturing layer-0 inputs, calibration forwards that collect
Hessians, GPTQ solves, forwards producing the next layer's inputs; each timed with a device sync).
"""

from __future__ import annotations

import argparse
import datetime
import resource
import time

import torch
from common import print_and_save
from transformers import AutoModelForCausalLM, MistralConfig

from neural_quantization import QuantizationConfig, Quantizer
from neural_quantization.models import sequential

MISTRAL_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
)


# pipeline steps timed separately (functions of models/sequential.py)
PHASES = {"capture_inputs": "capture_layer_inputs", "find_groups": "linear_groups",
          "hessian_forwards": "collect_hessians", "next_layer_forwards": "run_block"}


def synchronize_all() -> None:
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


def time_pipeline_phases(seconds: dict[str, float]) -> None:
    """Wrap the pipeline's steps so each adds its synchronized wall time to ``seconds``."""
    for phase, function_name in PHASES.items():
        original = getattr(sequential, function_name)

        def timed(*args, _original=original, _phase=phase, **kwargs):
            synchronize_all()
            start = time.perf_counter()
            result = _original(*args, **kwargs)
            synchronize_all()
            seconds[_phase] = seconds.get(_phase, 0.0) + time.perf_counter() - start
            return result

        setattr(sequential, function_name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers to build (Mistral-7B has 32)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    parser.add_argument("--kernel-backend", default="auto")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs sharing the work (cuda:0 … cuda:N-1)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")

    torch.manual_seed(0)
    config = MistralConfig(**{**MISTRAL_7B, "num_hidden_layers": args.layers})
    start = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    build_seconds = time.perf_counter() - start
    ids = torch.randint(0, config.vocab_size, (args.num_samples, args.seq_len))
    qconfig = QuantizationConfig(
        bits=4, group_size=128, num_samples=args.num_samples, seq_len=args.seq_len,
        calibration_batch_size=args.batch_size, device="cuda", kernel_backend=args.kernel_backend,
    )
    layer_done: list[float] = []
    phases: dict[str, float] = {}
    time_pipeline_phases(phases)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    _, results = Quantizer(qconfig).quantize_model(
        model, ids, model_name="mistral-7b-shaped (random bf16)",
        on_layer_done=lambda i, n: (synchronize_all(), layer_done.append(time.perf_counter())),
        devices=[f"cuda:{i}" for i in range(args.gpus)],
    )
    synchronize_all()
    total = time.perf_counter() - start
    per_layer = [b - a for a, b in zip([start, *layer_done[:-1]], layer_done)]
    solve_by_kind: dict[str, float] = {}
    for layer in results.layers:
        kind = layer["name"].rsplit(".", 1)[-1]
        solve_by_kind[kind] = solve_by_kind.get(kind, 0.0) + layer["seconds"]
    document = {
        "benchmark": "quantize_speed",
        "model": "Mistral-7B config, random bf16 weights",
        "layers": args.layers,
        "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len, "batch_size": args.batch_size},
        "gpus": args.gpus,
        "config": qconfig.to_dict(),
        "build_seconds": build_seconds,
        "total_seconds": total,
        "first_layer_seconds": per_layer[0],
        "median_layer_seconds": sorted(per_layer)[len(per_layer) // 2],
        "per_layer_seconds": per_layer,
        "solve_seconds_by_linear": solve_by_kind,
        "phases_seconds": {**phases, "gptq_solves": sum(solve_by_kind.values())},
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(0) / 2**30,
        "peak_cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "environment": {
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    print_and_save(document, args.output, omit=("per_layer_seconds",))


if __name__ == "__main__":
    main()
