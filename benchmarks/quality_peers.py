"""Side-by-side quality against llm-compressor: the same float model, calibration ids and evaluation windows.

Both tools quantize a fresh copy of the same float model (SmolLM2-135M dequantized from its GGUF)
from the *same* calibration token ids (``calibration_from_source`` over
``../shared/data/multilingual/{lang}.calib.txt``, balanced over the languages); each result is
compared with the float model on two evaluation sets, the eval half of the calibration corpus and
a second domain (``../shared/data/cv-sentences/{lang}.txt``, never used for calibration), on the
same token windows (the reference statistics are computed once per set).

Settings (``--settings``), each for both tools unless noted, on the grid of ``--bits`` /
``--group-size`` (symmetric unless "asym"):

=================  ==========================================  =======================================
setting            ours                                        llm-compressor 0.14
=================  ==========================================  =======================================
rtn                ``method="rtn"``                            ``QuantizationModifier`` (round to nearest)
gptq               ``QuantizationConfig()`` defaults           ``GPTQModifier`` defaults (actorder static)
gptq-nogptaq       defaults, ``gptaq=False``                   (none)
gptq-noact         ``desc_act=False, static_groups=False``     ``actorder=None``
gptq-static        ``desc_act=True, static_groups=True``       ``actorder="static"``
gptq-static-asym   the same, ``sym=False``                     the same, ``symmetric=False``
gptq-mse           defaults, ``clip="mse"``                    defaults, ``observer="mse"``
gptq-imatrix       (none: ours is ``gptq``)                    defaults, ``observer="imatrix-mse"``
gptq-rotate        defaults, ``rotate=True``                   (none)
best               ``QuantizationConfig.from_preset("best")``  (none)
best-nogptaq       the same, ``gptaq=False``                   (none)
awq                defaults, ``awq=True``                      (none; AutoAWQ is another tool)
awq-nogptaq        the same, ``gptaq=False``                   (none)
best-awq           ``from_preset("best", awq=True)``           (none)
=================  ==========================================  =======================================

The settings named after one of llm-compressor's use our min/max grid (``clip="minmax"``, their
"minmax" observer) and no asymmetric calibration (``gptaq=False``: theirs has none), so the pair
differs only in the solver (``gptq-mse``: only in the clip search); ``gptq`` is each tool's default
as a user gets it (ours: the clip search on GPTQ's objective and GPTAQ's asymmetric calibration).

Both use block size 128 and 1 % damping (their ``dampening_frac``, our ``damp_percent``).

llm-compressor 0.14 pins transformers <= 5.17 and compressed-tensors 0.19, so it runs in its own
virtual environment that sees this project (``--system-site-packages``)::

    python -m venv --system-site-packages /tmp/venv-llmc
    /tmp/venv-llmc/bin/pip install "transformers==5.17.0" "compressed-tensors==0.19.0" datasets loguru
    /tmp/venv-llmc/bin/pip install --no-deps llmcompressor==0.14.0.1
    /tmp/venv-llmc/bin/python benchmarks/quality_peers.py

Writes ``benchmarks/results/quality_peers_<model>.json`` (per language: perplexities, increase,
KL). Nothing is asserted: the numbers are what they are.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import tempfile
import time
from typing import Any

import torch
from common import REPO, SECOND_DOMAIN, SHARED_DATA, print_and_save

from neural_quantization import QuantizationConfig, Quantizer
from neural_quantization.calibration.sampling import calibration_from_source
from neural_quantization.calibration.sources import load_language_texts
from neural_quantization.evaluation import compare_languages, reference_languages
from neural_quantization.models.loading import load_model
from neural_quantization.reporting.report import environment_info

SETTINGS = ("rtn", "gptq", "gptq-nogptaq", "gptq-noact", "gptq-static", "gptq-static-asym", "gptq-mse", "gptq-imatrix",
            "gptq-rotate", "best", "best-nogptaq", "awq", "awq-nogptaq",
            "best-awq")
THEIRS = ("rtn", "gptq", "gptq-noact", "gptq-static", "gptq-static-asym", "gptq-mse", "gptq-imatrix")


def our_config(setting: str, bits: int, group_size: int, num_samples: int, seq_len: int) -> QuantizationConfig | None:
    """Our configuration for ``setting`` (None: the setting has no counterpart of ours)."""
    base = dict(bits=bits, group_size=group_size, num_samples=num_samples, seq_len=seq_len)
    paired = dict(base, gptaq=False)  # the settings named after one of theirs: the same objective as theirs
    minmax = dict(paired, clip="minmax")
    return {
        "rtn": QuantizationConfig(method="rtn", **base),
        "gptq": QuantizationConfig(**base),
        "gptq-nogptaq": QuantizationConfig(**paired),
        "gptq-noact": QuantizationConfig(desc_act=False, static_groups=False, **minmax),
        "gptq-static": QuantizationConfig(desc_act=True, static_groups=True, **minmax),
        "gptq-static-asym": QuantizationConfig(desc_act=True, static_groups=True, sym=False, **minmax),
        "gptq-mse": QuantizationConfig(clip="mse", **paired),
        "gptq-imatrix": None,  # theirs only: their activation-weighted MSE observer; ours is "gptq" (the default)
        "gptq-rotate": QuantizationConfig(rotate=True, **base),
        "best": QuantizationConfig.from_preset("best", **base),
        "best-nogptaq": QuantizationConfig.from_preset("best", gptaq=False, **base),
        "awq": QuantizationConfig(awq=True, **base),  # activation-aware scales before GPTQ (core/awq.py)
        "awq-nogptaq": QuantizationConfig(awq=True, **paired),
        "best-awq": QuantizationConfig.from_preset("best", awq=True, **base),
    }[setting]


def llmcompressor_modifier(setting: str, bits: int, group_size: int) -> Any:
    """llm-compressor's modifier for ``setting`` on the same grid (its lm_head stays float, as ours)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=not setting.endswith("asym"),
                               strategy="channel" if group_size == -1 else "group",
                               group_size=None if group_size == -1 else group_size,
                               observer={"gptq-mse": "mse", "gptq-imatrix": "imatrix-mse"}.get(setting, "minmax"))
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if setting == "rtn":
        return QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    kwargs = {} if setting in ("gptq", "gptq-mse", "gptq-imatrix") else {"actorder": None if setting == "gptq-noact" else "static"}
    return GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=128, dampening_frac=0.01, **kwargs)


def run_llmcompressor(model: torch.nn.Module, tokenizer: Any, ids: torch.Tensor, setting: str, bits: int,
                      group_size: int) -> tuple[torch.nn.Module, float]:
    from datasets import Dataset
    from llmcompressor import oneshot

    model = copy.deepcopy(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # {"quant_method": "gguf"}: the source file's, not the float model's
    with tempfile.TemporaryDirectory() as tmp:  # oneshot re-reads the config from _name_or_path
        model.config.save_pretrained(tmp)
        model.config._name_or_path = tmp
        start = time.perf_counter()
        oneshot(model=model, processor=tokenizer, dataset=Dataset.from_dict({"input_ids": ids.tolist()}),
                recipe=llmcompressor_modifier(setting, bits, group_size), num_calibration_samples=len(ids),
                max_seq_length=ids.shape[1])
        seconds = time.perf_counter() - start
    return model.eval(), seconds


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    values = [r["degradation_pct"] for r in results.values()]
    return {"avg_degradation_pct": sum(values) / len(values), "worst_degradation_pct": max(values),
            "mean_kl_divergence": sum(r["kl_divergence"] for r in results.values()) / len(results),
            "languages": results}


def awq_summary(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """What AWQ did over the model: one entry per group of linears (they share their input's scales)."""
    groups = {layer["awq"]["source"] or layer["name"]: layer["awq"] for layer in layers if layer.get("awq")}
    searched = [g for g in groups.values() if g["source"]]
    scaled = [g for g in searched if g["alpha"]]
    return {"groups": len(groups), "groups_without_source": len(groups) - len(searched),
            "groups_scaled": len(scaled), "groups_alpha_0": len(searched) - len(scaled),
            "mean_alpha": sum(g["alpha"] for g in searched) / max(len(searched), 1),
            "mean_rtn_error_ratio": sum(g["rtn_error"] / g["rtn_error_unscaled"] for g in scaled) / max(len(scaled), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--languages", nargs="+", default=["en", "de", "ru", "zh", "ar"])
    parser.add_argument("--eval-languages", nargs="+", default=None,
                        help="languages to evaluate (default: the calibration languages); others than those "
                             "calibrated on check the settings on text the calibration never saw")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--tools", nargs="+", default=["ours", "llm-compressor"], choices=["ours", "llm-compressor"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=6, help="evaluation windows per language and set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    output = args.output or str(REPO / "benchmarks" / "results" / f"quality_peers_{args.model}.json")

    torch.manual_seed(args.seed)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    calib = calibration_from_source(str(SHARED_DATA), tokenizer, args.languages, args.num_samples, args.seq_len,
                                    args.seed)
    ids = calib.input_ids
    eval_languages = args.eval_languages or args.languages
    sets = {"multilingual-eval": load_language_texts(str(SHARED_DATA), eval_languages, split="eval"),
            "cv-sentences": load_language_texts(str(SECOND_DOMAIN), eval_languages, split="eval")}
    references = {name: reference_languages(model, tokenizer, texts, seq_len=args.eval_seq_len,
                                            max_windows_per_language=args.max_windows, show_progress=False)
                  for name, texts in sets.items()}
    runs = []
    for setting in args.settings:
        for tool in args.tools:
            if tool == "llm-compressor" and setting not in THEIRS:
                continue
            if tool == "ours":
                config = our_config(setting, args.bits, args.group_size, args.num_samples, args.seq_len)
                if config is None:
                    continue
                quantized, results = Quantizer(config).quantize_model(copy.deepcopy(model), ids, tokenizer=tokenizer)
                seconds, described = results.quantization_seconds, config.to_dict()
                extra = {"awq": awq_summary(results.layers)} if config.awq else {}
            else:
                described, extra = repr(llmcompressor_modifier(setting, args.bits, args.group_size)), {}
                try:
                    quantized, seconds = run_llmcompressor(model, tokenizer, ids, setting, args.bits, args.group_size)
                except Exception as err:  # a setting their release cannot run is recorded, not fatal
                    runs.append({"tool": tool, "setting": setting, "config": described, "error": repr(err)})
                    print(f"{tool:>15} {setting:<17} failed: {err!r}", flush=True)
                    continue
            evaluated = {name: summarize({lang: r.to_dict() for lang, r in compare_languages(quantized, ref).items()})
                         for name, ref in references.items()}
            runs.append({"tool": tool, "setting": setting, "config": described, "quantization_seconds": seconds,
                         "evaluation": evaluated, **extra})
            line = "  ".join(f"{name} {e['avg_degradation_pct']:+.2f} % (KL {e['mean_kl_divergence']:.4f})"
                             for name, e in evaluated.items())
            print(f"{tool:>15} {setting:<17} {line}  [{seconds:.0f} s]", flush=True)
            del quantized
    versions = {name: _version(name) for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")}
    print_and_save({
        "benchmark": "quality_peers", "model": args.model, "environment": environment_info(), "versions": versions,
        "protocol": {"languages": args.languages, "eval_languages": eval_languages, "bits": args.bits, "group_size": args.group_size,
                     "calibration": {"source": str(SHARED_DATA), "split": "calib", "num_samples": args.num_samples,
                                     "seq_len": args.seq_len, "seed": args.seed,
                                     "ids_sha256": _sha256(ids), "same_ids_for_both_tools": True},
                     "evaluation": {"sets": {"multilingual-eval": f"{SHARED_DATA}/{{lang}}.eval.txt",
                                             "cv-sentences": f"{SECOND_DOMAIN}/{{lang}}.txt"},
                                    "seq_len": args.eval_seq_len, "max_windows_per_language": args.max_windows}},
        "runs": runs,
    }, output, omit=("runs",))


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(ids: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()


if __name__ == "__main__":
    main()
