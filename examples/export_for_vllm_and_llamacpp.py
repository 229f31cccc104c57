"""Quantize once, export twice: compressed-tensors for vLLM and GPTQ + GGUF (Q4_0) for llama.cpp.

What it shows: a config that both formats can hold (checked with each format's
``check_export_config`` *before* any work: GGUF needs symmetric groups of 32; compressed-tensors
needs 4 or 8 bits and contiguous groups), one GPTQ run, then
``export_compressed_tensors`` (``neural_quantization.export.compressed_tensors``) and
``save_checkpoint_with_gguf`` (``neural_quantization.export.gguf``). The .gguf holds GPTQ's own
codes (Q4_0's grid is ours at group size 32), not llama.cpp's round to nearest.

Run it:

    python examples/export_for_vllm_and_llamacpp.py --output-dir ./smollm2-exports
    vllm serve ./smollm2-exports/smollm2-135m-w4g32-compressed-tensors
    llama-cli -m ./smollm2-exports/smollm2-135m-w4g32-gguf/smollm2-135m-w4g32-gguf-Q4_0.gguf -p "Hello"

GGUF export supports Llama-architecture models (llama, mistral). ``--bits 8`` writes Q8_0 instead.
"""

import argparse
from pathlib import Path

from neural_quantization import QuantizationConfig, Quantizer
from neural_quantization.export.compressed_tensors import check_export_config as check_for_vllm
from neural_quantization.export.compressed_tensors import export_compressed_tensors
from neural_quantization.export.gguf import check_export_config as check_for_gguf
from neural_quantization.export.gguf import save_checkpoint_with_gguf
from neural_quantization.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in alias, local directory, .gguf or hub id")
    parser.add_argument("--output-dir", type=Path, default=Path("smollm2-exports"))
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--languages", nargs="+", default=["en", "fr", "de", "es"])
    args = parser.parse_args()

    config = QuantizationConfig(bits=args.bits, group_size=32, sym=True,  # one GGUF block = one group
                                num_samples=args.num_samples, seq_len=args.seq_len)
    check_for_vllm(config)  # both raise with the fix before anything is loaded
    check_for_gguf(config)

    loaded = load_model(args.model)
    model, results = Quantizer(config).quantize_model(loaded, calibration_data=None, target_languages=args.languages)
    print(f"quantized {len(results.layers)} linears in {results.quantization_seconds:.1f} s")

    name = f"{Path(args.model).name}-w{args.bits}g32"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    vllm_dir = export_compressed_tensors(
        model, args.output_dir / f"{name}-compressed-tensors", tokenizer=loaded.tokenizer)
    print(f"vLLM:      vllm serve {vllm_dir}")

    # A model loaded from a .gguf (the built-in aliases) passes that file on, so its metadata and
    # tokenizer are copied; otherwise they are built from the config and a byte-level BPE tokenizer.
    source = loaded.resolved.gguf_file and Path(loaded.resolved.path) / loaded.resolved.gguf_file
    gguf_dir, report = save_checkpoint_with_gguf(
        model, args.output_dir / f"{name}-gguf", tokenizer=loaded.tokenizer, source_gguf=source or None)
    print(f"llama.cpp: llama-cli -m {report.path} -p 'Hello'   ({report.gguf_type}, "
          f"{report.file_bytes / 2**20:.1f} MiB; GPTQ checkpoint beside it in {gguf_dir})")
    if report.clamped_codes:
        print(f"note: {report.clamped_codes} codes at -128 were written as -127 (Q8_0 holds -127..127)")


if __name__ == "__main__":
    main()
