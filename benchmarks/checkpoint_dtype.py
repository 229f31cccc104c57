"""Which 16-bit dtype can a checkpoint's unquantized tensors (and the model loaded from it) use?

Quantizes gemma3-270m (RTN, W4 g64: the dtype question does not depend on the solver), saves it,
loads it back with ``load_quantized(dtype=...)`` in float16 and bfloat16, and compares the logits
on one sentence with the quantized model running in float32: finite or not, largest difference,
agreement of the greedy token. This is the measurement behind ``checkpoint_dtype``'s default
(bfloat16 for sources that record no 16-bit dtype).

    python benchmarks/checkpoint_dtype.py      # writes benchmarks/results/checkpoint_dtype_gemma3-270m.json
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from common import REPO, print_and_save

from neural_quantization import QuantizationConfig, Quantizer, load_quantized
from neural_quantization.models.loading import load_model
from neural_quantization.reporting.report import environment_info

TEXT = "The history of the city begins in the twelfth century, when merchants from the north settled by the river."


def main(model_name: str = "gemma3-270m") -> None:
    loaded = load_model(model_name)
    ids = loaded.tokenizer([TEXT], return_tensors="pt").input_ids
    config = QuantizationConfig(method="rtn", bits=4, group_size=64)
    model, _ = Quantizer(config).quantize_model(copy.deepcopy(loaded.model), None, tokenizer=loaded.tokenizer)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model.save_pretrained(Path(tmp) / "ckpt")
        reference = model(ids).logits.float()
        for dtype in (torch.float16, torch.bfloat16):
            logits = load_quantized(Path(tmp) / "ckpt", dtype=dtype)(ids).logits.float()
            finite = bool(torch.isfinite(logits).all())
            rows.append({"dtype": str(dtype).removeprefix("torch."), "logits_finite": finite,
                         "max_abs_difference_vs_float32": float((logits - reference).abs().max()) if finite else None,
                         "greedy_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean())})
            print(rows[-1], flush=True)
    print_and_save({"benchmark": "checkpoint_dtype", "model": model_name, "environment": environment_info(),
                    "config": config.to_dict(), "tokens": int(ids.numel()), "rows": rows},
                   str(REPO / "benchmarks" / "results" / f"checkpoint_dtype_{model_name}.json"))


if __name__ == "__main__":
    main()
