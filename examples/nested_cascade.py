"""Nested INT8 -> INT4 cascade: one checkpoint that loads at 8 bits or, exactly, at 4 bits.

What it shows: ``QuantizationConfig(cascade_stages=[8, 4], cascade_mode="nested")``. The 4-bit codes
are the high 4 bits of the 8-bit codes (``code8 = 16 * code4 + r``), so the saved checkpoint is an
ordinary 8-bit GPTQ checkpoint that any GPTQ loader reads, and ``load_quantized(dir, bits=4)`` reads
the 4-bit model inside it (``codes >> 4``, ``scales * 16``) without a second file. In memory,
``narrow_model(model, 4)`` from ``neural_quantization.models.cascade`` does the same. The script
prints each stage's measured compression and GPTQ loss, then compares the two reads' logits.

Run it:

    python examples/nested_cascade.py --output-dir ./smollm2-nested
"""

import argparse
from pathlib import Path

import torch

from neural_quantization import QuantizationConfig, Quantizer, load_quantized
from neural_quantization.models.cascade import narrow_model
from neural_quantization.models.loading import load_model

PROMPT = "The river rose over its banks last spring, and volunteers carried sandbags through the night."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in alias, local directory, .gguf or hub id")
    parser.add_argument("--output-dir", type=Path, default=Path("smollm2-135m-nested"))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--languages", nargs="+", default=["en", "fr", "de", "es"])
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier checkpoint of this script")
    args = parser.parse_args()

    config = QuantizationConfig(bits=4, group_size=args.group_size, cascade_stages=[8, 4], cascade_mode="nested",
                                num_samples=args.num_samples, seq_len=args.seq_len)
    loaded = load_model(args.model)
    model, results = Quantizer(config).quantize_model(loaded, calibration_data=None, target_languages=args.languages)
    print(f"{'stage':<7}{'bits':>4}{'compression':>13}{'mean GPTQ loss':>16}{'seconds':>9}  read")
    for stage in results.stages:
        print(f"{stage['stage']:<7}{stage['bits']:>4}{stage['compression_ratio']:>12.2f}x"
              f"{stage['mean_loss']:>16.4g}{stage['seconds']:>9.1f}  {stage['role']}")
    model.save_pretrained(args.output_dir, overwrite=args.overwrite)  # stores the 8-bit codes

    dtype = loaded.model.dtype  # load both reads in the dtype the in-memory model computes in
    wide = load_quantized(args.output_dir, dtype=dtype)            # the stored 8-bit model
    narrow = load_quantized(args.output_dir, dtype=dtype, bits=4)  # the 4-bit model inside the same files
    narrow_model(model, 4)                                         # in memory: the same 4-bit read, in place
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        w8, w4, in_memory = (m(ids).logits.float() for m in (wide, narrow, model))
    print(f"\n{args.output_dir}: one checkpoint, two reads, on {ids.shape[1]} prompt tokens")
    print(f"max |logits 8-bit - 4-bit|: {(w8 - w4).abs().max():.4f}; "
          f"same next token: {(w8.argmax(-1) == w4.argmax(-1)).float().mean():.1%}")
    print(f"4-bit read from disk equals narrow_model(model, 4) in memory: {torch.equal(w4, in_memory)}")


if __name__ == "__main__":
    main()
