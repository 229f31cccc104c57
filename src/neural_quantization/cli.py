"""``neural-quantize``: the command line. The only module that reads ``argv``.

Subcommands::

    neural-quantize quantize --model-name M --output-dir D [options]   (also the bare form)
    neural-quantize demo                                                 (built-in model, end to end)
    neural-quantize eval --model D --eval-data DIR                       (per-language quality)
    neural-quantize bench [kernel options]                               (GPU kernel speed)
    neural-quantize bench decode [options]                               (GPU end-to-end decode speed)
    neural-quantize deploy-report DIR_OR_CONFIG                          (memory needed, device fit)

Exit codes: 0 success, 2 bad input (the message says how to fix it), 3 a quality gate failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from neural_quantization.checks import EXPORT_FORMATS
from neural_quantization.config import CHECKPOINT_DTYPES, CLIP_SEARCHES, DEFAULT_LANGUAGES, PRESETS, QuantizationConfig

EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)
DEMO_MODEL = "smollm2-135m"
SUBCOMMANDS = ("quantize", "demo", "eval", "bench", "deploy-report")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once: not where the help already states it, not for options
    whose default is None (their help says what happens), not for the "off" half of a pair."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default is None or action.default is argparse.SUPPRESS
                or isinstance(action, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


def _add_quantization_options(p: argparse.ArgumentParser, defaults: QuantizationConfig) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--bits", type=int, default=None,
                   help=f"code width: 2, 3, 4 or 8 (default: {defaults.bits}; with --cascade-stages, the last stage)")
    g.add_argument(
        "--group-size", type=int, default=defaults.group_size,
        help="input columns sharing one scale/zero; -1 = one per output channel",
    )
    g.add_argument("--preset", choices=sorted(PRESETS), default="standard",
                   help="fast: round to nearest; best: adds --rotate --asym to standard GPTQ (act-order, static "
                        "groups, Hessian clip search), the most accurate measured (docs/quality.md). Options given "
                        "explicitly override the preset's")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric grid, zero point fixed at 2^(bits-1) (the default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (zero point per group)")
    g.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=defaults.desc_act,
                   help="act-order: quantize columns by decreasing Hessian diagonal")
    g.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="with --desc-act, fix group grids before the solve, so g_idx stays trivial and every kernel "
                        "runs the checkpoint at full speed (default: on, except for --cascade-mode nested)")
    g.add_argument("--damp", type=float, default=defaults.damp_percent, help="Hessian damping, fraction of its mean diagonal")
    g.add_argument("--block-size", type=int, default=defaults.block_size, help="columns per lazy-update block of GPTQ")
    g.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=defaults.true_sequential,
                   help="solve a layer's linears in execution order, each seeing the quantized outputs before it")
    g.add_argument("--clip", choices=CLIP_SEARCHES, default=None,
                   help="each group's grid: its min/max range, or clipped to minimise the weights' error (mse) or "
                        "GPTQ's Hessian-weighted output error (hessian; the default for GPTQ, minmax for RTN)")
    g.add_argument("--mse-clip", dest="clip", action="store_const", const="mse", help="the same as --clip mse")
    g.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="rotate the residual stream by a Hadamard matrix merged into the weights before quantizing "
                        "(spreads outliers; the checkpoint stays an ordinary one)")
    g.add_argument("--method", choices=("gptq", "rtn"), default=None, help="solver (default: the preset's, gptq)")
    g.add_argument("--quantize-lm-head", action="store_true", help="also quantize the output projection")
    g.add_argument("--kernel-backend", choices=("auto", "torch", "triton", "marlin"), default=defaults.kernel_backend,
                   help="matmul kernels of the quantized model")
    g.add_argument("--cascade", action="store_true",
                   help="cascade quantization through the widths of --cascade-stages (default stages: 8 4)")
    g.add_argument("--cascade-stages", type=int, nargs="+", default=None, metavar="BITS",
                   help="cascade widths, wide to narrow (implies --cascade); --bits defaults to the last one")
    g.add_argument("--cascade-mode", choices=("sequential", "nested"), default=None,
                   help="sequential: requantize stage by stage, recalibrating through each stage's model; "
                   "nested: one checkpoint readable at both widths (implies --cascade) (default: sequential)")
    c = p.add_argument_group("calibration")
    c.add_argument(
        "--calibration-data", default=None,
        help="text file, directory of {lang}.txt / {lang}.calib.txt files, or hf:<dataset>; "
        "default: the model writes its own calibration text",
    )
    c.add_argument("--num-samples", type=int, default=defaults.num_samples, help="calibration windows")
    c.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per calibration window")
    c.add_argument("--target-languages", nargs="+", default=list(DEFAULT_LANGUAGES),
                   help="languages to calibrate (and evaluate) on")
    c.add_argument("--seed", type=int, default=defaults.seed, help="seed for sampling and self-generated text")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=defaults.device, help="where each layer is solved: auto, cpu, cuda, cuda:1")
    r.add_argument("--dtype", default=None, choices=CHECKPOINT_DTYPES,
                   help="the model's float dtype: for loading and for the checkpoint's unquantized tensors "
                        "(embeddings, norms). Default: load as the source is stored (GGUF: float32 on CPU, bfloat16 "
                        "on GPU) and store 16-bit (the source's 16-bit dtype, else bfloat16)")
    r.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own Python code from its directory or hub repository (off: never run "
                        "code you have not read)")
    r.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                   help="devices sharing the work, e.g. cuda:0 cuda:1 (default: every visible GPU for --device "
                        "auto/cuda)")
    r.add_argument("--stream-weights", action="store_true",
                   help="read the decoder layers from the safetensors checkpoint one at a time (host memory ~ one "
                        "layer; for models larger than RAM); writes a sharded checkpoint")
    r.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations in host memory between layers (when they do not fit on the GPU)")
    r.add_argument("--work-dir", default=None,
                   help="where finished layers are written as they are produced (default: OUTPUT_DIR.work)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from its --work-dir")
    r.add_argument("--keep-work-dir", action="store_true", help="keep the work directory after the checkpoint is saved")
    r.add_argument("--calibration-batch-size", type=int, default=defaults.calibration_batch_size,
                   help="calibration windows per forward")


def _add_export_options(p: argparse.ArgumentParser) -> None:
    x = p.add_argument_group("output format and deployment")
    x.add_argument(
        "--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0],
        help="gptq: our GPTQ checkpoint (transformers, vLLM); compressed-tensors: pack-quantized checkpoint "
        "(vLLM, transformers + compressed-tensors; 4/8 bits); gguf: the GPTQ checkpoint plus "
        "<output-dir name>-Q4_0.gguf / -Q8_0.gguf inside it for llama.cpp (needs --group-size 32, --sym)",
    )
    x.add_argument("--optimize-for-edge", action="store_true",
                   help="after saving, print the memory needed on edge devices (weights + KV cache + overhead)")
    x.add_argument("--edge-context", type=int, default=4096, help="context length for --optimize-for-edge")
    x.add_argument("--edge-batch", type=int, default=1, help="batch size for --optimize-for-edge")


def _add_eval_options(p: argparse.ArgumentParser, with_eval_data_help: str) -> None:
    e = p.add_argument_group("evaluation and quality gates")
    e.add_argument("--eval-data", default=None, help=with_eval_data_help)
    e.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window (stride = length)")
    e.add_argument("--max-eval-windows", type=int, default=None, help="cap on windows per language (all by default)")
    e.add_argument("--max-degradation", type=float, default=2.0, help="gate: average perplexity increase, %%")
    e.add_argument("--max-language-degradation", type=float, default=3.0, help="gate: worst language's increase, %%")
    fail = e.add_mutually_exclusive_group()
    fail.add_argument("--fail-on-gate", dest="no_fail_on_gate", action="store_false", default=False,
                      help="exit 3 when a quality gate fails (what quantize and eval do unless told otherwise)")
    fail.add_argument("--no-fail-on-gate", dest="no_fail_on_gate", action="store_true",
                      help="exit 0 even when a gate fails")
    e.add_argument("--report-json", default=None, help="write the JSON report here (plus .md and .png beside it)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    defaults = QuantizationConfig()
    parser = argparse.ArgumentParser(
        prog="neural-quantize",
        description="GPTQ quantization of Hugging Face causal LMs, with per-language quality reports.",
        formatter_class=_Formatter,
        epilog="The bare form `neural-quantize --model-name M --output-dir D ...` means `quantize`.",
    )
    from neural_quantization._version import __version__

    parser.add_argument("--version", action="version", version=f"neural-quantization {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{quantize,demo,eval,bench,deploy-report}")

    q = sub.add_parser("quantize", help="quantize a model and save a GPTQ checkpoint", formatter_class=_Formatter)
    q.add_argument("--model-name", required=True,
                   help="alias (smollm2-135m, gemma3-270m), local directory, .gguf file or Hugging Face id")
    q.add_argument("--output-dir", required=True,
                   help="where to write the checkpoint: a new or empty directory (never . or above it)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output-dir, only if it holds a checkpoint of ours and nothing else")
    _add_quantization_options(q, defaults)
    _add_export_options(q)
    _add_eval_options(q, "evaluate per language right after quantizing: directory of {lang}.eval.txt / {lang}.txt")

    d = sub.add_parser("demo", help=f"quantize the built-in {DEMO_MODEL} end to end on this machine",
                       formatter_class=_Formatter)
    d.add_argument("--output-dir", default=f"{DEMO_MODEL}-gptq-w4g64", help="where to write the checkpoint")
    d.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output-dir, only if it holds a checkpoint of ours and nothing else")
    d.add_argument("--model-name", default=DEMO_MODEL, help="model to quantize")
    demo_defaults = QuantizationConfig(group_size=64, num_samples=32, seq_len=256)
    _add_quantization_options(d, demo_defaults)
    _add_export_options(d)
    _add_eval_options(d, "evaluation texts; default: held-out text the model writes itself (a different seed)")
    # The demo shows what the gates say but exits 0: a 135M model at 4 bits is far past a 2 % gate.
    d.set_defaults(eval_seq_len=256, no_fail_on_gate=True)

    e = sub.add_parser("eval", help="measure a quantized checkpoint against its reference, per language",
                       formatter_class=_Formatter)
    e.add_argument("--model", required=True, help="quantized checkpoint directory")
    e.add_argument("--baseline", default=None, help="reference model; default: the base model recorded in the checkpoint")
    e.add_argument("--target-languages", nargs="+", default=list(DEFAULT_LANGUAGES), help="languages to evaluate")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--trust-remote-code", action="store_true", help="run the baseline model's own Python code")
    _add_eval_options(e, "directory of {lang}.eval.txt / {lang}.txt files (required)")

    # The benchmarks own their options (bench/kernels.py, bench/decode.py);
    # `neural-quantize bench --help` and `neural-quantize bench decode --help` list them.
    b = sub.add_parser("bench", add_help=False,
                       help="GPU speed: kernels against cuBLAS fp16 and PyTorch int4; `bench decode`: end-to-end "
                            "decode tokens/s, fp16 vs int4")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="options passed to the benchmark")

    r = sub.add_parser(
        "deploy-report", formatter_class=_Formatter,
        help="memory a model needs (weights + KV cache + overhead) and which edge devices it fits",
        description="From a checkpoint directory the weights are measured (file sizes); from a config.json "
        "(or a directory without weights) they are estimated for --bits / --group-size, so you can plan "
        "before downloading.",
    )
    r.add_argument("source", metavar="DIR_OR_CONFIG", help="checkpoint directory or config.json")
    r.add_argument("--context", type=int, default=4096, help="tokens of KV cache per sequence")
    r.add_argument("--batch", type=int, default=1, help="sequences held at once")
    r.add_argument("--bits", type=int, default=4, help="estimate only: code width")
    r.add_argument("--group-size", type=int, default=128, help="estimate only: GPTQ group size")
    r.add_argument("--kv-bytes", type=float, default=2, help="bytes per KV-cache element (2 = fp16, 1 = 8-bit)")
    r.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")
    return parser


def _normalise_argv(argv: list[str]) -> list[str]:
    """The original README's bare form (`neural-quantize --model-name …`) means `quantize`."""
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        return ["quantize", *argv]
    return argv


def _cascade_from_args(args: argparse.Namespace) -> tuple[list[int] | None, str, int]:
    """(cascade_stages, cascade_mode, bits): --cascade-stages / --cascade-mode imply --cascade, and
    --bits left out means the cascade's last width (an explicit --bits must agree with it)."""
    stages = getattr(args, "cascade_stages", None)
    mode = getattr(args, "cascade_mode", None)
    if stages is None and (getattr(args, "cascade", False) or mode is not None):
        stages = [8, 4]
    bits = args.bits
    if bits is None:
        bits = stages[-1] if stages else QuantizationConfig().bits
    return stages, mode or "sequential", bits


def config_from_args(args: argparse.Namespace) -> QuantizationConfig:
    cascade_stages, cascade_mode, bits = _cascade_from_args(args)
    chosen = {"sym": args.sym, "rotate": args.rotate, "method": args.method}
    return QuantizationConfig.from_preset(
        getattr(args, "preset", "standard"),
        **{name: value for name, value in chosen.items() if value is not None},
        bits=bits,
        group_size=args.group_size,
        clip=args.clip,
        damp_percent=args.damp,
        block_size=args.block_size,
        true_sequential=args.true_sequential,
        desc_act=args.desc_act,
        static_groups=args.static_groups,
        quantize_lm_head=args.quantize_lm_head,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        calibration_batch_size=args.calibration_batch_size,
        target_languages=args.target_languages,
        seed=args.seed,
        kernel_backend=args.kernel_backend,
        device=args.device,
        cascade_stages=cascade_stages,
        cascade_mode=cascade_mode,
        checkpoint_dtype=args.dtype,
    )


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input, reported as one line with the fix and exit code 2."""
    from neural_quantization.calibration.sources import CalibrationDataError
    from neural_quantization.config import ConfigError
    from neural_quantization.export.checkpoint import CheckpointError
    from neural_quantization.export.directories import OutputExistsError
    from neural_quantization.nn.modules import UnsupportedModelError
    from neural_quantization.models.loading import ModelNotFoundError

    return (ConfigError, CalibrationDataError, CheckpointError, OutputExistsError, ModelNotFoundError,
            UnsupportedModelError, ValueError, FileNotFoundError)


def _evaluation_texts(source: str, languages: list[str]) -> dict[str, list[str]]:
    from neural_quantization.calibration.sources import load_language_texts

    return load_language_texts(source, languages, split="eval")


def _write_reports(report: dict[str, Any], path: str | None, console: Any) -> None:
    if not path:
        return
    from neural_quantization.reporting.report import plot_degradation, write_json, write_markdown

    json_path = Path(path)
    write_json(report, json_path)
    chart = None
    if report.get("languages"):
        chart = plot_degradation(report, json_path.with_suffix(".png"))
    write_markdown(report, json_path.with_suffix(".md"), chart=chart)
    console.print(f"Report written to {json_path} (+ .md{', .png' if chart else ''})")


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be positive.")


def run_request(args: argparse.Namespace, config: QuantizationConfig, demo: bool) -> Any:
    """The :class:`~neural_quantization.checks.RunRequest` the options of ``quantize`` / ``demo`` describe."""
    from neural_quantization.checks import RunRequest

    return RunRequest(
        model_name=args.model_name, output_dir=args.output_dir, config=config, overwrite=args.overwrite,
        calibration_data=args.calibration_data, eval_data=args.eval_data, eval_seq_len=args.eval_seq_len,
        self_evaluate=demo and not args.eval_data, export_format=args.format, devices=args.devices,
        work_dir=args.work_dir, resume=args.resume, stream_weights=args.stream_weights,
        trust_remote_code=args.trust_remote_code,
    )


def _resume_command(argv: list[str]) -> str:
    import shlex

    return "neural-quantize " + " ".join(shlex.quote(a) for a in [*argv, *([] if "--resume" in argv else ["--resume"])])


def run_quantize(args: argparse.Namespace, demo: bool = False) -> int:
    """``quantize`` / ``demo``: every check first (``checks.check_run``), then load, quantize, save, report.

    Ctrl-C (or a failure) during the work leaves the work directory when it holds finished layers
    (the message gives the ``--resume`` command) and removes it when it holds none.
    """
    import torch
    from rich.console import Console

    from neural_quantization.checks import check_run
    from neural_quantization.evaluation import QualityGates
    from neural_quantization.export.directories import directory_bytes, remove_stale_staging
    from neural_quantization.models.layer_storage import WorkDir

    console = Console(stderr=False)
    config = config_from_args(args)
    gates = QualityGates(args.max_degradation, args.max_language_degradation)
    _check_positive(args, "max_eval_windows", "edge_context", "edge_batch")
    checked = check_run(run_request(args, config, demo))  # nothing loaded or written before this passes
    for path, size in remove_stale_staging(checked.output_dir):
        console.print(f"[yellow]note:[/yellow] removed {path}, left by an interrupted save ({size / 2**20:.1f} MiB).")
    work_dir = checked.work_dir
    if checked.finished_work_dir:
        size = directory_bytes(work_dir)
        shutil.rmtree(work_dir)
        console.print(f"[yellow]note:[/yellow] removed {work_dir}, the work directory of a finished run "
                      f"({size / 2**20:.1f} MiB).")
    fresh_work_dir = work_dir is not None and not work_dir.exists()
    torch.manual_seed(config.seed)
    try:
        return _quantize_checked(args, config, gates, checked, console, demo)
    except BaseException as err:
        finished = WorkDir.finished_in(work_dir) if work_dir is not None else []
        if work_dir is not None and fresh_work_dir and not finished:
            shutil.rmtree(work_dir, ignore_errors=True)  # nothing to resume: leave no trace
        if isinstance(err, KeyboardInterrupt):
            if finished:
                print(f"neural-quantize: interrupted. {len(finished)} finished layers are kept in {work_dir}; "
                      f"continue with:\n    {_resume_command(getattr(args, 'argv', []))}", file=sys.stderr)
            else:
                print("neural-quantize: interrupted before any layer finished; nothing was written.", file=sys.stderr)
            return EXIT_INTERRUPTED
        if finished:
            print(f"note: {len(finished)} finished layers are kept in {work_dir}; after fixing the problem below, "
                  f"continue with: {_resume_command(getattr(args, 'argv', []))}", file=sys.stderr)
        raise


def _quantize_checked(args: argparse.Namespace, config: QuantizationConfig, gates: Any, checked: Any, console: Any,
                      demo: bool) -> int:
    from neural_quantization.calibration.self_generated import generate_calibration_texts
    from neural_quantization.evaluation import all_passed, compare_languages, evaluate_gates, reference_languages
    from neural_quantization.nn.modules import find_decoder_layers
    from neural_quantization.models.layer_storage import WorkDir
    from neural_quantization.models.loading import load_model
    from neural_quantization.quantizer import Quantizer
    from neural_quantization.reporting.progress import layer_progress
    from neural_quantization.reporting.report import build_report
    from neural_quantization.reporting.terminal import render_languages, render_summary

    work_dir = str(checked.work_dir) if checked.work_dir is not None else None
    console.print(f"Loading {args.model_name}{' (decoder layers stream from disk)' if args.stream_weights else ''} ...")
    loaded = load_model(args.model_name, dtype=args.dtype, stream_weights=args.stream_weights,
                        trust_remote_code=args.trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    _print_preflight(model, config, args, console)

    references, evaluation = None, None
    if args.eval_data or demo:
        if args.eval_data:
            eval_texts = _evaluation_texts(args.eval_data, config.target_languages)
            evaluation = {"data": str(args.eval_data)}
        else:
            # The demo machine may have no text at all: evaluate on held-out text the reference
            # model writes with another seed (never the calibration text).
            console.print("No --eval-data: the model writes held-out evaluation text (seed + 1) ...")
            eval_texts = generate_calibration_texts(
                model, tokenizer, config.target_languages, len(config.target_languages),
                args.eval_seq_len, config.seed + 1,
            )
            evaluation = {"data": "self-generated by the reference model (held out, seed + 1)"}
        references = reference_languages(
            model, tokenizer, eval_texts, seq_len=args.eval_seq_len,
            max_windows_per_language=args.max_eval_windows, show_progress=not args.quiet,
        )
        evaluation.update({"reference_model": loaded.source, "seq_len": args.eval_seq_len})

    calibration_data = args.calibration_data
    n_layers = len(find_decoder_layers(model)[1])
    if config.cascade_stages and config.cascade_mode == "sequential":
        n_layers *= len(config.cascade_stages)  # the pipeline runs once per stage
    with layer_progress(n_layers, "Quantizing", enabled=not args.quiet) as bar:
        quantized, results = Quantizer(config).quantize_model(
            loaded, calibration_data, tokenizer=tokenizer, model_name=loaded.source,
            on_layer_done=lambda i, n: bar.advance(), work_dir=work_dir, resume=args.resume,
            stream_weights=args.stream_weights, offload_activations=args.offload_activations, devices=args.devices,
        )
    path = save_in_format(quantized, tokenizer, loaded, args, console)
    if work_dir is not None and not args.keep_work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)  # the checkpoint is complete; nothing left to resume
    elif work_dir is not None:
        WorkDir.mark_finished(work_dir, path)  # kept, but the next run into the same place need not resume it

    language_results = {}
    if references is not None:
        language_results = compare_languages(quantized, references, show_progress=not args.quiet)
    stages = _cascade_stage_results(quantized, results, references, language_results, args)
    report = build_report(
        model=loaded.source, config=config, quantization=results, language_results=language_results,
        gates=gates, evaluation=evaluation, device=results.device,
        extra={"output_dir": str(path), **({"stages": stages} if stages else {})},
    )
    render_summary(report, console)
    if language_results:
        render_languages(report, console)
    for warning in results.warnings:
        console.print(f"[yellow]note:[/yellow] {warning}")
    _write_reports(report, args.report_json, console)
    if getattr(args, "optimize_for_edge", False):
        from neural_quantization.deploy.memory import memory_report
        from neural_quantization.deploy.render import render_memory_report

        render_memory_report(memory_report(path, context=args.edge_context, batch=args.edge_batch), console)
    if language_results and not all_passed(evaluate_gates(language_results, gates)) and not args.no_fail_on_gate:
        console.print("[red]A quality gate failed[/red] (exit 3; --no-fail-on-gate to ignore).")
        return EXIT_GATE_FAILED
    return 0


def _cascade_stage_results(quantized, results, references, language_results, args) -> list[dict[str, Any]]:
    """The cascade's stages, with each stage's average degradation where it was evaluated.

    The returned model holds the last stage (sequential) or the stored wide read (nested), whose
    evaluation already ran; a nested run also evaluates its narrow read (a narrowed copy).
    """
    import copy

    from neural_quantization.evaluation import compare_languages

    stages = [dict(stage) for stage in results.stages]
    if not stages or references is None:
        return stages

    def average(per_language: dict) -> float:
        values = [r.degradation_pct for r in per_language.values()]
        return sum(values) / len(values)

    stored = stages[-1]
    stored["degradation_pct"] = average(language_results)
    if stored["mode"] == "nested":
        from neural_quantization.models.cascade import narrow_model

        narrow = copy.deepcopy(quantized)
        narrow_model(narrow, stages[0]["bits"])
        stages[0]["degradation_pct"] = average(compare_languages(narrow, references, show_progress=not args.quiet))
        del narrow
    return stages


def run_eval(args: argparse.Namespace) -> int:
    """``eval``: check the checkpoint and the data first, then evaluate it against its base model per
    language (the quantized model runs in the reference's dtype, so only quantization differs)."""
    from rich.console import Console

    from neural_quantization.checks import check_devices
    from neural_quantization.evaluation import QualityGates, all_passed, evaluate_gates, evaluate_languages
    from neural_quantization.export.checkpoint import load_quantized, validate_checkpoint
    from neural_quantization.models.loading import load_model, resolve_model
    from neural_quantization.reporting.report import build_report
    from neural_quantization.reporting.terminal import render_languages, render_summary

    console = Console()
    if not args.eval_data:
        raise ValueError("eval needs --eval-data DIR (a directory of {lang}.eval.txt or {lang}.txt files).")
    gates = QualityGates(args.max_degradation, args.max_language_degradation)
    _check_positive(args, "max_eval_windows")
    if args.eval_seq_len < 2:
        raise ValueError(f"--eval-seq-len {args.eval_seq_len} must be at least 2 (512 is usual).")
    check_devices(args.device)
    quant = validate_checkpoint(args.model).quantization_config  # a broken checkpoint fails before any work
    record = quant.get("neural_quantization", {})
    baseline = args.baseline or record.get("base_model")
    if not baseline:
        raise ValueError(f"{args.model} records no base model; pass --baseline MODEL.")
    resolve_model(baseline)
    texts = _evaluation_texts(args.eval_data, args.target_languages)  # read (and checked) before the model loads
    reference = load_model(baseline, trust_remote_code=args.trust_remote_code)
    reference_dtype = next(reference.model.parameters()).dtype
    device = None if args.device == "auto" else args.device
    results = evaluate_languages(
        reference.model, lambda: load_quantized(args.model, dtype=reference_dtype), reference.tokenizer, texts,
        seq_len=args.eval_seq_len, max_windows_per_language=args.max_eval_windows,
        device=device, show_progress=not args.quiet,
    )
    report = build_report(
        model=str(args.model), config=record.get("config"), language_results=results, gates=gates,
        evaluation={"data": str(args.eval_data), "reference_model": baseline, "seq_len": args.eval_seq_len},
    )
    render_summary(report, console)
    render_languages(report, console)
    _write_reports(report, args.report_json, console)
    if not all_passed(evaluate_gates(results, gates)) and not args.no_fail_on_gate:
        console.print("[red]A quality gate failed[/red] (exit 3; --no-fail-on-gate to ignore).")
        return EXIT_GATE_FAILED
    return 0


def _print_preflight(model: Any, config: QuantizationConfig, args: argparse.Namespace, console: Any) -> None:
    """Print the memory and time the run will need, and whether it fits this machine."""
    from neural_quantization.models.preflight import estimate_run, format_estimate
    from neural_quantization.quantizer import resolve_device

    device = resolve_device(config.device)
    estimate = estimate_run(
        model, config, config.num_samples, config.seq_len, device,
        stream_weights=args.stream_weights, activations_on_host=args.offload_activations,
    )
    console.print(format_estimate(estimate))
    if not estimate.fits and not args.offload_activations and device.type == "cuda":
        offloaded = estimate_run(model, config, config.num_samples, config.seq_len, device,
                                 stream_weights=args.stream_weights, activations_on_host=True)
        if offloaded.fits:
            args.offload_activations = True
            console.print("The calibration activations will wait in host memory between layers "
                          "(--offload-activations, chosen because the run does not fit the GPU otherwise).")


def save_in_format(quantized: Any, tokenizer: Any, loaded: Any, args: argparse.Namespace, console: Any) -> Path:
    """Write the output directory (atomically) in ``--format``; return its path.

    gptq: our checkpoint. compressed-tensors: the pack-quantized checkpoint (what vLLM serves).
    gguf: our checkpoint plus ``<dir name>-Q4_0.gguf`` (or Q8_0) inside it, renamed into place together.
    """
    fmt = getattr(args, "format", "gptq")
    if fmt == "compressed-tensors":
        from neural_quantization.export.compressed_tensors import export_compressed_tensors

        path = export_compressed_tensors(quantized, args.output_dir, tokenizer=tokenizer, overwrite=args.overwrite)
        console.print(f"compressed-tensors checkpoint written to {path}")
        return path
    if fmt == "gguf":
        from neural_quantization.export.gguf import save_checkpoint_with_gguf

        resolved = getattr(loaded, "resolved", None)
        source = (Path(resolved.path) / resolved.gguf_file) if resolved is not None and resolved.gguf_file else None
        path, report = save_checkpoint_with_gguf(quantized, args.output_dir, tokenizer=tokenizer,
                                                 overwrite=args.overwrite, source_gguf=source)
        console.print(f"Checkpoint written to {path}; GGUF {report.gguf_type} for llama.cpp: {report.path} "
                      f"({report.file_bytes / 2**20:.1f} MiB, metadata {report.metadata_source})")
        if report.clamped_codes:
            console.print(f"[yellow]note:[/yellow] Q8_0 holds codes -127..127: {report.clamped_codes} codes "
                          f"({report.clamped_fraction:.2%}) at -128 were written as -127 (one step each).")
        return path
    path = quantized.save_pretrained(args.output_dir, overwrite=args.overwrite)
    console.print(f"Checkpoint written to {path}")
    return path


def run_deploy_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from neural_quantization.deploy.memory import memory_report
    from neural_quantization.deploy.render import render_memory_report, write_memory_report_json

    console = Console()
    report = memory_report(args.source, context=args.context, batch=args.batch, bits=args.bits,
                           group_size=args.group_size, kv_bytes_per_element=args.kv_bytes)
    render_memory_report(report, console)
    if args.json:
        console.print(f"JSON written to {write_memory_report_json(report, args.json)}")
    return 0


def run_bench(bench_args: list[str]) -> int:
    """Hand the arguments to the benchmark, which owns its options: ``bench decode …`` the end-to-end
    decode benchmark (``bench/decode.py``), otherwise the kernel benchmark (``bench/kernels.py``)."""
    import torch

    if bench_args[:1] == ["decode"]:
        from neural_quantization.bench import decode as benchmark

        name, bench_args = "the decode benchmark", bench_args[1:]
    else:
        from neural_quantization.bench import kernels as benchmark

        name = "the kernel benchmark"
    if not torch.cuda.is_available() and not {"-h", "--help"} & set(bench_args):
        raise ValueError(f"{name} needs a CUDA GPU; run it on a machine with one (see docs/kernels.md).")
    return int(benchmark.main(bench_args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        if argv[:1] == ["bench"]:
            return run_bench(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = argv
        if args.command is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        if args.command == "quantize":
            return run_quantize(args)
        if args.command == "demo":
            return run_quantize(args, demo=True)
        if args.command == "deploy-report":
            return run_deploy_report(args)
        if args.command == "eval":
            return run_eval(args)
        return run_bench(args.bench_args)
    except _user_errors() as err:
        print(f"neural-quantize: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("neural-quantize: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


def _one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line message, e.g. the list of ways to name a model,
    has its lines joined), so scripts and logs get one line per failure."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
