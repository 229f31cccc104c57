"""Quality benchmark: fp vs RTN vs GPTQ, perplexity and KL per language, quantization time.

Protocol (../shared/BENCHMARKS.md): calibrate on ``{lang}.calib.txt`` (balanced over the languages),
evaluate on ``{lang}.eval.txt`` in windows of ``--eval-seq-len`` tokens (stride = length), the same
windows for every model. The reference model runs once; each quantized variant is built from a
fresh copy of it and compared against the stored reference statistics.

    python benchmarks/quality.py                       # smollm2-135m, W4 g64 and W8 per-channel
    python benchmarks/quality.py --max-windows 4       # quicker, fewer eval windows per language

Writes ``benchmarks/results/quality_<model>.json`` and prints a table. Nothing here is asserted:
the numbers are what they are.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import REPO, SHARED_DATA, measure_variant, summary_line

from neural_quantization import QuantizationConfig
from neural_quantization.calibration.sampling import calibration_from_source
from neural_quantization.calibration.sources import load_language_texts
from neural_quantization.config import DEFAULT_LANGUAGES
from neural_quantization.evaluation import reference_languages
from neural_quantization.models.loading import load_model
from neural_quantization.reporting.report import environment_info

VARIANTS = {
    "rtn-w4-g64": dict(method="rtn", bits=4, group_size=64),
    "gptq-w4-g64": dict(method="gptq", bits=4, group_size=64),
    "rtn-w8-perchannel": dict(method="rtn", bits=8, group_size=-1),
    "gptq-w8-perchannel": dict(method="gptq", bits=8, group_size=-1),
    # GPTQ options, compared with the same protocol (python benchmarks/quality.py --variants ...)
    "gptq-w4-g64-act-order": dict(method="gptq", bits=4, group_size=64, desc_act=True),
    "rtn-w4-g64-asym": dict(method="rtn", bits=4, group_size=64, sym=False),
    "gptq-w4-g64-asym": dict(method="gptq", bits=4, group_size=64, sym=False),
}
DEFAULT_VARIANTS = ["rtn-w4-g64", "gptq-w4-g64", "rtn-w8-perchannel", "gptq-w8-perchannel"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(SHARED_DATA), help="directory with {lang}.calib.txt and {lang}.eval.txt")
    parser.add_argument("--languages", nargs="+", default=list(DEFAULT_LANGUAGES))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows (balanced over languages)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=4, help="evaluation windows per language")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    loaded = load_model(args.model)
    reference, tokenizer = loaded.model, loaded.tokenizer
    eval_texts = load_language_texts(args.data, args.languages, split="eval")
    start = time.perf_counter()
    references = reference_languages(
        reference, tokenizer, eval_texts, seq_len=args.eval_seq_len, max_windows_per_language=args.max_windows
    )
    reference_seconds = time.perf_counter() - start
    calibration = calibration_from_source(
        args.data, tokenizer, args.languages, args.num_samples, args.seq_len, args.seed, split="calib"
    )

    variants = {}
    for name in args.variants:
        config = QuantizationConfig(
            **VARIANTS[name], num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
            target_languages=args.languages, device=args.device,
        )
        variants[name] = measure_variant(reference, tokenizer, loaded.source, config, calibration.input_ids, references)
        print(summary_line(name, variants[name]), flush=True)

    document = {
        "benchmark": "quality",
        "model": loaded.source,
        "protocol": {
            "calibration": {"source": str(args.data), "split": "calib", "num_samples": args.num_samples,
                            "seq_len": args.seq_len, "languages": args.languages, "seed": args.seed},
            "evaluation": {"split": "eval", "seq_len": args.eval_seq_len, "max_windows_per_language": args.max_windows,
                           "kl": "top-k lower bound (k=64) of KL(reference || quantized), mean over tokens"},
        },
        "reference": {
            "seconds": reference_seconds,
            "languages": {lang: {"ppl": ref.perplexity(), "tokens": ref.tokens} for lang, ref in references.items()},
        },
        "variants": variants,
        "environment": environment_info(str(next(reference.parameters()).device)),
    }
    if "rtn-w4-g64" in variants and "gptq-w4-g64" in variants:
        rtn, gptq = variants["rtn-w4-g64"]["avg_degradation_pct"], variants["gptq-w4-g64"]["avg_degradation_pct"]
        document["gptq_over_rtn_w4_avg_degradation"] = gptq / rtn if rtn else None
    output = Path(args.output or REPO / "benchmarks" / "results" / f"quality_{args.model}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
