"""Quantize a model with GPTQ, save it, load it back and compare it with the original, per language.

What it shows: ``QuantizationConfig`` + ``MistralQuantizer(config).quantize_model`` (the model writes
its own calibration text), ``save_pretrained``, ``load_quantized``, and ``reference_languages`` /
``compare_languages`` from ``neural_quantization.evaluation``: both models' perplexity on the same
token windows, the increase and the KL divergence, per language. The float model's statistics are
taken *before* quantizing, because ``quantize_model`` rounds the weights in place (one model in
memory at a time).

Run it (the built-in SmolLM2-135M, a few minutes on a laptop CPU):

    python examples/quantize_and_evaluate.py --output-dir ./smollm2-w4
    python examples/quantize_and_evaluate.py --model ./my-model --languages en de --eval-data ./eval-texts/

``--eval-data``: a directory of ``{lang}.eval.txt`` or ``{lang}.txt`` files. Without it a few
built-in sentences per language are used: enough to see the workflow, far too little for a verdict.
"""

import argparse
import json
from pathlib import Path

from neural_quantization import MistralQuantizer, QuantizationConfig, load_quantized
from neural_quantization.calibration.sources import load_language_texts
from neural_quantization.evaluation import compare_languages, reference_languages
from neural_quantization.models.loading import load_model

SENTENCES = {
    "en": "The river rose over its banks last spring. Volunteers carried sandbags through the night, and by "
          "morning the water had started to fall. The mayor thanked everyone who came to help.",
    "fr": "La rivière a débordé au printemps dernier. Des bénévoles ont porté des sacs de sable toute la nuit, "
          "et au matin l'eau avait commencé à baisser. Le maire a remercié tous ceux qui sont venus aider.",
    "de": "Im letzten Frühjahr trat der Fluss über die Ufer. Freiwillige trugen die ganze Nacht Sandsäcke, und "
          "am Morgen begann das Wasser zu sinken. Der Bürgermeister dankte allen, die geholfen hatten.",
    "es": "La primavera pasada el río se desbordó. Los voluntarios cargaron sacos de arena toda la noche y por "
          "la mañana el agua empezó a bajar. El alcalde dio las gracias a todos los que ayudaron.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in alias, local directory, .gguf or hub id")
    parser.add_argument("--output-dir", type=Path, default=Path("smollm2-135m-w4"))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--languages", nargs="+", default=list(SENTENCES))
    parser.add_argument("--eval-data", help="directory of {lang}.eval.txt / {lang}.txt (default: built-in sentences)")
    parser.add_argument("--eval-seq-len", type=int, default=32, help="tokens per evaluation window")
    parser.add_argument("--json", type=Path, help="also write the measured numbers to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier checkpoint of this script")
    args = parser.parse_args()
    if not args.eval_data and set(args.languages) - set(SENTENCES):
        parser.error(f"built-in sentences exist for {sorted(SENTENCES)} only; pass --eval-data for the others")

    loaded = load_model(args.model)  # float model + tokenizer
    texts = (load_language_texts(args.eval_data, args.languages, split="eval") if args.eval_data
             else {lang: SENTENCES[lang] for lang in args.languages})
    references = reference_languages(loaded.model, loaded.tokenizer, texts, seq_len=args.eval_seq_len)
    dtype = loaded.model.dtype

    config = QuantizationConfig(bits=args.bits, group_size=args.group_size, num_samples=args.num_samples,
                                seq_len=args.seq_len)
    model, results = MistralQuantizer(config).quantize_model(loaded, calibration_data=None,
                                                             target_languages=args.languages)
    model.save_pretrained(args.output_dir, overwrite=args.overwrite)
    del model, loaded  # from here on only the checkpoint on disk is used

    quantized = load_quantized(args.output_dir, dtype=dtype)  # the reference's dtype: only quantization differs
    scores = compare_languages(quantized, references)

    print(f"\n{args.output_dir}: {args.bits}-bit, group {args.group_size}, linears "
          f"{results.final_compression_ratio:.2f}x smaller than fp16, {results.quantization_seconds:.1f} s")
    print(f"{'lang':<6}{'ppl float':>11}{'ppl quant':>11}{'Δppl':>10}{'KL (nats)':>11}{'top-1 agree':>13}")
    for lang, r in scores.items():
        print(f"{lang:<6}{r.ppl_reference:>11.2f}{r.ppl_quantized:>11.2f}{r.degradation_pct:>+9.1f}%"
              f"{r.kl_divergence:>11.4f}{r.top1_agreement:>12.1%}")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.output_dir),
                                         "compression": results.final_compression_ratio,
                                         "languages": {lang: r.to_dict() for lang, r in scores.items()}}, indent=2))


if __name__ == "__main__":
    main()
