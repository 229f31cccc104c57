"""Print the README's quality tables as Markdown, straight from the JSON in benchmarks/results/.

    python benchmarks/render_tables.py quality benchmarks/results/quality_smollm2-135m.json
    python benchmarks/render_tables.py calibration benchmarks/results/calibration_languages_gemma3-270m.json

Every number in those README sections comes from here, so none is typed in by hand.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _env(document: dict[str, Any]) -> str:
    env = document.get("environment", {})
    parts = [env.get("device_name") or env.get("device") or "", f"torch {env.get('torch', '?')}",
             f"transformers {env.get('transformers', '?')}", env.get("date", "")]
    return ", ".join(p for p in parts if p)


def quality(document: dict[str, Any]) -> str:
    variants = document["variants"]
    protocol = document["protocol"]
    lines = [
        f"`{document['model']}`; calibration: {protocol['calibration']['num_samples']} windows × "
        f"{protocol['calibration']['seq_len']} tokens from `*.calib.txt`, balanced over "
        f"{len(protocol['calibration']['languages'])} languages; evaluation: up to "
        f"{protocol['evaluation']['max_windows_per_language']} windows × {protocol['evaluation']['seq_len']} tokens "
        f"per language from `*.eval.txt`. Measured on {_env(document)}.",
        "",
        "| variant | avg Δppl | worst language | mean KL (nats) | compression (linears) | quantization time |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        worst = max(v["languages"].items(), key=lambda kv: kv[1]["degradation_pct"])
        lines.append(
            f"| {name} | {v['avg_degradation_pct']:+.2f} % | {worst[0]} {worst[1]['degradation_pct']:+.2f} % | "
            f"{v['mean_kl_divergence']:.4f} | {v['compression_ratio']:.2f}× | {v['quantization_seconds']:.0f} s |"
        )
    ratio = document.get("gptq_over_rtn_w4_avg_degradation")
    if ratio is not None:
        lines += ["", f"GPTQ W4 g64's average perplexity increase is {ratio:.2f} × RTN's."]
    langs = list(next(iter(variants.values()))["languages"])
    lines += ["", "Per language (Δppl %):", "",
              "| variant | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]
    ref = document["reference"]["languages"]
    lines.append("| reference ppl | " + " | ".join(f"{ref[lang]['ppl']:.1f}" for lang in langs) + " |")
    for name, v in variants.items():
        lines.append(f"| {name} | " + " | ".join(f"{v['languages'][lang]['degradation_pct']:+.1f}" for lang in langs) + " |")
    return "\n".join(lines)


def calibration(document: dict[str, Any]) -> str:
    variants = document["variants"]
    langs = list(variants["balanced"]["languages"])
    protocol = document["protocol"]
    lines = [
        f"`{document['model']}`, GPTQ W4 g{document['group_size']}, {protocol['calibration']['num_samples']} "
        f"calibration windows × {protocol['calibration']['seq_len']} tokens in both variants; evaluation: up to "
        f"{protocol['evaluation']['max_windows_per_language']} windows × {protocol['evaluation']['seq_len']} tokens "
        f"per language. Measured on {_env(document)}.",
        "",
        "| calibration | avg Δppl | worst language | mean KL (nats) |",
        "|---|---|---|---|",
    ]
    for name, v in variants.items():
        worst = max(v["languages"].items(), key=lambda kv: kv[1]["degradation_pct"])
        lines.append(f"| {name} | {v['avg_degradation_pct']:+.2f} % | {worst[0]} {worst[1]['degradation_pct']:+.2f} % "
                     f"| {v['mean_kl_divergence']:.4f} |")
    lines += ["", "| language | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]
    for name, v in variants.items():
        lines.append(f"| Δppl, {name} | " + " | ".join(f"{v['languages'][lang]['degradation_pct']:+.1f}" for lang in langs) + " |")
    for name, v in variants.items():
        lines.append(f"| KL, {name} | " + " | ".join(f"{v['languages'][lang]['kl_divergence']:.3f}" for lang in langs) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("quality", "calibration"):
        raise SystemExit(__doc__)
    with open(argv[1]) as f:
        document = json.load(f)
    print(quality(document) if argv[0] == "quality" else calibration(document))


if __name__ == "__main__":
    main(sys.argv[1:])
