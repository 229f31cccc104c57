"""Print the README's quality tables as Markdown, straight from the JSON in benchmarks/results/.

    python benchmarks/render_tables.py quality benchmarks/results/quality_smollm2-135m.json
    python benchmarks/render_tables.py calibration benchmarks/results/calibration_languages_gemma3-270m.json
    python benchmarks/render_tables.py kernels benchmarks/results/kernels_h100.json
    python benchmarks/render_tables.py kernel_shapes benchmarks/results/kernels_h100.json
    python benchmarks/render_tables.py kernels_tinygemm benchmarks/results/kernels_h100_bf16.json
    python benchmarks/render_tables.py e2e benchmarks/results/e2e_h100.json
    python benchmarks/render_tables.py e2e benchmarks/results/e2e_h100_compiled.json
    python benchmarks/render_tables.py speed benchmarks/results/quantize_speed_h100.json \
        benchmarks/results/quantize_speed_llmcompressor_h100.json benchmarks/results/quantize_speed_h100x2_1gpu.json \
        benchmarks/results/quantize_speed_h100x2_2gpu.json benchmarks/results/quantize_streamed_llama70b_h100.json

Every number in those README sections comes from here, so none is typed in by hand.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _env(document: dict[str, Any]) -> str:
    env = document.get("environment", {})
    parts = [env.get("device_name") or env.get("device") or "", f"torch {env.get('torch', '?')}",
             f"transformers {env['transformers']}" if env.get("transformers") else "", env.get("date", "")[:10]]
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


def kernels(document: dict[str, Any]) -> str:
    env = document["environment"]
    summary = [row for row in document["summary"] if row["dtype"] == "float16"]
    lines = [
        f"{env['device']}, torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, {env['date'][:10]}; "
        f"int{document['settings']['bits']} group {document['settings']['group_size']}, fp16 activations, "
        "Mistral-7B layer shapes (qkv, o, gate_up, down), times inside CUDA graphs; ratio = fp16 cuBLAS time / ours.",
        "",
        "| M | " + " | ".join(str(r["M"]) for r in summary) + " |",
        "|---|" + "---|" * len(summary),
        "| sum of 4 shapes, fp16 cuBLAS µs | " + " | ".join(f"{r['dense_graph_us']:.1f}" for r in summary) + " |",
        "| sum of 4 shapes, ours µs | " + " | ".join(f"{r['ours_graph_us']:.1f}" for r in summary) + " |",
        "| speed-up, sum of shapes | " + " | ".join(f"{r['sum_ratio_graph']:.2f}×" for r in summary) + " |",
        "| speed-up, slowest shape | " + " | ".join(f"{r['min_shape_ratio_graph']:.2f}×" for r in summary) + " |",
        "| speed-up without PDL (sum; slowest shape) | " + " | ".join(
            f"{r.get('sum_ratio_graph_nopdl', r['sum_ratio_graph']):.2f}×; "
            f"{r.get('min_shape_ratio_graph_nopdl', r['min_shape_ratio_graph']):.2f}×" for r in summary) + " |",
        "| speed-up without graphs (eager) | " + " | ".join(f"{r['sum_ratio_eager']:.2f}×" for r in summary) + " |",
    ]
    return "\n".join(lines)


def kernel_shapes(document: dict[str, Any], batch_sizes: tuple[int, ...] = (1, 8, 16)) -> str:
    """One row per (shape, M) with the tuner's pick, for M in ``batch_sizes``."""
    lines = [
        "| shape | M | dense µs | ours µs | ratio | no-PDL µs | no-PDL ratio | GB/s | config |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in document["results"]:
        if r["M"] in batch_sizes:
            nopdl = r.get("ours_nopdl_graph_us", r["ours_graph_us"])
            lines.append(
                f"| {r['shape']} | {r['M']} | {r['dense_graph_us']:.1f} | {r['ours_graph_us']:.1f} | "
                f"{r['ratio_graph']:.2f}× | {nopdl:.1f} | {r['dense_graph_us'] / nopdl:.2f}× | "
                f"{r['ours_GBps']:.0f} | {r['ours_config']} |"
            )
    return "\n".join(lines)


def kernels_tinygemm(document: dict[str, Any]) -> str:
    """Layer sums against cuBLAS and PyTorch's int4 kernel (tinygemm) measured in the same run."""
    lines = [
        "| M | dense µs (sum) | ours µs (sum) | ours ratio | no-PDL ratio | tinygemm ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in document["summary"]:
        tinygemm = r.get("tinygemm_sum_ratio_graph")
        lines.append(
            f"| {r['M']} | {r['dense_graph_us']:.1f} | {r['ours_graph_us']:.1f} | {r['sum_ratio_graph']:.2f}× | "
            f"{r.get('sum_ratio_graph_nopdl', r['sum_ratio_graph']):.2f}× | "
            + (f"{tinygemm:.2f}× |" if tinygemm else "– |")
        )
    return "\n".join(lines)


def e2e(document: dict[str, Any]) -> str:
    env = document["environment"]
    fused = document.get("int4_fused")
    lines = [
        f"{env['device']}, torch {env['torch']}, {env['date'][:10]}: Mistral-7B-shaped model with random fp16 weights, "
        f"{document['settings']['quantization']}, static KV cache, one decode step "
        + ("compiled with torch.compile (both precisions) and " if document["settings"].get("compiled") else "")
        + "captured in a CUDA graph"
        + ("; \"fused\": the same int4 model after `fuse_projections` (q/k/v and gate/up one matmul each)."
           if fused else "."),
        "",
        "| batch | fp16 tokens/s | int4 tokens/s | int4 / fp16 |"
        + (" int4 fused tokens/s | fused / fp16 |" if fused else "") + " peak memory fp16 → int4 |",
        "|---|---|---|---|" + ("---|---|" if fused else "") + "---|",
    ]
    for index, (fp, q) in enumerate(zip(document["fp16"], document["int4"])):
        row = (f"| {fp['batch']} | {fp['tokens_per_s_graph']:.1f} | {q['tokens_per_s_graph']:.1f} | "
               f"{q['tokens_per_s_graph'] / fp['tokens_per_s_graph']:.2f}× |")
        if fused:
            f = fused[index]
            row += f" {f['tokens_per_s_graph']:.1f} | {f['tokens_per_s_graph'] / fp['tokens_per_s_graph']:.2f}× |"
        lines.append(row + f" {fp['peak_memory_gib']:.1f} → {q['peak_memory_gib']:.1f} GiB |")
    profiled = [(name, rows[0]) for name, rows in (("fp16", document["fp16"]), ("int4", document["int4"]),
                                                   ("int4 fused", fused or [])) if rows and "profile" in rows[0]]
    if profiled:
        categories: list[str] = []
        for _, row in profiled:
            categories += [c for c in row["profile"]["ms_per_step_by_category"] if c not in categories]
        lines += ["", f"Where a batch-{profiled[0][1]['batch']} step's time goes (ms per step, torch.profiler over "
                  "graph replays; idle = step time minus kernel time):", "",
                  "| ms per step | " + " | ".join(name for name, _ in profiled) + " |",
                  "|---|" + "---|" * len(profiled)]
        for category in categories:
            lines.append(f"| {category} | " + " | ".join(
                f"{row['profile']['ms_per_step_by_category'].get(category, 0.0):.2f}" for _, row in profiled) + " |")
        lines.append("| idle between kernels | " + " | ".join(
            f"{row['profile']['idle_ms_per_step']:.2f}" for _, row in profiled) + " |")
        lines.append("| **step** | " + " | ".join(f"**{row['step_ms_graph']:.2f}**" for _, row in profiled) + " |")
        lines.append("| kernels per step | " + " | ".join(
            f"{row['profile']['kernels_per_step']:.0f}" for _, row in profiled) + " |")
    return "\n".join(lines)


def speed(ours: dict[str, Any], llmc: dict[str, Any], one_gpu: dict[str, Any], two_gpus: dict[str, Any],
          streamed: dict[str, Any]) -> str:
    """Quantization time: ours vs llm-compressor (same machine), 1 vs 2 GPUs, and the 70B-shaped streamed run."""
    cal = ours["calibration"]
    gib = 2**30
    lines = [
        f"Mistral-7B-shaped model (32 layers, random bf16 weights built on the GPU), W4 g128, {cal['num_samples']} × "
        f"{cal['seq_len']} calibration tokens; {_env(ours)}.",
        "",
        "| run | total | median layer | GPTQ solves | forwards (Hessians + next inputs) | peak GPU | peak host RSS |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name: str, d: dict[str, Any]) -> str:
        phases = d.get("phases_seconds", {})
        forwards = phases.get("hessian_forwards", 0) + phases.get("next_layer_forwards", 0) or phases.get(
            "layer_forwards", 0)
        return (f"| {name} | {d['total_seconds']:.1f} s | {d['median_layer_seconds']:.2f} s | "
                f"{phases.get('gptq_solves', 0):.1f} s | {forwards:.1f} s | {d['peak_gpu_memory_gib']:.1f} GiB | "
                f"{d['peak_cpu_rss_gib']:.1f} GiB |")

    env = llmc["environment"]
    lines.append(row("neural-quantization, 1 GPU", ours))
    lines.append(row(f"llm-compressor {env.get('llmcompressor', '?')} (defaults: batch 1, activations on CPU), "
                     "same machine", llmc))
    lines += ["", f"neural-quantization is {llmc['total_seconds'] / ours['total_seconds']:.2f}× faster here.", "",
              f"Two GPUs ({_env(two_gpus)}), same call, same model and tokens:", "",
              "| run | total | median layer | GPTQ solves | forwards (Hessians + next inputs) | peak GPU | "
              "peak host RSS |", "|---|---|---|---|---|---|---|",
              row("1 GPU", one_gpu), row("2 GPUs", two_gpus), "",
              f"Speed-up with 2 GPUs: {one_gpu['total_seconds'] / two_gpus['total_seconds']:.2f}× (with 2 GPUs the "
              "solve column adds up solves that ran at the same time on different GPUs)."]
    m, x = streamed["measured"], streamed["extrapolated_to_80_layers"]
    lines += [
        "",
        f"Llama-3-70B-shaped model, {streamed['layers']} layers streamed from a sharded bf16 safetensors checkpoint "
        f"on disk ({_env(streamed)}), same calibration and config:",
        "",
        "| | measured, " + f"{streamed['layers']} layers | 80 layers (per-layer cost × 80) |",
        "|---|---|---|",
        f"| time | {m['quantize_seconds']:.1f} s (median layer {m['median_layer_seconds']:.2f} s), save "
        f"{m['save_seconds']:.1f} s | {x['quantize_seconds'] / 60:.1f} min |",
        f"| peak GPU memory | {m['peak_gpu_memory_bytes'] / gib:.1f} GiB | same (one layer at a time) |",
        f"| peak host RSS | {m['peak_host_rss_bytes'] / gib:.1f} GiB | same (embeddings + lm_head + one layer) |",
        f"| disk: float checkpoint read | {streamed['float_checkpoint_bytes'] / gib:.1f} GiB | "
        f"{x['float_checkpoint_bytes'] / gib:.0f} GiB |",
        f"| disk: quantized checkpoint written | {m['output_bytes'] / gib:.1f} GiB | {x['checkpoint_bytes'] / gib:.1f} "
        "GiB |",
        f"| pre-flight estimate (GPU / host) | {m['estimate']['device_peak_bytes'] / gib:.1f} / "
        f"{m['estimate']['host_peak_bytes'] / gib:.1f} GiB | |",
    ]
    return "\n".join(lines)


def checkpoint_size(document: dict[str, Any]) -> str:
    """benchmarks/checkpoint_size.py: saved checkpoint against the deploy-report estimate from its config."""
    mib = 2**20
    lines = [_env(document), "",
             "| model | grid | unquantized tensors | checkpoint | estimate from config | checkpoint / estimate | "
             "whole model vs fp16 | linears vs fp16 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in document["rows"]:
        lines.append(f"| {r['model']} | {r['grid']} | {r['unquantized_dtype']} | {r['checkpoint_bytes'] / mib:.1f} MiB "
                     f"| {r['estimated_bytes'] / mib:.1f} MiB | {r['checkpoint_over_estimate']:.3f}× | "
                     f"{r['model_compression_ratio']:.2f}× | {r['linear_compression_ratio']:.2f}× |")
    return "\n".join(lines)


def quality_peers(document: dict[str, Any]) -> str:
    """benchmarks/quality_peers.py: ours and llm-compressor on identical calibration ids, two evaluation sets."""
    p = document["protocol"]
    sets = list(document["runs"][0]["evaluation"])
    v = document.get("versions", {})
    head = (f"`{document['model']}`, W{p['bits']} group {p['group_size']}; calibration {p['calibration']['num_samples']} "
            f"× {p['calibration']['seq_len']} tokens from `*.calib.txt` over {', '.join(p['languages'])} (the same ids "
            f"for both tools); evaluation: up to {p['evaluation']['max_windows_per_language']} windows × "
            f"{p['evaluation']['seq_len']} tokens per language on {' and '.join(sets)}. llm-compressor "
            f"{v.get('llmcompressor')}, compressed-tensors {v.get('compressed-tensors')}, transformers "
            f"{v.get('transformers')}. {_env(document)}.")
    lines = [head, "", "| tool | setting | " + " | ".join(f"{name} avg Δppl | worst | KL" for name in sets)
             + " | quantization time |", "|---|---|" + "---|---|---|" * len(sets) + "---|"]
    for run in document["runs"]:
        if "error" in run:
            lines.append(f"| {run['tool']} | {run['setting']} | failed: {run['error'][:80]} |" + " |" * (3 * len(sets)))
            continue
        cells = []
        for name in sets:
            e = run["evaluation"][name]
            worst = max(e["languages"].items(), key=lambda kv: kv[1]["degradation_pct"])
            cells += [f"{e['avg_degradation_pct']:+.2f} %", f"{worst[0]} {worst[1]['degradation_pct']:+.1f} %",
                      f"{e['mean_kl_divergence']:.4f}"]
        lines.append(f"| {run['tool']} | {run['setting']} | " + " | ".join(cells)
                     + f" | {run['quantization_seconds']:.0f} s |")
    ratios = quality_peers_ratios(document)
    if ratios:
        lines += ["", "Ratios of average perplexity increase (" + " / ".join(sets) + "): "
                  + "; ".join(f"{label} {' / '.join(f'{r:.2f}×' for r in values)}" for label, values in ratios.items())
                  + "."]
    return "\n".join(lines)


def quality_peers_ratios(document: dict[str, Any]) -> dict[str, list[float]]:
    """The issue's yardsticks, per evaluation set: our default against theirs, our best preset against
    the best of their settings, our best against our round to nearest."""
    runs = [r for r in document["runs"] if "error" not in r]
    sets = list(runs[0]["evaluation"]) if runs else []

    def avg(tool: str, setting: str | None = None) -> list[float] | None:
        chosen = [r for r in runs if r["tool"] == tool and (setting is None or r["setting"] == setting)]
        if not chosen:
            return None
        return [min(r["evaluation"][n]["avg_degradation_pct"] for r in chosen) for n in sets]

    out = {}
    pairs = {"our default / their default": (avg("ours", "gptq"), avg("llm-compressor", "gptq")),
             "our best preset / their best setting": (avg("ours", "best"), avg("llm-compressor")),
             "our best preset / our RTN": (avg("ours", "best"), avg("ours", "rtn"))}
    for label, (a, b) in pairs.items():
        if a and b:
            out[label] = [x / y for x, y in zip(a, b)]
    return out


RENDERERS = {"quality_peers": quality_peers, "checkpoint_size": checkpoint_size, "quality": quality, "calibration": calibration, "kernels": kernels, "kernel_shapes": kernel_shapes,
             "kernels_tinygemm": kernels_tinygemm, "e2e": e2e, "speed": speed}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in RENDERERS:
        raise SystemExit(__doc__)
    documents = []
    for path in argv[1:]:
        with open(path) as f:
            documents.append(json.load(f))
    print(RENDERERS[argv[0]](*documents))


if __name__ == "__main__":
    main(sys.argv[1:])
