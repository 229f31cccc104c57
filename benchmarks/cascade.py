"""Cascade benchmark: direct RTN / GPTQ at 4 bits against the sequential (8 → 4) and nested cascades.

For each model and each grid (the model's group size, and per-channel), in one run:

* ``rtn-w4``           round to nearest, 4 bits
* ``gptq-w4``          direct GPTQ, 4 bits
* ``gptq-w8``          direct GPTQ, 8 bits (what the nested 8-bit read is compared with)
* ``cascade-seq-8-4``  sequential cascade: GPTQ to 8 bits, then GPTQ of that model to 4 bits,
                       recalibrated through the 8-bit model
* ``nested-8-4@4`` / ``nested-8-4@8``: one nested checkpoint (saved, then loaded with
                       ``load_quantized(dir, bits=4)`` and ``bits=8``)

Protocol (../shared/BENCHMARKS.md): calibrate on ``{lang}.calib.txt`` (windows balanced over the
languages), evaluate on ``{lang}.eval.txt`` in windows of ``--eval-seq-len`` tokens (stride = length),
the same windows for every model; perplexity degradation and mean KL per language against the float
model. Quantization time is the wall time of ``quantize_model`` on this machine (shared CPUs: noisy).

    python benchmarks/cascade.py --models smollm2-135m             # defaults: 32 x 256 calib, 2 x 512 eval
    python benchmarks/cascade.py --models gemma3-270m --max-windows 1
    python benchmarks/cascade.py --models smollm2-135m=/path/SmolLM2.gguf --device cuda   # alias=file

``--device cuda`` keeps the whole float model on the GPU (float32 by default, as on the CPU) and
uses the torch reference matmul of QuantLinear (``kernel_backend="torch"``), so CPU and GPU runs
compute the same thing; the GPU only makes it faster.

Writes ``benchmarks/results/cascade_<model>.json`` (rewritten after every variant) and prints a
table. Nothing here is asserted: the numbers are what they are.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from neural_quantization import QuantizationConfig, Quantizer, load_quantized
from neural_quantization.calibration.sampling import calibration_from_source
from neural_quantization.calibration.sources import load_language_texts
from neural_quantization.config import DEFAULT_LANGUAGES
from neural_quantization.evaluation import compare_languages, reference_languages
from neural_quantization.models.cascade import packed_sizes, quantized_linears
from neural_quantization.models.loading import load_model
from neural_quantization.reporting.report import environment_info

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "multilingual"
GROUP_SIZES = {"smollm2-135m": 64, "gemma3-270m": 128}
VARIANTS = {
    "rtn-w4": dict(method="rtn", bits=4),
    "gptq-w4": dict(method="gptq", bits=4),
    "gptq-w8": dict(method="gptq", bits=8),
    "cascade-seq-8-4": dict(method="gptq", bits=4, cascade_stages=[8, 4], cascade_mode="sequential"),
    "nested-8-4": dict(method="gptq", bits=4, cascade_stages=[8, 4], cascade_mode="nested"),
}


def grid_name(group_size: int) -> str:
    return "per-channel" if group_size == -1 else f"g{group_size}"


def summarize(per_language: dict) -> dict[str, Any]:
    langs = {lang: r.to_dict() for lang, r in per_language.items()}
    degradations = [r["degradation_pct"] for r in langs.values()]
    return {
        "avg_degradation_pct": sum(degradations) / len(degradations),
        "worst_degradation_pct": max(degradations),
        "worst_language": max(langs, key=lambda lang: langs[lang]["degradation_pct"]),
        "mean_kl_divergence": sum(r["kl_divergence"] for r in langs.values()) / len(langs),
        "languages": langs,
    }


def compact_stages(stages: list[dict]) -> list[dict]:
    """Stages with their per-layer losses as [name, loss] pairs (the JSON stays readable)."""
    out = []
    for stage in stages:
        entry = {k: v for k, v in stage.items() if k != "layers"}
        entry["layer_losses"] = [[layer["name"], layer["loss"]] for layer in stage["layers"]]
        out.append(entry)
    return out


def measured_compression(model: torch.nn.Module) -> float:
    layers = quantized_linears(model)
    return sum(m.in_features * m.out_features * 2 for m in layers) / packed_sizes(layers)


def run_model(args: argparse.Namespace, model_spec: str) -> None:
    model_name, _, model_path = model_spec.partition("=")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    loaded = load_model(model_path or model_name, device=device, dtype=args.dtype)
    reference, tokenizer = loaded.model, loaded.tokenizer
    print(f"[{model_name}] loaded in {time.perf_counter() - start:.0f} s", flush=True)
    eval_texts = load_language_texts(args.data, args.languages, split="eval")
    start = time.perf_counter()
    references = reference_languages(
        reference, tokenizer, eval_texts, seq_len=args.eval_seq_len, max_windows_per_language=args.max_windows
    )
    reference_seconds = time.perf_counter() - start
    print(f"[{model_name}] reference pass {reference_seconds:.0f} s", flush=True)
    calibration = calibration_from_source(
        args.data, tokenizer, args.languages, args.num_samples, args.seq_len, args.seed, split="calib"
    )
    group_sizes = [GROUP_SIZES.get(model_name, 128), -1] if args.group_sizes is None else args.group_sizes
    suffix = "" if args.group_sizes is None else "." + "_".join(grid_name(g) for g in group_sizes)
    output = Path(args.output_dir) / f"cascade_{model_name}{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "benchmark": "cascade",
        "model": model_name,
        "model_source": loaded.source,
        "protocol": {
            "calibration": {"source": str(args.data), "split": "calib", "num_samples": args.num_samples,
                            "seq_len": args.seq_len, "languages": args.languages, "seed": args.seed,
                            "balanced": True, "tokens_per_language": dict(calibration.tokens_per_language)},
            "evaluation": {"split": "eval", "seq_len": args.eval_seq_len, "max_windows_per_language": args.max_windows,
                           "kl": "top-k lower bound (k=64) of KL(reference || quantized), mean over tokens"},
            "timing": "quantization_seconds: wall time of quantize_model on this machine (shared CPU cores)",
        },
        "reference": {
            "seconds": reference_seconds,
            "languages": {lang: {"ppl": ref.perplexity(), "tokens": ref.tokens} for lang, ref in references.items()},
        },
        "grids": {},
        "environment": {**environment_info(str(next(reference.parameters()).device)),
                        "torch_threads": torch.get_num_threads()},
    }

    def write() -> None:
        output.write_text(json.dumps(document, indent=2) + "\n")

    for group_size in group_sizes:
        results_here: dict[str, Any] = {}
        document["grids"][grid_name(group_size)] = {"group_size": group_size, "variants": results_here}
        for name in args.variants:
            config = QuantizationConfig(
                **VARIANTS[name], group_size=group_size, num_samples=args.num_samples, seq_len=args.seq_len,
                seed=args.seed, target_languages=args.languages, device=device, kernel_backend="torch",
            )
            model, results = Quantizer(config).quantize_model(
                copy.deepcopy(reference), calibration.input_ids, tokenizer=tokenizer, model_name=loaded.source
            )
            common = {
                "config": config.to_dict(),
                "quantization_seconds": results.quantization_seconds,
                "mean_layer_loss": results.mean_layer_loss,
                "stages": compact_stages(results.stages),
            }
            if config.cascade_mode == "nested" and config.cascade_stages:
                with tempfile.TemporaryDirectory() as tmp:
                    path = model.save_pretrained(Path(tmp) / "nested")
                    del model
                    gc.collect()
                    for bits in config.cascade_stages[::-1]:  # narrow read first
                        read = load_quantized(path, bits=bits, device=device, kernel_backend="torch")
                        stage = next(s for s in results.stages if s["bits"] == bits)
                        entry = {**common, "read_bits": bits, "compression_ratio": measured_compression(read),
                                 "stage_mean_layer_loss": stage["mean_loss"],
                                 **summarize(compare_languages(read, references))}
                        results_here[f"{name}@{bits}"] = entry
                        report_line(model_name, group_size, f"{name}@{bits}", entry)
                        del read
                        gc.collect()
                        write()
                continue
            entry = {**common, "compression_ratio": measured_compression(model),
                     **summarize(compare_languages(model, references))}
            results_here[name] = entry
            report_line(model_name, group_size, name, entry)
            del model
            gc.collect()
            write()
    print(f"wrote {output}", flush=True)


def report_line(model: str, group_size: int, name: str, entry: dict[str, Any]) -> None:
    print(f"[{model} {grid_name(group_size)}] {name:>16}: avg Δppl {entry['avg_degradation_pct']:+7.2f} %  "
          f"worst {entry['worst_degradation_pct']:+7.2f} % ({entry['worst_language']})  "
          f"KL {entry['mean_kl_divergence']:.4f}  ratio {entry['compression_ratio']:.2f}x  "
          f"time {entry['quantization_seconds']:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"],
                        help="aliases, or alias=path to use a local copy of the model (e.g. a .gguf file)")
    parser.add_argument("--data", default=str(DATA), help="directory with {lang}.calib.txt and {lang}.eval.txt")
    parser.add_argument("--languages", nargs="+", default=list(DEFAULT_LANGUAGES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--group-sizes", type=int, nargs="+", default=None,
                        help="grids to run (default: the model's group size, then -1 = per-channel)")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows (balanced over languages)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=2, help="evaluation windows per language")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float dtype of the reference model")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 is much faster for GPTQ's column loop on busy shared cores")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="instead of running: merge the grids of several result files of one model into --output")
    parser.add_argument("--output", default=None, help="with --merge: the merged file")
    parser.add_argument("--table", nargs="+", default=None, metavar="JSON",
                        help="instead of running: print the Markdown table of result files")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, Path(args.output))
        return
    if args.table:
        print(markdown_table(args.table))
        return
    torch.set_num_threads(args.threads)
    for model_name in args.models:
        run_model(args, model_name)


def merge(paths: list[str], output: Path) -> None:
    """Combine runs of one model over different grids (same protocol, same reference windows)."""
    documents = [json.loads(Path(p).read_text()) for p in paths]
    merged = documents[0]
    for doc in documents[1:]:
        if doc["model"] != merged["model"] or doc["protocol"] != merged["protocol"]:
            raise SystemExit(f"cannot merge: model or protocol differ between {paths[0]} and another file")
        if doc["reference"]["languages"] != merged["reference"]["languages"]:
            raise SystemExit("cannot merge: the reference perplexities differ (different windows?)")
        merged["grids"].update(doc["grids"])
    merged["merged_from"] = [Path(p).name for p in paths]
    output.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {output}")


def markdown_table(paths: list[str]) -> str:
    """The README table: every number read from the result files."""
    lines = [
        "| model | grid | variant | bits read | compression | avg Δppl % | worst Δppl % (lang) | mean KL | quantization s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        doc = json.loads(Path(path).read_text())
        for grid, block in doc["grids"].items():
            for name, v in block["variants"].items():
                bits = v.get("read_bits", v["config"]["bits"])
                lines.append(
                    f"| {doc['model']} | {grid} | {name} | {bits} | {v['compression_ratio']:.2f}× | "
                    f"{v['avg_degradation_pct']:+.2f} | {v['worst_degradation_pct']:+.2f} ({v['worst_language']}) | "
                    f"{v['mean_kl_divergence']:.4f} | {v['quantization_seconds']:.0f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
