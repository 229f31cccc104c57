"""Mixed precision at equal size against uniform widths, on held-out text of two domains.

    python benchmarks/mixed_precision.py --model smollm2-135m --target-bits 3.5

1. ``analyze`` sweep (round to nearest, one decoder layer at a time, widths 3 4 8, group 128) on
   held-out windows sampled from ``../shared/data/multilingual/*.calib.txt`` with another seed than
   the calibration windows (the evaluation sets below are never seen by the plan);
2. the plan (``analysis/mixed_precision.plan_widths``) for ``--target-bits`` (scales counted);
3. GPTQ with our defaults (group 128) three times from the same calibration token ids: the mixed
   plan, uniform W4 and uniform W3; each is scored per language against the float model on
   ``multilingual/*.eval.txt`` and ``cv-sentences/*.txt`` (a second domain), same windows for all.

Writes ``benchmarks/results/mixed_precision_<model>.json``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import REPO, SECOND_DOMAIN, SHARED_DATA, print_and_save

from neural_quantization import QuantizationConfig, Quantizer
from neural_quantization.analysis.mixed_precision import layer_bytes, plan_widths
from neural_quantization.analysis.sensitivity import layer_sensitivity
from neural_quantization.calibration.sampling import calibration_from_source
from neural_quantization.calibration.sources import load_language_texts
from neural_quantization.evaluation import compare_languages, reference_languages
from neural_quantization.models.loading import load_model
from neural_quantization.nn.modules import find_decoder_layers, find_linear_layers


def summarize(languages: dict) -> dict:
    values = [r["degradation_pct"] for r in languages.values()]
    return {"avg_degradation_pct": sum(values) / len(values),
            "mean_kl_divergence": sum(r["kl_divergence"] for r in languages.values()) / len(languages),
            "languages": languages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target-bits", type=float, default=3.5)
    parser.add_argument("--languages", nargs="+", default=["en", "de", "ru", "zh", "ar"])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sweep-windows", type=int, default=5, help="held-out windows of the sweep (>= one per language)")
    parser.add_argument("--sweep-seq-len", type=int, default=256)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    output = args.output or str(REPO / "benchmarks" / "results" / f"mixed_precision_{args.model}.json")
    torch.manual_seed(args.seed)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    calib = calibration_from_source(str(SHARED_DATA), tokenizer, args.languages, args.num_samples, args.seq_len, args.seed)
    sweep_ids = calibration_from_source(str(SHARED_DATA), tokenizer, args.languages, args.sweep_windows,
                                        args.sweep_seq_len, args.seed + 100).input_ids
    start = time.perf_counter()
    sensitivity = layer_sensitivity(model, sweep_ids, bits=(3, 4, 8), group_size=args.group_size)
    prefix, layers = find_decoder_layers(model)
    shapes = [[(m.in_features, m.out_features) for m in find_linear_layers(layer).values()] for layer in layers]
    plan = plan_widths(sensitivity, shapes, args.target_bits, prefix)
    sweep_seconds = time.perf_counter() - start
    weights = sum(k * n for s in shapes for k, n in s)
    uniform_bits = {b: 8 * sum(layer_bytes(s, b, args.group_size) for s in shapes) / weights for b in (3, 4)}
    print(f"plan {plan['widths']} -> {plan['average_bits']:.3f} bits/weight; uniform W4 {uniform_bits[4]:.3f}, "
          f"W3 {uniform_bits[3]:.3f}; sweep {sweep_seconds:.0f} s", flush=True)
    sets = {"multilingual-eval": load_language_texts(str(SHARED_DATA), args.languages, split="eval"),
            "cv-sentences": load_language_texts(str(SECOND_DOMAIN), args.languages, split="eval")}
    references = {name: reference_languages(model, tokenizer, texts, seq_len=args.eval_seq_len,
                                            max_windows_per_language=args.max_windows, show_progress=False)
                  for name, texts in sets.items()}
    base = dict(group_size=args.group_size, num_samples=args.num_samples, seq_len=args.seq_len)
    variants = {"mixed": QuantizationConfig(bits=plan["bits"], dynamic=plan["dynamic"], **base),
                "uniform-w4": QuantizationConfig(bits=4, **base), "uniform-w3": QuantizationConfig(bits=3, **base)}
    runs = {}
    for name, config in variants.items():
        quantized, results = Quantizer(config).quantize_model(copy.deepcopy(model), calib.input_ids, tokenizer=tokenizer)
        evaluated = {s: summarize({lang: r.to_dict() for lang, r in compare_languages(quantized, ref).items()})
                     for s, ref in references.items()}
        bits = plan["average_bits"] if name == "mixed" else uniform_bits[4 if name.endswith("w4") else 3]
        runs[name] = {"bits_per_weight": bits, "quantization_seconds": results.quantization_seconds,
                      "evaluation": evaluated}
        print(f"{name:>11} {bits:.3f} bits: " + "  ".join(
            f"{s} {e['avg_degradation_pct']:+.2f} % (KL {e['mean_kl_divergence']:.4f})" for s, e in evaluated.items()),
            flush=True)
        del quantized
    print_and_save({"benchmark": "mixed_precision", "model": args.model, "target_bits": args.target_bits,
                    "plan": plan, "sweep_seconds": sweep_seconds, "sensitivity": sensitivity,
                    "protocol": {"languages": args.languages, "calibration": {"num_samples": args.num_samples,
                                 "seq_len": args.seq_len, "seed": args.seed},
                                 "sweep": {"windows": args.sweep_windows, "seq_len": args.sweep_seq_len,
                                           "seed": args.seed + 100, "source": f"{SHARED_DATA}/*.calib.txt"},
                                 "evaluation": {"seq_len": args.eval_seq_len, "max_windows": args.max_windows}},
                    "runs": runs}, output, omit=("sensitivity",))


if __name__ == "__main__":
    main()
