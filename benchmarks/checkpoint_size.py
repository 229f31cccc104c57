"""Checkpoint size benchmark: what a saved checkpoint weighs, against the deploy-report estimate.

For each model and grid, quantize with RTN (the stored layout does not depend on the solver),
save the checkpoint through the CLI's own path (``save_pretrained``), and compare

* the bytes of its weight files (``model.safetensors``), measured;
* what ``deploy-report`` estimates from the model's config alone for the same bits / group size;
* the whole-model compression against the fp16 model (``results.model_compression_ratio``) and
  the dtype the unquantized tensors were stored in.

    python benchmarks/checkpoint_size.py                          # smollm2-135m, W4 g64 and g128
    python benchmarks/checkpoint_size.py --models smollm2-135m gemma3-270m

Writes ``benchmarks/results/checkpoint_size.json``. Nothing is asserted here; the test suite
checks the property (checkpoint ≤ 1.05 × estimate) on a tiny model.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from common import REPO, print_and_save

from neural_quantization import QuantizationConfig, Quantizer
from neural_quantization.deploy.memory import memory_report
from neural_quantization.models.loading import load_model
from neural_quantization.reporting.report import environment_info

GRIDS = {"w4-g64": dict(bits=4, group_size=64), "w4-g128": dict(bits=4, group_size=128),
         "w8-perchannel": dict(bits=8, group_size=-1)}


def measure(model_name: str, grids: list[str]) -> list[dict]:
    loaded = load_model(model_name)
    rows = []
    for grid in grids:
        settings = GRIDS[grid]
        config = QuantizationConfig(method="rtn", **settings)
        model, results = Quantizer(config).quantize_model(copy.deepcopy(loaded.model), None,
                                                          tokenizer=loaded.tokenizer, model_name=loaded.source)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ckpt"
            model.save_pretrained(out)
            measured = memory_report(out)
            stored = json.loads((out / "config.json").read_text())["dtype"]
            config_only = Path(tmp) / "config.json"
            config_only.write_text((out / "config.json").read_text())
            estimated = memory_report(config_only, bits=settings["bits"], group_size=settings["group_size"])
        measured_bytes = measured.weights["gptq"]["bytes"]
        estimated_bytes = estimated.weights["gptq"]["bytes"]
        rows.append({
            "model": model_name, "grid": grid, "settings": settings, "unquantized_dtype": stored,
            "checkpoint_bytes": measured_bytes, "estimated_bytes": estimated_bytes,
            "checkpoint_over_estimate": measured_bytes / estimated_bytes,
            "model_compression_ratio": results.model_compression_ratio,
            "linear_compression_ratio": results.final_compression_ratio,
            "fp16_reference_bytes": results.size_bytes["reference"],
        })
        print(f"{model_name} {grid}: checkpoint {measured_bytes / 2**20:.1f} MiB, estimate "
              f"{estimated_bytes / 2**20:.1f} MiB ({measured_bytes / estimated_bytes:.3f}×), whole model "
              f"{results.model_compression_ratio:.2f}× fp16, unquantized tensors {stored}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--grids", nargs="+", default=["w4-g64", "w4-g128", "w8-perchannel"], choices=list(GRIDS))
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "checkpoint_size.json"))
    args = parser.parse_args()
    start = time.time()
    rows = [row for model in args.models for row in measure(model, args.grids)]
    print_and_save({"benchmark": "checkpoint_size", "environment": environment_info(), "rows": rows,
                    "seconds": round(time.time() - start, 1)}, args.output)


if __name__ == "__main__":
    main()
