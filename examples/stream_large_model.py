"""Quantize a model larger than host memory: its decoder layers stream from disk, one at a time.

What it shows: ``Quantizer(config).quantize_model(model_dir, texts, stream_weights=True,
work_dir=...)``. The model is built with its decoder layers on ``meta``; each layer is read from
the safetensors checkpoint just before it is solved, written to the work directory when done, and
dropped, so host memory stays near one layer plus the embeddings. ``model.save_pretrained(dir)``
then assembles the sharded checkpoint from the work directory. An interrupted run continues from
its last finished layer with ``--resume`` and gives the same checkpoint.

Run it:

    python examples/stream_large_model.py --model ./Llama-3-70B --output-dir ./llama70b-w4 \\
        --calibration-data ./our-texts/ --num-samples 128 --seq-len 2048
    python examples/stream_large_model.py --output-dir ./smollm2-streamed   # the small built-in model

Streaming reads safetensors; the built-in aliases are GGUF files, so for them the script first
writes the float model as safetensors next to the output (``OUTPUT_DIR.float``). Calibration text
must be given (``--calibration-data``: a file or a directory of ``{lang}.txt``) or the built-in
sentences below are used: a model whose layers are on disk cannot write its own.
"""

import argparse
import shutil
import sys
from pathlib import Path

from neural_quantization import QuantizationConfig, Quantizer
from neural_quantization.models.loading import load_model, resolve_model

TEXTS = [
    "The river rose over its banks last spring, and volunteers carried sandbags through the night.",
    "By morning the water had started to fall, and the mayor thanked everyone who came to help.",
    "La rivière a débordé au printemps dernier ; des bénévoles ont porté des sacs de sable toute la nuit.",
    "Im letzten Frühjahr trat der Fluss über die Ufer, und Freiwillige trugen die ganze Nacht Sandsäcke.",
    "La primavera pasada el río se desbordó y los voluntarios cargaron sacos de arena toda la noche.",
    "Scientists measured the water level every hour and published the numbers on the city's website.",
    "Les écoles ont rouvert une semaine plus tard, après le nettoyage des salles du rez-de-chaussée.",
    "Die Stadt will nun einen höheren Deich bauen, der auch ein Hochwasser wie dieses aufhalten kann.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a safetensors checkpoint directory (or an alias)")
    parser.add_argument("--output-dir", type=Path, default=Path("smollm2-135m-streamed"))
    parser.add_argument("--work-dir", type=Path, help="finished layers go here (default: OUTPUT_DIR.work)")
    parser.add_argument("--calibration-data", help="text file or directory of {lang}.txt (default: built-in)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its work dir")
    args = parser.parse_args()
    work_dir = args.work_dir or Path(f"{args.output_dir}.work")

    model_dir = args.model
    if resolve_model(args.model).gguf_file:  # a .gguf (the aliases): write it as safetensors once
        model_dir = Path(f"{args.output_dir}.float")
        if not (model_dir / "config.json").is_file():
            loaded = load_model(args.model)
            loaded.model.save_pretrained(model_dir)
            loaded.tokenizer.save_pretrained(model_dir)
            del loaded

    config = QuantizationConfig(bits=args.bits, group_size=args.group_size, num_samples=args.num_samples,
                                seq_len=args.seq_len)
    try:
        model, results = Quantizer(config).quantize_model(
            str(model_dir), calibration_data=args.calibration_data or TEXTS,
            stream_weights=True, work_dir=work_dir, resume=args.resume)
    except KeyboardInterrupt:
        sys.exit(f"\ninterrupted; finished layers are in {work_dir}: run the same command with --resume")
    model.save_pretrained(args.output_dir)  # shards hard-linked from the work directory
    shutil.rmtree(work_dir)

    shards = sorted(args.output_dir.glob("model-*.safetensors"))
    size = sum(p.stat().st_size for p in shards) / 2**20
    print(f"{args.output_dir}: {len(shards)} shards, {size:.1f} MiB, {len(results.layers)} linears quantized "
          f"in {results.quantization_seconds:.1f} s; load it with load_quantized({str(args.output_dir)!r})")


if __name__ == "__main__":
    main()
