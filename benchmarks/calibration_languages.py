"""Does balanced multilingual calibration help? English-only vs all 15 languages, same token budget.

On ``gemma3-270m`` (multilingual), GPTQ W4 g128 calibrated (a) on English text only and (b) on the
15 languages, balanced, with the same number of windows and tokens; both evaluated per language on
``{lang}.eval.txt`` against the same reference windows.

    python benchmarks/calibration_languages.py
    python benchmarks/calibration_languages.py --model smollm2-135m --group-size 64

Writes ``benchmarks/results/calibration_languages_<model>.json`` and a PNG chart beside it.
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


def plot(document: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    langs = list(document["variants"]["balanced"]["languages"])
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.4
    for offset, name in ((-width / 2, "english-only"), (width / 2, "balanced")):
        values = [document["variants"][name]["languages"][lang]["degradation_pct"] for lang in langs]
        ax.bar([i + offset for i in range(len(langs))], values, width, label=f"calibrated: {name}")
    ax.set_xticks(range(len(langs)))
    ax.set_xticklabels(langs)
    ax.set_ylabel("perplexity increase, %")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title(f"{document['model']}: GPTQ W4 g{document['group_size']}, English-only vs balanced calibration")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--data", default=str(SHARED_DATA))
    parser.add_argument("--languages", nargs="+", default=list(DEFAULT_LANGUAGES))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=60, help="calibration windows, both variants")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=2, help="evaluation windows per language")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    loaded = load_model(args.model)
    reference, tokenizer = loaded.model, loaded.tokenizer
    start = time.perf_counter()
    references = reference_languages(
        reference, tokenizer, load_language_texts(args.data, args.languages, split="eval"),
        seq_len=args.eval_seq_len, max_windows_per_language=args.max_windows,
    )
    reference_seconds = time.perf_counter() - start
    calibrations = {
        "english-only": calibration_from_source(args.data, tokenizer, ["en"], args.num_samples, args.seq_len, args.seed),
        "balanced": calibration_from_source(
            args.data, tokenizer, args.languages, args.num_samples, args.seq_len, args.seed
        ),
    }
    variants = {}
    for name, calibration in calibrations.items():
        config = QuantizationConfig(
            bits=4, group_size=args.group_size, num_samples=args.num_samples, seq_len=args.seq_len,
            seed=args.seed, target_languages=list(calibration.languages), device=args.device,
        )
        variants[name] = measure_variant(reference, tokenizer, loaded.source, config, calibration.input_ids, references)
        variants[name]["calibration_languages"] = list(calibration.languages)
        print(summary_line(name, variants[name]), flush=True)

    document = {
        "benchmark": "calibration_languages",
        "model": loaded.source,
        "group_size": args.group_size,
        "protocol": {
            "calibration": {"split": "calib", "num_samples": args.num_samples, "seq_len": args.seq_len,
                            "seed": args.seed, "same token budget": True},
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
    output = Path(args.output or REPO / "benchmarks" / "results" / f"calibration_languages_{args.model}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n")
    plot(document, output.with_suffix(".png"))
    print(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
