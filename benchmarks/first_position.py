"""Does the first position of each calibration window dominate GPTQ's Hessian? (issue 15's hypothesis)

The first token of a window (BOS or not) carries "massive activations" in many LLMs: a few channels
orders of magnitude above the rest. If they dominate ``H = 2/n Σ x xᵀ``, GPTQ fits the layer to
that position and generalises worse. This script measures, on the protocol of
``quality_peers.py`` (SmolLM2-135M, 32 × 512 calibration tokens over en/de/ru/zh/ar, two
evaluation sets):

1. how much of ``trace(H)`` of each decoder layer's q/k/v input (after the input norm) and
   down-projection input comes from position 0, and the largest |activation| there against the
   median position's;
2. the quality of GPTQ when the Hessians leave out the first ``k`` positions of every window
   (``k = 0, 1, 4``), and with twice the calibration windows, for plain GPTQ (no act-order,
   min/max grid: the setting that generalised badly) and for our defaults.

Leaving positions out is done here by wrapping the pipeline's Hessian accumulation
(``models/sequential.accumulate_hessian``) for the duration of a run: an experiment, not an option
of the library. Writes ``benchmarks/results/first_position_<model>.json``.
"""

from __future__ import annotations

import argparse
import copy
import time
from contextlib import contextmanager
from typing import Any

import torch
from common import REPO, SECOND_DOMAIN, SHARED_DATA, print_and_save

import neural_quantization.models.sequential as sequential
from neural_quantization import QuantizationConfig, Quantizer
from neural_quantization.calibration.sampling import calibration_from_source
from neural_quantization.calibration.sources import load_language_texts
from neural_quantization.evaluation import compare_languages, reference_languages
from neural_quantization.nn.modules import find_decoder_layers
from neural_quantization.models.loading import load_model
from neural_quantization.reporting.report import environment_info


@contextmanager
def hessians_without_first_positions(skip: int):
    """Inside the block, every Hessian the pipeline accumulates ignores the first ``skip`` positions."""
    original = sequential.accumulate_hessian

    def accumulate(hessian, n_tokens, inputs):
        if skip and inputs.dim() == 3:
            inputs = inputs[:, skip:]
        return original(hessian, n_tokens, inputs)

    sequential.accumulate_hessian = accumulate
    try:
        yield
    finally:
        sequential.accumulate_hessian = original


@torch.no_grad()
def first_position_share(model: torch.nn.Module, ids: torch.Tensor, batch: int = 8) -> list[dict[str, Any]]:
    """Per decoder layer: share of trace(H) from position 0, and max|x| at position 0 / at the median
    position, for the q_proj input and the down_proj input."""
    _, layers = find_decoder_layers(model)
    sums: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def hook(index: int, kind: str):
        def pre(module, args):
            x = args[0].float()  # (batch, seq, K)
            entry = sums.setdefault((index, kind), {"energy": torch.zeros(x.shape[1], device=x.device),
                                                    "peak": torch.zeros(x.shape[1], device=x.device)})
            entry["energy"] += x.pow(2).sum(dim=(0, 2))
            entry["peak"] = torch.maximum(entry["peak"], x.abs().amax(dim=(0, 2)))
        return pre

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.self_attn.q_proj.register_forward_pre_hook(hook(index, "q_proj input")))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook(index, "down_proj input")))
    device = next(model.parameters()).device
    try:
        for chunk in ids.split(batch):
            model(input_ids=chunk.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for (index, kind), entry in sorted(sums.items()):
        energy, peak = entry["energy"], entry["peak"]
        rows.append({"layer": index, "input": kind, "position0_share_of_trace": float(energy[0] / energy.sum()),
                     "uniform_share": 1 / energy.numel(),
                     "peak_position0_over_median_position": float(peak[0] / peak[1:].median())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--languages", nargs="+", default=["en", "de", "ru", "zh", "ar"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    output = args.output or str(REPO / "benchmarks" / "results" / f"first_position_{args.model}.json")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    loaded = load_model(args.model, dtype="float32", device=str(device))
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = {n: calibration_from_source(str(SHARED_DATA), tokenizer, args.languages, n, args.seq_len, 0).input_ids
           for n in (args.num_samples, 2 * args.num_samples)}
    sets = {"multilingual-eval": load_language_texts(str(SHARED_DATA), args.languages, split="eval"),
            "cv-sentences": load_language_texts(str(SECOND_DOMAIN), args.languages, split="eval")}
    references = {name: reference_languages(model, tokenizer, texts, seq_len=512,
                                            max_windows_per_language=args.max_windows, show_progress=False)
                  for name, texts in sets.items()}
    shares = first_position_share(model, ids[args.num_samples])

    base = dict(bits=args.bits, group_size=args.group_size, seq_len=args.seq_len, device=str(device))
    solvers = {"plain GPTQ (no act-order, min/max)": dict(desc_act=False, static_groups=False, clip="minmax"),
               "default GPTQ": {}}
    variants = [(solver, skip, n) for solver in solvers for skip, n in
                ((0, args.num_samples), (1, args.num_samples), (4, args.num_samples), (0, 2 * args.num_samples))]
    runs = []
    for solver, skip, n in variants:
        config = QuantizationConfig(num_samples=n, **base, **solvers[solver])
        start = time.perf_counter()
        with hessians_without_first_positions(skip):
            quantized, _ = Quantizer(config).quantize_model(copy.deepcopy(model), ids[n], tokenizer=tokenizer)
        seconds = time.perf_counter() - start
        evaluation = {}
        for name, ref in references.items():
            langs = {lang: r.to_dict() for lang, r in compare_languages(quantized, ref).items()}
            evaluation[name] = {"avg_degradation_pct": sum(r["degradation_pct"] for r in langs.values()) / len(langs),
                                "mean_kl_divergence": sum(r["kl_divergence"] for r in langs.values()) / len(langs),
                                "languages": langs}
        runs.append({"solver": solver, "skipped_first_positions": skip, "num_samples": n, "seconds": seconds,
                     "evaluation": evaluation})
        print(f"{solver:<36} skip {skip}  windows {n:>3}  " + "  ".join(
            f"{k} {v['avg_degradation_pct']:+.2f} % (KL {v['mean_kl_divergence']:.4f})" for k, v in evaluation.items()),
            flush=True)
        del quantized
    print_and_save({"benchmark": "first_position", "model": args.model, "environment": environment_info(),
                    "protocol": {"languages": args.languages, "bits": args.bits, "group_size": args.group_size,
                                 "seq_len": args.seq_len, "device": str(device)},
                    "position0": shares, "runs": runs}, output, omit=("position0", "runs"))


if __name__ == "__main__":
    main()
