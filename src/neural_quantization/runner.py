"""One quantization run, end to end, for the CLI and for Python alike.

:func:`run_quantization` takes a :class:`~neural_quantization.config.RunOptions` (whose rules were
checked when it was built), runs every check that needs the machine (``checks.check_run``: nothing
is loaded or written before they pass), then::

    load -> pre-flight estimate (activations offloaded to the host if the GPU is too small; with a
            memory budget the plan ``checks.check_run`` chose, the GPU budget enforced)
         -> reference statistics of the float model (if it is evaluated)
         -> quantize layer by layer (progress bar) -> save in the export format (atomically)
         -> compare per language -> report (summary table, JSON/Markdown/PNG) -> gates

and returns a :class:`RunOutcome`. A failure or Ctrl-C during the work leaves the work directory
when it holds finished layers (the exception propagates; :func:`finished_layers` says what
``--resume`` can reuse) and removes it when it holds none.

>>> from neural_quantization.config import EvalOptions, QuantizationConfig, RunOptions
>>> outcome = run_quantization(RunOptions("smollm2-135m", "out/", QuantizationConfig(group_size=64)))  # doctest: +SKIP
>>> outcome.checkpoint, outcome.gates_passed  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neural_quantization.config import EvalOptions, QuantizationConfig, RunOptions

__all__ = ["RunOutcome", "finished_layers", "run_checked", "run_evaluation", "run_quantization", "save_in_format", "write_reports"]


@dataclass
class RunOutcome:
    """What a run produced: the checkpoint directory, its report (``reporting.report.build_report``)
    and whether every quality gate passed (True when nothing was evaluated)."""

    checkpoint: Path
    report: dict[str, Any]
    gates_passed: bool
    model: Any = None
    results: Any = None  # quantizer.QuantizationResults


def finished_layers(options: RunOptions) -> list[int]:
    """The decoder layers an interrupted run left in its work directory (what ``--resume`` reuses)."""
    from neural_quantization.models.layer_storage import WorkDir

    work = options.work_path
    return WorkDir.finished_in(work) if work is not None else []


def _console(console: Any) -> Any:
    if console is not None:
        return console
    from rich.console import Console

    return Console(soft_wrap=True)  # paths in messages stay on one line, copyable


def run_quantization(options: RunOptions, console: Any = None) -> RunOutcome:
    """Check, load, quantize, save, evaluate and report one run (module docstring).

    console: a ``rich.console.Console`` for the run's messages and tables (default: stdout).
    """
    from neural_quantization.checks import check_run

    return run_checked(options, check_run(options), console)  # nothing loaded or written before the checks pass


def run_checked(options: RunOptions, checked: Any, console: Any = None) -> RunOutcome:
    """The run after ``checks.check_run(options)`` returned ``checked``: every failure from here on
    happens with the work under way (what :func:`finished_layers` can then tell a user to resume)."""
    import torch

    from neural_quantization.export.directories import directory_bytes, remove_stale_staging
    from neural_quantization.models.layer_storage import WorkDir

    console = _console(console)
    for path, size in remove_stale_staging(checked.output_dir):
        console.print(f"[yellow]note:[/yellow] removed {path}, left by an interrupted save ({size / 2**20:.1f} MiB).")
    work_dir = checked.work_dir
    if checked.finished_work_dir:
        size = directory_bytes(work_dir)
        shutil.rmtree(work_dir)
        console.print(f"[yellow]note:[/yellow] removed {work_dir}, the work directory of a finished run "
                      f"({size / 2**20:.1f} MiB).")
    fresh_work_dir = work_dir is not None and not work_dir.exists()
    torch.manual_seed(options.config.seed)
    try:
        return _run_checked(options, checked, console)
    except BaseException:
        if work_dir is not None and fresh_work_dir and not WorkDir.finished_in(work_dir):
            shutil.rmtree(work_dir, ignore_errors=True)  # nothing to resume: leave no trace
        raise


def _evaluation_texts(options: RunOptions, model: Any, tokenizer: Any, console: Any) -> tuple[dict, dict]:
    """(texts per language, the report's description of them)."""
    config = options.config
    if options.eval_data is not None:
        from neural_quantization.calibration.sources import load_language_texts

        texts = load_language_texts(options.eval_data, config.target_languages, split="eval")
        return texts, {"data": str(options.eval_data)}
    # The demo machine may have no text at all: evaluate on held-out text the reference model
    # writes with another seed (never the calibration text).
    from neural_quantization.calibration.self_generated import generate_calibration_texts

    console.print("No --eval-data: the model writes held-out evaluation text (seed + 1) ...")
    texts = generate_calibration_texts(model, tokenizer, config.target_languages, len(config.target_languages),
                                       options.eval_seq_len, config.seed + 1)
    return texts, {"data": "self-generated by the reference model (held out, seed + 1)"}


def _run_checked(options: RunOptions, checked: Any, console: Any) -> RunOutcome:
    from neural_quantization.evaluation import all_passed, compare_languages, evaluate_gates
    from neural_quantization.evaluation import reference_languages
    from neural_quantization.models.layer_storage import WorkDir
    from neural_quantization.models.loading import load_model
    from neural_quantization.nn.modules import find_decoder_layers
    from neural_quantization.quantizer import Quantizer
    from neural_quantization.reporting.progress import layer_progress
    from neural_quantization.reporting.report import build_report
    from neural_quantization.reporting.terminal import render_languages, render_summary

    options = _apply_memory_plan(options, checked.memory_plan, console)
    config = options.config
    quiet = not options.show_progress
    work_dir = str(checked.work_dir) if checked.work_dir is not None else None
    console.print(f"Loading {options.model_name}"
                  f"{' (decoder layers stream from disk)' if options.stream_weights else ''} ...")
    loaded = load_model(options.model_name, dtype=config.checkpoint_dtype, stream_weights=options.stream_weights,
                        trust_remote_code=options.trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    offload = _plan_activations(model, options, console) if checked.memory_plan is None else bool(
        options.offload_activations)
    devices_used = _enforce_gpu_budget(options)

    references, evaluation = None, None
    if options.evaluates:
        eval_texts, evaluation = _evaluation_texts(options, model, tokenizer, console)
        references = reference_languages(model, tokenizer, eval_texts, seq_len=options.eval_seq_len,
                                         max_windows_per_language=options.max_eval_windows, show_progress=not quiet)
        evaluation.update({"reference_model": loaded.source, "seq_len": options.eval_seq_len})

    n_layers = len(find_decoder_layers(model)[1])
    if config.cascade_stages and config.cascade_mode == "sequential":
        n_layers *= len(config.cascade_stages)  # the pipeline runs once per stage
    with layer_progress(n_layers, "Quantizing", enabled=not quiet) as bar:
        quantized, results = Quantizer(config).quantize_model(
            loaded, options.calibration_data, tokenizer=tokenizer, model_name=loaded.source,
            on_layer_done=lambda i, n: bar.advance(), work_dir=work_dir, resume=options.resume,
            stream_weights=options.stream_weights, offload_activations=offload, devices=options.devices,
        )
    path = save_in_format(quantized, tokenizer, loaded, options, console)
    memory = _measured_memory(devices_used, checked.memory_plan, options)  # quantizing and saving
    if work_dir is not None and not options.keep_work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)  # the checkpoint is complete; nothing left to resume
    elif work_dir is not None:
        WorkDir.mark_finished(work_dir, path)  # kept, but the next run into the same place need not resume it

    language_results = {}
    if references is not None:
        language_results = compare_languages(quantized, references, show_progress=not quiet)
    stages = _cascade_stage_results(quantized, results, references, language_results, quiet)
    gates = options.gates
    report = build_report(
        model=loaded.source, config=config, quantization=results, language_results=language_results,
        gates=gates, evaluation=evaluation, device=results.device,
        extra={"output_dir": str(path), "memory": memory, **({"stages": stages} if stages else {})},
    )
    render_summary(report, console)
    if language_results:
        render_languages(report, console)
    for warning in results.warnings:
        console.print(f"[yellow]note:[/yellow] {warning}")
    write_reports(report, options.report_json, console)
    if options.optimize_for_edge:
        from neural_quantization.deploy.memory import memory_report
        from neural_quantization.deploy.render import render_memory_report

        render_memory_report(memory_report(path, context=options.edge_context, batch=options.edge_batch), console)
    passed = not language_results or all_passed(evaluate_gates(language_results, gates))
    return RunOutcome(checkpoint=path, report=report, gates_passed=passed, model=quantized, results=results)


def _cascade_stage_results(quantized: Any, results: Any, references: Any, language_results: dict,
                           quiet: bool) -> list[dict[str, Any]]:
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
        stages[0]["degradation_pct"] = average(compare_languages(narrow, references, show_progress=not quiet))
        del narrow
    return stages


def _apply_memory_plan(options: RunOptions, plan: Any, console: Any) -> RunOptions:
    """The options with a budget's plan (``checks._plan_memory``) applied, the plan printed."""
    if plan is None:
        return options
    import dataclasses

    from neural_quantization.models.preflight import format_estimate

    console.print(format_estimate(plan.estimate))
    for change in plan.changes:
        console.print(f"Memory budget: {change}.")
    return dataclasses.replace(
        options, stream_weights=plan.stream_weights, offload_activations=plan.activations_on_host,
        config=options.config.replace(calibration_batch_size=plan.calibration_batch_size))


def _enforce_gpu_budget(options: RunOptions) -> list[Any]:
    """The GPUs the run uses, their peak statistics reset; with ``max_gpu_memory`` each one's caching
    allocator is capped at the budget (``torch.cuda.set_per_process_memory_fraction``)."""
    import torch

    from neural_quantization.nn.modules import resolve_device

    names = options.devices or [options.config.device]
    devices = [resolve_device(name) for name in names]
    devices = [device for device in devices if device.type == "cuda"]
    for device in devices:
        torch.cuda.reset_peak_memory_stats(device)
        if options.max_gpu_memory is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, options.max_gpu_memory / total), device)
    return devices


def _measured_memory(devices: list[Any], plan: Any, options: RunOptions) -> dict[str, Any]:
    """The peaks the run reached (the report's ``memory``): each GPU's peak of live tensors and of
    reserved memory, the process's peak resident set, beside the budgets and the plan's estimate."""
    import resource
    import sys

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    memory: dict[str, Any] = {"host_peak_rss_bytes": rss, "max_gpu_memory": options.max_gpu_memory,
                              "max_cpu_memory": options.max_cpu_memory}
    if devices:
        memory["gpu_peak_allocated_bytes"] = {str(d): torch.cuda.max_memory_allocated(d) for d in devices}
        memory["gpu_peak_reserved_bytes"] = {str(d): torch.cuda.max_memory_reserved(d) for d in devices}
    if plan is not None:
        memory["plan"] = {"stream_weights": plan.stream_weights, "activations_on_host": plan.activations_on_host,
                          "calibration_batch_size": plan.calibration_batch_size, "changes": plan.changes,
                          "estimated_device_peak_bytes": plan.estimate.device_peak_bytes,
                          "estimated_host_peak_bytes": plan.estimate.host_peak_bytes}
    return memory


def _plan_activations(model: Any, options: RunOptions, console: Any) -> bool:
    """Print the memory and time the run will need and whether it fits this machine; return whether
    the calibration activations wait in host memory (``options.offload_activations``, or, when it is
    None, only where the run would not fit the GPU otherwise and offloading makes it fit)."""
    from neural_quantization.models.preflight import estimate_run, format_estimate
    from neural_quantization.nn.modules import resolve_device

    config: QuantizationConfig = options.config
    device = resolve_device(config.device)
    offload = bool(options.offload_activations)
    estimate = estimate_run(model, config, config.num_samples, config.seq_len, device,
                            stream_weights=options.stream_weights, activations_on_host=offload)
    console.print(format_estimate(estimate))
    if options.offload_activations is None and not estimate.fits and device.type == "cuda":
        offloaded = estimate_run(model, config, config.num_samples, config.seq_len, device,
                                 stream_weights=options.stream_weights, activations_on_host=True)
        if offloaded.fits:
            console.print("The calibration activations will wait in host memory between layers "
                          "(--offload-activations, chosen because the run does not fit the GPU otherwise).")
            return True
    return offload


def write_reports(report: dict[str, Any], path: Any, console: Any) -> None:
    """Write the JSON report to ``path`` and its Markdown (with a degradation chart) beside it."""
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


def save_in_format(quantized: Any, tokenizer: Any, loaded: Any, options: RunOptions, console: Any) -> Path:
    """Write the output directory (atomically) in ``options.export_format``; return its path.

    gptq: our checkpoint. compressed-tensors: the pack-quantized checkpoint (what vLLM serves).
    gguf: our checkpoint plus ``<dir name>-Q4_0.gguf`` (or Q8_0) inside it, renamed into place together.
    """
    fmt = options.export_format
    if fmt == "compressed-tensors":
        from neural_quantization.export.compressed_tensors import export_compressed_tensors

        path = export_compressed_tensors(quantized, options.output_dir, tokenizer=tokenizer,
                                         overwrite=options.overwrite)
        console.print(f"compressed-tensors checkpoint written to {path}")
        return path
    if fmt == "gguf":
        from neural_quantization.export.gguf import save_checkpoint_with_gguf

        resolved = getattr(loaded, "resolved", None)
        source = (Path(resolved.path) / resolved.gguf_file) if resolved is not None and resolved.gguf_file else None
        path, report = save_checkpoint_with_gguf(quantized, options.output_dir, tokenizer=tokenizer,
                                                 overwrite=options.overwrite, source_gguf=source)
        console.print(f"Checkpoint written to {path}; GGUF {report.gguf_type} for llama.cpp: {report.path} "
                      f"({report.file_bytes / 2**20:.1f} MiB, metadata {report.metadata_source})")
        if report.clamped_codes:
            console.print(f"[yellow]note:[/yellow] Q8_0 holds codes -127..127: {report.clamped_codes} codes "
                          f"({report.clamped_fraction:.2%}) at -128 were written as -127 (one step each).")
        return path
    path = quantized.save_pretrained(options.output_dir, overwrite=options.overwrite)
    console.print(f"Checkpoint written to {path}")
    return path


def run_evaluation(options: EvalOptions, console: Any = None) -> RunOutcome:
    """``eval``: check the checkpoint, its base model and the data first, then evaluate the checkpoint
    against the base model per language (the quantized model runs in the reference's dtype, so only
    quantization differs)."""
    from neural_quantization.calibration.sources import load_language_texts
    from neural_quantization.checks import check_devices
    from neural_quantization.evaluation import all_passed, evaluate_gates, evaluate_languages
    from neural_quantization.export.checkpoint import load_quantized, read_quantization_config
    from neural_quantization.models.loading import load_model, resolve_model
    from neural_quantization.reporting.report import build_report
    from neural_quantization.reporting.terminal import render_languages, render_summary

    console = _console(console)
    check_devices(options.device)
    quant = read_quantization_config(options.model)  # a broken checkpoint fails before any work
    record = quant.get("neural_quantization", {})
    baseline = options.baseline or record.get("base_model")
    if not baseline:
        raise ValueError(f"{options.model} records no base model; pass --baseline MODEL.")
    resolve_model(baseline)
    # read (and checked) before the model loads
    texts = load_language_texts(options.eval_data, options.target_languages, split="eval")
    reference = load_model(baseline, trust_remote_code=options.trust_remote_code)
    reference_dtype = next(reference.model.parameters()).dtype
    results = evaluate_languages(
        reference.model, lambda: load_quantized(options.model, dtype=reference_dtype), reference.tokenizer, texts,
        seq_len=options.eval_seq_len, max_windows_per_language=options.max_eval_windows,
        device=None if options.device == "auto" else options.device, show_progress=options.show_progress,
    )
    gates = options.gates
    report = build_report(
        model=str(options.model), config=record.get("config"), language_results=results, gates=gates,
        evaluation={"data": str(options.eval_data), "reference_model": baseline, "seq_len": options.eval_seq_len},
    )
    render_summary(report, console)
    render_languages(report, console)
    write_reports(report, options.report_json, console)
    return RunOutcome(checkpoint=Path(options.model), report=report,
                      gates_passed=all_passed(evaluate_gates(results, gates)))
