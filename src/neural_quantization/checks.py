"""Every check a quantization run can make before it reads a model weight.

A run that fails after an hour on something knowable at its start is the worst kind of failure,
so :func:`check_run` looks at everything a :class:`~neural_quantization.config.RunOptions` names,
cheapest first, and raises an error whose message says how to fix the problem (the CLI turns it into
one line and exit 2). Combinations of options are refused when the ``RunOptions`` is built (the
rules live there, shared by the CLI and Python); what is left needs the machine:

1. the export format against the quantization options (rules owned by the export modules);
2. the device(s): parseable, present on this machine (``cuda:3`` on a 1-GPU machine, CUDA on a
   CPU-only machine);
3. the output directory (``export/directories.py``: never the current directory or above, only
   our own checkpoints are replaced) and the work directory (an interrupted run is resumed or
   refused, a finished one is noted for removal);
4. the calibration and evaluation data: local files are read and every language must have text;
   self-generated calibration needs built-in prompts for each language;
5. the model's config, without its weights (a GGUF header, a ``config.json``, one hub request):
   the architecture must be one whose decoder layers we find (built on ``meta``: no memory), the
   export format must support it, ``--seq-len`` must fit its context, and streaming needs a
   safetensors checkpoint;
6. with ``--max-gpu-memory`` / ``--max-cpu-memory``, a plan that fits the budget (pre-flight
   estimate on the ``meta`` model), or the run is refused with the option that would make it fit.

Nothing is written: a failing check leaves the file system as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neural_quantization.config import EXPORT_FORMATS, ConfigError, QuantizationConfig, RunOptions
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")

__all__ = ["EXPORT_FORMATS", "CheckedRun", "check_devices", "check_marlin_shapes", "check_run", "model_context"]


@dataclass
class CheckedRun:
    """What the checks found: where the model is, its config, and the directories the run will use."""

    resolved: Any  # models.loading.ResolvedModel
    model_config: Any  # the transformers config
    output_dir: Path
    work_dir: Path | None
    finished_work_dir: bool = False  # work_dir holds a finished run, to be removed before this one
    memory_plan: Any = None  # models.preflight.MemoryPlan, when the run has a memory budget


def check_devices(device: str, devices: list[str] | None = None) -> None:
    """Raise ``ValueError`` with the fix when ``device`` or any of ``devices`` does not exist here."""
    names = ([] if device == "auto" else [device]) + list(devices or [])
    for name in names:
        flag = "--devices" if devices and name in devices else "--device"
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError):
            raise ValueError(f"{flag} {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"{flag} {name} was asked for, but no CUDA device is visible here; use --device cpu.")
            count = torch.cuda.device_count()
            if dev.index is not None and dev.index >= count:
                raise ValueError(f"{flag} {name} does not exist: this machine has {count} CUDA device(s), "
                                 f"cuda:0 to cuda:{count - 1}.")
        elif dev.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {name} was asked for, but MPS is not available here; use --device cpu.")
        elif dev.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"{flag} {name}: only cpu, cuda and mps devices are supported.")


def _check_export_format(request: RunOptions) -> None:
    fmt, config = request.export_format, request.config
    if fmt == "gptq":
        return
    if fmt == "compressed-tensors":
        from neural_quantization.export.compressed_tensors import check_export_config
    else:
        from neural_quantization.export.gguf import check_export_config
    check_export_config(config)


def _check_work_dir(request: RunOptions) -> tuple[Path | None, bool]:
    """(the run's work directory or None, whether it holds a finished run to remove first)."""
    from neural_quantization.models.layer_storage import WorkDir

    work_dir = request.work_path
    if work_dir is None:
        return None, False
    started, finished = WorkDir.is_started(work_dir), WorkDir.is_finished(work_dir)
    if request.resume and not started:
        raise ValueError(f"--resume: {work_dir} holds no interrupted run; pass the --work-dir of that run "
                         "(default: OUTPUT_DIR.work), or drop --resume.")
    if request.resume and finished:
        raise ValueError(f"--resume: the run in {work_dir} already finished and saved its checkpoint; drop --resume "
                         "to run again.")
    if started and not finished and not request.resume:
        raise ValueError(f"{work_dir} holds an interrupted run: pass --resume to continue it, or remove the "
                         "directory to start over.")
    if work_dir.exists() and not started and (not work_dir.is_dir() or any(work_dir.iterdir())):
        raise ValueError(f"--work-dir {work_dir} exists and is not a work directory of ours; choose a new or "
                         "empty directory.")
    return work_dir, finished


def _check_data(request: RunOptions) -> None:
    from neural_quantization.calibration.self_generated import check_prompts
    from neural_quantization.calibration.sources import check_language_source

    config = request.config
    languages = config.target_languages
    if config.method != "rtn":
        if request.calibration_data is None:
            check_prompts(languages)  # the model writes its own calibration text
        else:
            check_language_source(request.calibration_data, languages, split="calib")
    if request.eval_data is not None:
        check_language_source(request.eval_data, languages, split="eval")
    elif request.self_evaluate:
        check_prompts(languages)


def model_context(model_config: Any) -> int | None:
    """The longest sequence the model's positions cover, from its config (None when it does not say)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for name in CONTEXT_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_model(request: RunOptions, model_config: Any, resolved: Any) -> Any:
    """The checks of item 5; returns the model built on ``meta`` (shapes only)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from neural_quantization.nn.modules import UnsupportedModelError, find_decoder_layers

    config = request.config
    context = model_context(model_config)
    if context is not None:
        lengths = [("--seq-len", config.seq_len)]
        if request.eval_data is not None or request.self_evaluate:
            lengths.append(("--eval-seq-len", request.eval_seq_len))
        for flag, value in lengths:
            if value > context:
                raise ConfigError(
                    f"{flag} {value} is longer than the model's context of {context} tokens (from its config); "
                    f"use {flag} {min(context, 512)} (at most {context})."
                )
    model_type = getattr(model_config, "model_type", None)
    if request.export_format == "gguf":
        from neural_quantization.export.gguf import ARCHITECTURES

        if model_type not in ARCHITECTURES:
            raise ValueError(f"--format gguf exports the Llama architecture ({', '.join(sorted(ARCHITECTURES))}); "
                             f"{request.model_name} is {model_type!r}. Use --format gptq or compressed-tensors.")
    if request.stream_weights and resolved.gguf_file:
        raise ValueError(f"{resolved.description} is a GGUF file; --stream-weights needs a safetensors checkpoint. "
                         "Quantize it without streaming, or convert it to safetensors first.")
    from neural_quantization.models.loading import load_dtype
    from neural_quantization.nn.modules import resolve_device

    kwargs = {"trust_remote_code": True} if request.trust_remote_code else {}
    dtype = load_dtype(resolved, model_config, config.checkpoint_dtype, resolve_device(config.device))
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, **kwargs)
    except (ValueError, KeyError, TypeError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UnsupportedModelError(f"{request.model_name} ({model_type}) is not a causal LM transformers can "
                                    f"build: {first}") from None
    _, layers = find_decoder_layers(model)
    _check_export_shapes(request, model, layers[0])
    if config.kernel_backend == "marlin":
        check_marlin_shapes(model, config)
    return model


def _plan_memory(request: RunOptions, model: Any, resolved: Any) -> Any:
    """6. with a memory budget, the plan that fits it (``models/preflight.plan_for_budget``), or a
    ``BudgetError`` naming what would fit. Without one, the same search against this machine's free
    memory, used only where the run as asked would not fit (None: run as asked; the runner's own
    estimate then prints the advice). Streaming is a candidate where the options allow it
    (``RunOptions``' rules decide: the same rules as ``--stream-weights`` given by hand)."""
    import dataclasses

    from neural_quantization.models.preflight import BudgetError, plan_for_budget
    from neural_quantization.nn.modules import resolve_device

    budgeted = request.max_gpu_memory is not None or request.max_cpu_memory is not None
    try:
        dataclasses.replace(request, stream_weights=True)
        can_stream = resolved.gguf_file is None
    except ConfigError:
        can_stream = False
    config = request.config
    try:
        plan = plan_for_budget(model, config, config.num_samples, config.seq_len, resolve_device(config.device),
                               device_budget=request.max_gpu_memory, host_budget=request.max_cpu_memory,
                               stream_weights=request.stream_weights, activations_on_host=request.offload_activations,
                               can_stream=can_stream)
    except BudgetError:
        if budgeted:
            raise
        return None
    return plan if budgeted or plan.changes else None


def check_marlin_shapes(model: Any, config: QuantizationConfig) -> None:
    """Fail before quantizing when a layer to be quantized has a shape vLLM's Marlin kernels refuse."""
    from neural_quantization.config import ConfigError, marlin_shape_problems
    from neural_quantization.nn.modules import find_decoder_layers, find_linear_layers

    _, layers = find_decoder_layers(model)
    problems = [
        problem
        for block in layers[:1]  # every decoder layer has the same shapes
        for name, linear in find_linear_layers(block).items()
        for problem in marlin_shape_problems(name, linear.in_features, linear.out_features, config.group_size)
    ]
    if problems:
        raise ConfigError(
            "kernel_backend='marlin': this model's layers do not fit vLLM's Marlin kernels ("
            + "; ".join(problems)
            + "). Use --kernel-backend auto (vLLM then serves the checkpoint with its gptq kernels)."
        )


def _check_export_shapes(request: RunOptions, model: Any, block: Any) -> None:
    """The layers to quantize (one decoder layer's linears; every layer has the same shapes, plus
    ``lm_head`` if asked) against the export format's shape rules."""
    from neural_quantization.nn.modules import find_linear_layers

    if request.export_format == "gptq":
        return
    linears = dict(find_linear_layers(block))
    if request.config.quantize_lm_head and model.get_output_embeddings() is not None:
        linears["lm_head"] = model.get_output_embeddings()
    for name, linear in linears.items():
        if request.export_format == "compressed-tensors":
            from neural_quantization.export.compressed_tensors import shape_problem

            problem = shape_problem(linear.in_features, request.config.group_size)
        else:
            from neural_quantization.export.gguf import shape_problem

            problem = shape_problem(linear.in_features, linear.bias is not None)
        if problem:
            raise ValueError(f"--format {request.export_format}: {name}: {problem}")


def check_run(request: RunOptions) -> CheckedRun:
    """Run every check (module docstring) and return what the run will use; writes nothing."""
    from neural_quantization.export.directories import check_output_dir
    from neural_quantization.models.loading import load_model_config, resolve_model

    _check_export_format(request)
    check_devices(request.config.device, request.devices)
    output_dir = check_output_dir(request.output_dir, request.overwrite)
    work_dir, finished = _check_work_dir(request)
    _check_data(request)
    resolved = resolve_model(request.model_name)
    model_config = load_model_config(resolved, trust_remote_code=request.trust_remote_code)
    model = _check_model(request, model_config, resolved)
    memory_plan = _plan_memory(request, model, resolved)
    return CheckedRun(resolved=resolved, model_config=model_config, output_dir=output_dir, work_dir=work_dir,
                      finished_work_dir=finished, memory_plan=memory_plan)
