"""Validated configuration for a quantization run.

Two dataclasses, both validated when built. :class:`QuantizationConfig` describes everything that
decides the numbers a run produces: the grid (bits, group size, symmetry), the solver (GPTQ or RTN, damping, act-order) and
the calibration (languages, samples, tokens per sample, seed). It is validated when constructed, so
a bad combination fails before any model is loaded, with a message that says how to fix it.

:class:`RunOptions` describes a whole run around it (the model, the checkpoint's directory and
format, evaluation and gates, work directory, streaming): the CLI's ``quantize`` options are
parsed into one, and Python users build one for :func:`neural_quantization.runner.run_quantization`.
Every rule about combining options lives here, so the CLI and Python refuse the same things with
the same message; the checks that need the machine (devices, directories, data, the model's config)
are in ``checks.py``.

``QuantizationConfig.to_dict`` / ``from_dict`` round-trip it through JSON (the checkpoint records it); unknown keys
are rejected rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_BITS = (2, 3, 4, 8)
METHODS = ("gptq", "rtn")
KERNEL_BACKENDS = ("auto", "torch", "triton", "marlin")
CASCADE_MODES = ("sequential", "nested")
CLIP_SEARCHES = ("minmax", "mse", "hessian")
CHECKPOINT_DTYPES = ("float16", "bfloat16", "float32")
EXPORT_FORMATS = ("gptq", "compressed-tensors", "gguf")
DEFAULT_BITS = 4
DEFAULT_CASCADE_STAGES = (8, 4)  # what --cascade alone means
DEFAULT_LANGUAGES = ("en", "es", "fr", "de", "zh", "ja", "ar", "hi", "pt", "ru", "ko", "it", "tr", "nl", "pl")


class ConfigError(ValueError):
    """A configuration that cannot work; the message says how to fix it."""


MARLIN_GROUP_SIZES = (-1, 32, 64, 128)


def marlin_config_problems(config: QuantizationConfig) -> list[str]:
    """Why vLLM's GPTQ-Marlin kernels would refuse ``config`` (empty when they accept it).

    Marlin serves symmetric 4- or 8-bit weights with group size -1, 32, 64 or 128; act-order is
    allowed (vLLM sorts ``g_idx`` at load). Shape rules are checked per layer by
    :func:`marlin_shape_problems`. Source: vLLM ``gptq_marlin.py`` / ``marlin_utils.py`` (docs/formats.md).
    """
    problems = []
    if config.bits not in (4, 8):
        problems.append(f"bits={config.bits} (Marlin runs 4 or 8 bits; use --bits 4)")
    if not config.sym:
        problems.append("asymmetric grid (Marlin's GPTQ path needs --sym)")
    if config.group_size not in MARLIN_GROUP_SIZES:
        problems.append(f"group_size={config.group_size} (Marlin accepts {MARLIN_GROUP_SIZES})")
    if config.cascade_stages and any(b not in (4, 8) for b in config.cascade_stages):
        problems.append(f"cascade_stages={config.cascade_stages} (every stored width must be 4 or 8)")
    return problems


def marlin_shape_problems(name: str, in_features: int, out_features: int, group_size: int) -> list[str]:
    """Layer shapes Marlin's tiles cannot take: N must divide by 64, K by 128 and by the group size."""
    problems = []
    if out_features % 64:
        problems.append(f"{name}: out_features={out_features} is not a multiple of 64")
    if in_features % 128:
        problems.append(f"{name}: in_features={in_features} is not a multiple of 128")
    if group_size != -1 and in_features % group_size:
        problems.append(f"{name}: in_features={in_features} is not a multiple of group_size={group_size}")
    return problems


#: Named combinations, chosen by what ``benchmarks/quality_peers.py`` measured (docs/quality.md).
#: Each is a set of QuantizationConfig fields; options given explicitly override them.
PRESETS: dict[str, dict[str, Any]] = {
    # round to nearest: seconds, no calibration data; the baseline
    "fast": {"method": "rtn", "rotate": False, "sym": True},
    # GPTQ, act-order with static groups, clip search on GPTQ's objective: every engine we export to
    # loads it and runs it at full speed (vLLM's Marlin, GPTQModel, our kernels)
    "standard": {"method": "gptq", "rotate": False, "sym": True},
    # the most accurate measured: residual-stream rotation + asymmetric grid. The checkpoint is an
    # ordinary asymmetric GPTQ one (vLLM's gptq kernels and transformers load it; Marlin needs sym)
    "best": {"method": "gptq", "rotate": True, "sym": False},
}


DYNAMIC_KEYS = ("bits", "group_size")


def dynamic_override(dynamic: dict[str, dict[str, Any]] | None, name: str) -> dict[str, Any]:
    """The overrides for module ``name`` in a ``dynamic`` table (GPTQModel's and vLLM's format: keys
    are regular expressions matched with ``re.match`` against the module's full name, optionally
    prefixed ``+:``; the first match wins); ``{}`` when none matches."""
    for pattern, override in (dynamic or {}).items():
        if re.match(pattern.removeprefix("+:"), name):
            return dict(override)
    return {}


def check_dynamic(dynamic: Any) -> dict[str, dict[str, int]]:
    """Validate a ``dynamic`` table (see :func:`dynamic_override`); raise :class:`ConfigError` with the fix."""
    if not isinstance(dynamic, dict):
        raise ConfigError("dynamic must map module-name patterns to overrides, e.g. "
                          "{'+:model\\.layers\\.0\\.': {'bits': 8}}.")
    checked = {}
    for pattern, override in dynamic.items():
        if not isinstance(pattern, str) or pattern.startswith("-:"):
            raise ConfigError(f"dynamic key {pattern!r}: skipping modules ('-:') is not supported yet; "
                              "give '+:<regex>' keys with bits / group_size overrides.")
        try:
            re.compile(pattern.removeprefix("+:"))
        except re.error as err:
            raise ConfigError(f"dynamic key {pattern!r} is not a valid regular expression ({err}).") from None
        if not isinstance(override, dict) or not override or set(override) - set(DYNAMIC_KEYS):
            raise ConfigError(f"dynamic[{pattern!r}] = {override!r}; give a non-empty dict of {DYNAMIC_KEYS}.")
        bits, group_size = override.get("bits"), override.get("group_size")
        if bits is not None and bits not in SUPPORTED_BITS:
            raise ConfigError(f"dynamic[{pattern!r}].bits={bits}; use one of {SUPPORTED_BITS}.")
        if group_size is not None and (not isinstance(group_size, int) or (group_size != -1 and group_size <= 0)):
            raise ConfigError(f"dynamic[{pattern!r}].group_size={group_size!r}; use -1 or a positive size.")
        checked[pattern] = dict(override)
    return checked


def default_clip(method: str, cascade_mode: str, cascade_stages: list[int] | None) -> str:
    """The clip search used when none is named: GPTQ's own objective wherever the solver has a Hessian
    and fixes grids itself, plain min/max for RTN and the nested cascade."""
    return "hessian" if method == "gptq" and not (cascade_mode == "nested" and cascade_stages) else "minmax"


def default_gptaq(method: str, cascade_stages: list[int] | None) -> bool:
    """Asymmetric calibration when none is named: on wherever GPTQ solves each width directly."""
    return method == "gptq" and cascade_stages is None


@dataclass
class QuantizationConfig:
    """How to quantize a model.

    Grid
        bits: width of the integer codes, one of 2, 3, 4, 8. None (the default): 4, or the last
            (narrowest) width of ``cascade_stages``. An explicit value is kept as given: one that
            contradicts ``cascade_stages`` is refused, never rewritten.
        group_size: input columns that share one scale/zero; -1 means one per output row
            ("per channel"). Where it does not divide a layer's input size the last group is shorter.
        sym: symmetric grid (zero fixed at 2**(bits-1)) or asymmetric (zero chosen per group).
        clip: how each group's grid is chosen: "minmax" (the group's range), "mse" (a clipping
            ratio per row that minimises the weights' rounding error) or "hessian" (the ratio that
            minimises GPTQ's own objective, the Hessian-weighted output error; GPTQ only). None (the
            default) means "hessian" for GPTQ, "minmax" for RTN and the nested cascade. Measured
            (docs/quality.md): W4 g64 on SmolLM2-135M, +14.5 / +16.1 % perplexity on the two
            evaluation sets against +21.4 / +21.5 % with min/max; the checkpoint format is unchanged.

    Transforms before the solve
        rotate: rotate the residual stream by a randomised Hadamard matrix merged into the weights
            (QuaRot's first rotation; ``models/rotation.py``), after folding the norms' scales into
            the linears that read them. The model computes the same function; its weights hold
            fewer outliers. The checkpoint is an ordinary one (norm scales of 1, an untied lm_head).
            Needs pre-norm RMSNorm blocks (Llama, Mistral, Qwen, Phi-3, Gemma 1; not Gemma 2/3).
        awq: activation-aware scaling (AWQ, Lin et al. 2024; ``core/awq.py``, ``models/awq.py``):
            before each decoder layer is solved, scale the input channels of each group of linears
            that read one input (q/k/v, gate/up, down; o where the head counts match) by
            ``s = mean|x|^α`` (normalised), with α searched on the calibration inputs to minimise
            the group's round-to-nearest output error, and fold ``1/s`` into the norm or linear
            that produces the input. The model computes the same function; the checkpoint is an
            ordinary GPTQ one. Off by default (GPTQ only; not with cascades). Costs one more
            forward of each layer over the calibration data and a search per group.

    Solver
        method: "gptq" (error compensation through the inverse Hessian) or "rtn" (round to nearest).
        damp_percent: damping added to the Hessian diagonal, as a fraction of its mean (0.01 = 1 %);
            raised automatically when the Cholesky factorisation fails.
        desc_act: act-order: quantize columns in order of decreasing Hessian diagonal (default on).
        static_groups: with desc_act, fix each group's scale/zero before the solve, so groups stay
            contiguous in the original column order (g_idx is then trivial, so every kernel and
            engine runs the checkpoint at full speed). None (the default) means on, except for the
            nested cascade, which chooses its grids during the solve.
            The defaults were chosen by measurement (``benchmarks/quality_peers.py``, docs/quality.md):
            on SmolLM2-135M W4 g64 act-order with static groups cut the perplexity increase of
            plain GPTQ roughly in half on both evaluation sets.
        block_size: columns per lazy-update block.
        true_sequential: quantize a decoder layer's sub-layers in execution order, each one seeing
            the already-quantized outputs of the ones before it.
        gptaq: asymmetric calibration (GPTAQ): fit each linear, fed the quantized model's inputs,
            to the *float* model's outputs for the same tokens, instead of to its own float weights
            on those inputs, so the solve also undoes the error that reached the layer
            (``core/gptq.py``). None (the default) means on for GPTQ, off for RTN and the cascades.
            Measured (docs/quality.md): W4 g64 on SmolLM2-135M, +8.3 / +9.0 % perplexity on the two
            evaluation sets against +14.5 / +16.1 % without. Costs a float copy of the layer being
            solved, a second stream of calibration activations and about twice the calibration
            forwards; the checkpoint format is unchanged.
        quantize_lm_head: also quantize the output projection (off by default).

    Calibration
        num_samples, seq_len: calibration windows and tokens per window.
        target_languages: languages to balance calibration over (and evaluate).
        seed: makes sampling and self-generated calibration reproducible.

    Runtime
        kernel_backend: "auto", "torch" (reference), "triton", or "marlin" (a deployment profile).
        device: where each decoder layer is solved ("auto" = CUDA if present, else CPU).
        cascade_stages: e.g. [8, 4] for the cascade mode (:data:`DEFAULT_CASCADE_STAGES`); None for
            direct quantization. ``bits`` must equal the last (narrowest) stage.
        checkpoint_dtype: the dtype of the tensors left unquantized (embeddings, norms, biases,
            ``lm_head``) in the returned model and its checkpoint, and the one loaders run it in:
            "float16", "bfloat16" or "float32". None: the model's own dtype when it is 16-bit, else
            bfloat16 (never float32 unless asked). The returned model keeps its compute dtype but
            holds values rounded to this dtype, so saving loses nothing more.
        cascade_mode: "sequential" (quantize to each width in turn, each stage starting from the
            previous stage's model and recalibrating through it) or "nested" (exactly two stages
            [wide, narrow]: one checkpoint stored at the wide width whose codes' high
            ``wide - narrow`` bits are the narrow codes, readable at either width; see
            ``core/cascade.py``). None (the default): "sequential" where ``cascade_stages`` is set;
            naming a mode without stages means :data:`DEFAULT_CASCADE_STAGES`. Nested needs method "gptq" and supports neither static_groups
            nor quantize_lm_head.
    """

    bits: int | None = None
    group_size: int = 128
    sym: bool = True
    clip: str | None = None
    rotate: bool = False
    awq: bool = False
    method: str = "gptq"
    damp_percent: float = 0.01
    desc_act: bool = True
    static_groups: bool | None = None
    block_size: int = 128
    true_sequential: bool = True
    gptaq: bool | None = None
    quantize_lm_head: bool = False
    num_samples: int = 128
    seq_len: int = 512
    calibration_batch_size: int = 8
    target_languages: list[str] = field(default_factory=lambda: list(DEFAULT_LANGUAGES))
    seed: int = 0
    kernel_backend: str = "auto"
    device: str = "auto"
    cascade_stages: list[int] | None = None
    cascade_mode: str | None = None
    checkpoint_dtype: str | None = None
    dynamic: dict[str, dict[str, int]] | None = None

    def __post_init__(self) -> None:
        if self.cascade_mode is None:
            self.cascade_mode = "sequential"
        elif self.cascade_stages is None:  # a cascade mode named alone means the default stages
            self.cascade_stages = list(DEFAULT_CASCADE_STAGES)
        if self.bits is None:
            self.bits = self.cascade_stages[-1] if self.cascade_stages else DEFAULT_BITS
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS} (e.g. --bits 4).")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise ConfigError(
                f"group_size={self.group_size!r} is invalid; use -1 for one scale per output channel "
                "or a positive number of input columns such as 32, 64 or 128."
            )
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is unknown; use one of {METHODS}.")
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"damp_percent={self.damp_percent} must lie in (0, 1); 0.01 is the usual value.")
        if self.clip is None:
            self.clip = default_clip(self.method, self.cascade_mode, self.cascade_stages)
        if self.clip not in CLIP_SEARCHES:
            raise ConfigError(f"clip={self.clip!r} is unknown; use one of {CLIP_SEARCHES} (e.g. --clip hessian).")
        if self.clip == "hessian" and self.method != "gptq":
            raise ConfigError("clip='hessian' weights the rounding error by the calibration Hessian, which only GPTQ "
                              "collects; use --clip mse with --method rtn, or --method gptq.")
        if self.gptaq is None:
            self.gptaq = default_gptaq(self.method, self.cascade_stages)
        if self.gptaq and self.method != "gptq":
            raise ConfigError("gptaq (asymmetric calibration) changes GPTQ's objective; use method='gptq' or drop gptaq.")
        if self.gptaq and self.cascade_stages is not None:
            raise ConfigError("gptaq (asymmetric calibration) and a cascade do not combine; drop --gptaq or the cascade.")
        if self.awq and self.method != "gptq":
            raise ConfigError("awq (activation-aware scaling) is searched on calibration data in the GPTQ pipeline; "
                              "use method='gptq' (--method gptq) or drop awq (--no-awq).")
        if self.awq and self.cascade_stages is not None:
            raise ConfigError("awq (activation-aware scaling) and a cascade do not combine yet; drop --awq or the "
                              "cascade.")
        if self.static_groups is None:  # on, except where the nested cascade picks grids during its solve
            self.static_groups = not (self.cascade_mode == "nested" and self.cascade_stages is not None)
        if self.block_size <= 0:
            raise ConfigError(f"block_size={self.block_size} must be positive; 128 is the usual value.")
        if self.num_samples <= 0 or self.seq_len <= 1:
            raise ConfigError("num_samples must be >= 1 and seq_len >= 2 (e.g. --num-samples 128 --seq-len 512).")
        if self.calibration_batch_size <= 0:
            raise ConfigError("calibration_batch_size must be >= 1.")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ConfigError(f"kernel_backend={self.kernel_backend!r} is unknown; use one of {KERNEL_BACKENDS}.")
        if self.kernel_backend == "marlin":
            problems = marlin_config_problems(self)
            if problems:
                raise ConfigError(
                    "kernel_backend='marlin' (the vLLM Marlin deployment profile) cannot serve this configuration: "
                    + "; ".join(problems)
                )
        if isinstance(self.target_languages, str):
            self.target_languages = [x for x in self.target_languages.replace(",", " ").split() if x]
        self.target_languages = list(self.target_languages)
        if not self.target_languages:
            raise ConfigError("target_languages is empty; name at least one language, e.g. ['en'].")
        if self.cascade_stages is not None:
            stages = list(self.cascade_stages)
            if len(stages) < 2 or any(b not in SUPPORTED_BITS for b in stages):
                raise ConfigError(f"cascade_stages={stages} must list two or more widths from {SUPPORTED_BITS}, e.g. [8, 4].")
            if any(a <= b for a, b in zip(stages, stages[1:])):
                raise ConfigError(f"cascade_stages={stages} must go from wide to narrow, e.g. [8, 4].")
            self.cascade_stages = stages
            if self.bits != stages[-1]:
                raise ConfigError(
                    f"bits={self.bits} but cascade_stages={stages} ends at {stages[-1]} bits: the last stage is the "
                    f"width of the final model. Leave bits out (or set bits={stages[-1]}), or end the stages at "
                    f"{self.bits}."
                )
        if self.checkpoint_dtype is not None:
            self.checkpoint_dtype = str(self.checkpoint_dtype).removeprefix("torch.")
            if self.checkpoint_dtype not in CHECKPOINT_DTYPES:
                raise ConfigError(f"checkpoint_dtype={self.checkpoint_dtype!r} is unknown; use one of "
                                  f"{CHECKPOINT_DTYPES} (e.g. --dtype float16) or leave it unset.")
        if self.cascade_mode not in CASCADE_MODES:
            raise ConfigError(f"cascade_mode={self.cascade_mode!r} is unknown; use one of {CASCADE_MODES}.")
        if self.dynamic is not None:
            self.dynamic = check_dynamic(self.dynamic)
            if self.cascade_stages is not None:
                raise ConfigError("per-module widths (dynamic) and a cascade do not combine; drop one of them.")
        if self.cascade_mode == "nested" and self.cascade_stages is not None:
            if len(self.cascade_stages) != 2:
                raise ConfigError(
                    f"the nested cascade takes exactly two widths [wide, narrow] (e.g. [8, 4]): the narrow codes "
                    f"are the high bits of the wide ones; got cascade_stages={self.cascade_stages}."
                )
            if self.method != "gptq":
                raise ConfigError("the nested cascade solves both widths with GPTQ; use method='gptq'.")
            if self.static_groups:
                raise ConfigError("the nested cascade chooses its grids during the solve; use static_groups=False (--no-static-groups).")
            if self.quantize_lm_head:
                raise ConfigError("the nested cascade does not quantize lm_head; drop quantize_lm_head.")
            if self.clip == "hessian":
                raise ConfigError("the nested cascade chooses its grids by min/max or MSE; use --clip minmax or --clip mse.")

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> QuantizationConfig:
        """The configuration of a named preset (:data:`PRESETS`), with ``overrides`` on top."""
        if preset not in PRESETS:
            raise ConfigError(f"preset={preset!r} is unknown; use one of {sorted(PRESETS)} (e.g. --preset best).")
        return cls(**{**PRESETS[preset], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if "mse_clip" in data and "clip" not in data:  # records written before the clip search had a name
            data = {**{k: v for k, v in data.items() if k != "mse_clip"}, "clip": "mse" if data["mse_clip"] else "minmax"}
        if "gptaq" not in data:  # records written before asymmetric calibration existed: it was off
            data = {**data, "gptaq": False}
        if data.get("cascade_stages") is None:  # a direct run's record names the mode's default
            data = {**data, "cascade_mode": None}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown QuantizationConfig keys {unknown}; known keys are {sorted(known)}.")
        return cls(**data)

    def for_module(self, name: str) -> QuantizationConfig:
        """The configuration module ``name`` (e.g. ``model.layers.3.mlp.down_proj``) is quantized with:
        this one, with the first matching :attr:`dynamic` entry's overrides on top."""
        override = dynamic_override(self.dynamic, name)
        return self.replace(**override) if override else self

    def replace(self, **changes: Any) -> QuantizationConfig:
        merged = {**self.to_dict(), **changes}
        if merged["cascade_stages"] is None and "cascade_mode" not in changes:
            changes = {**changes, "cascade_mode": None}  # no cascade: the mode is not a choice
        if "static_groups" not in changes and merged["cascade_mode"] == "nested" and merged["cascade_stages"]:
            changes = {**changes, "static_groups": None}  # the default again: off for the nested cascade
        if "bits" not in changes and self.bits == (self.cascade_stages[-1] if self.cascade_stages else DEFAULT_BITS):
            changes = {**changes, "bits": None}  # a defaulted width follows new cascade stages
        if "clip" not in changes and self.clip == default_clip(self.method, self.cascade_mode, self.cascade_stages):
            changes = {**changes, "clip": None}  # a defaulted clip follows the new method
        if "gptaq" not in changes and self.gptaq == default_gptaq(self.method, self.cascade_stages):
            changes = {**changes, "gptaq": None}  # so does a defaulted gptaq
        return dataclasses.replace(self, **changes)


@dataclass
class QualityGates:
    """Limits on perplexity degradation, in percent (``reporting/gates.py`` evaluates them).

    max_degradation: limit on the average degradation over languages (``--max-degradation``).
    max_language_degradation: limit on each language's degradation (``--max-language-degradation``).
    """

    max_degradation: float = 2.0
    max_language_degradation: float = 3.0

    def __post_init__(self) -> None:
        for name in ("max_degradation", "max_language_degradation"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(
                    f"{name}={value!r} must be a finite number of percent >= 0, e.g. {flag} 3.0."
                )
            setattr(self, name, float(value))

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def check_storage_options(config: QuantizationConfig, work_dir: Any, resume: bool, stream_weights: bool) -> None:
    """Combinations of a run's storage options (work directory, resume, streamed weights) with its
    quantization options that cannot work; raises :class:`ConfigError` with the fix."""
    if config.cascade_stages and (work_dir is not None or resume or stream_weights):
        raise ConfigError("cascade runs cannot use a work directory, --resume or --stream-weights yet; drop --cascade "
                          "or run without --work-dir/--resume/--stream-weights.")
    if config.rotate and stream_weights:
        raise ConfigError("--rotate changes every weight of the model before the first layer is solved, so it needs the "
                          "model in memory; drop --stream-weights (or --rotate).")
    if resume and work_dir is None:
        raise ConfigError("--resume (resume=True) needs the work directory of the interrupted run: --work-dir DIR (work_dir=DIR).")


#: what :func:`parse_size` reads: decimal units (GB = 10⁹ bytes, as disks and clouds count) and
#: binary ones (GiB = 2³⁰, as GPU memory is usually quoted); a bare number is bytes
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str | int, flag: str = "size") -> int:
    """Bytes of ``text``: ``12GiB`` (12 · 2³⁰), ``3.2GB`` (3.2 · 10⁹), ``850MB``, ``123456``.

    Raises ``ValueError`` naming ``flag`` with the accepted forms::

        parse_size("12GiB")   -> 12884901888
        parse_size("3.2 GB")  -> 3200000000
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if unit not in SIZE_UNITS:
            raise ValueError(f"{flag} {text!r}: give a size like 12GiB (2^30 bytes), 3.2GB (10^9 bytes) or 850MB.")
        value = int(float(match.group(1)) * SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"{flag} {text!r} must be positive, e.g. 12GiB.")
    return value


@dataclass
class RunOptions:
    """One quantization run, end to end: load ``model_name``, quantize it with ``config``, save the
    checkpoint in ``export_format`` to ``output_dir``, evaluate it and report.

    Model and output
        model_name: alias (``smollm2-135m``), local directory, ``.gguf`` file or Hugging Face id.
        output_dir: a new or empty directory, or (with ``overwrite``) one holding a checkpoint of ours.
        export_format: "gptq", "compressed-tensors" or "gguf" (:data:`EXPORT_FORMATS`).
        trust_remote_code: run the model's own Python code (off: never run code you have not read).
    Calibration and evaluation
        calibration_data: as :meth:`Quantizer.quantize_model` takes it; None: the model writes its own.
        eval_data: directory of ``{lang}.eval.txt`` / ``{lang}.txt``: evaluate right after quantizing.
        self_evaluate: without ``eval_data``, evaluate on held-out text the model writes (the demo).
        eval_seq_len, max_eval_windows: tokens per evaluation window; cap on windows per language.
        gates: the quality gates (:class:`QualityGates`, % perplexity increase on average and in the
            worst language); ``fail_on_gate``: a failed gate makes the run fail (exit 3).
    Storage
        work_dir: where finished layers are written as they are produced (default
            ``OUTPUT_DIR.work``; cascades use none); ``resume`` continues an interrupted run from it;
            ``keep_work_dir`` keeps it after the checkpoint is saved.
        stream_weights: read the decoder layers from the safetensors checkpoint one at a time.
        offload_activations: keep calibration activations in host memory between layers; None (the
            default): only when the pre-flight estimate says the run does not fit the GPU otherwise.
        devices: devices sharing the work (default: every visible GPU for device auto/cuda).
        max_gpu_memory, max_cpu_memory: memory budgets (bytes, or a size such as ``"12GiB"``): the
            pre-flight estimate picks the fastest plan (activations on the host, weights streamed
            from disk, smaller calibration batches) that stays within them, or the run is refused
            before any work with the option that would make it fit; a GPU budget is also enforced
            as the process's memory fraction on each GPU.
    Output
        report_json: write the JSON report there (and .md, .png beside it).
        optimize_for_edge, edge_context, edge_batch: print the memory needed on edge devices.
        show_progress: progress bars.
    """

    model_name: str
    output_dir: str | os.PathLike
    config: QuantizationConfig = field(default_factory=QuantizationConfig)
    overwrite: bool = False
    export_format: str = "gptq"
    trust_remote_code: bool = False
    calibration_data: Any = None
    eval_data: str | os.PathLike | None = None
    self_evaluate: bool = False
    eval_seq_len: int = 512
    max_eval_windows: int | None = None
    gates: QualityGates = field(default_factory=QualityGates)
    fail_on_gate: bool = True
    work_dir: str | os.PathLike | None = None
    resume: bool = False
    keep_work_dir: bool = False
    stream_weights: bool = False
    offload_activations: bool | None = None
    devices: list[str] | None = None
    max_gpu_memory: int | str | None = None
    max_cpu_memory: int | str | None = None
    report_json: str | os.PathLike | None = None
    optimize_for_edge: bool = False
    edge_context: int = 4096
    edge_batch: int = 1
    show_progress: bool = True

    def __post_init__(self) -> None:
        config = self.config
        if not isinstance(config, QuantizationConfig):
            raise ConfigError(f"config must be a QuantizationConfig, not {type(config).__name__}.")
        fmt = self.export_format
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"--format {fmt!r} is unknown; use one of {', '.join(EXPORT_FORMATS)}.")
        if fmt != "gptq" and config.cascade_stages and config.cascade_mode == "nested":
            raise ConfigError(f"--format {fmt} cannot hold a nested cascade (two widths in one set of codes); "
                              "use --format gptq or --cascade-mode sequential.")
        if self.eval_seq_len < 2:
            raise ConfigError(f"--eval-seq-len {self.eval_seq_len} must be at least 2 (512 is usual).")
        for name in ("max_eval_windows", "edge_context", "edge_batch"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {value} must be positive.")
        for name in ("max_gpu_memory", "max_cpu_memory"):
            value = getattr(self, name)
            if value is not None:
                try:
                    setattr(self, name, parse_size(value, f"--{name.replace('_', '-')}"))
                except ValueError as err:
                    raise ConfigError(str(err)) from None
        if self.stream_weights and (self.eval_data or self.self_evaluate or fmt != "gptq"):
            raise ConfigError("--stream-weights writes a --format gptq checkpoint without evaluating it (the float "
                              "model is never in memory); evaluate it afterwards with `neural-quantize eval`.")
        check_storage_options(config, self.work_path, self.resume, self.stream_weights)
        work = self.work_path
        if work is not None and work.resolve() == Path(self.output_dir).expanduser().resolve():
            raise ConfigError("--work-dir must differ from --output-dir (the checkpoint replaces its directory).")

    @property
    def work_path(self) -> Path | None:
        """The run's work directory: ``work_dir``, else ``OUTPUT_DIR.work``; None for cascade runs."""
        if self.config.cascade_stages and self.work_dir is None:
            return None
        return Path(self.work_dir or f"{str(self.output_dir).rstrip('/')}.work").expanduser()

    @property
    def evaluates(self) -> bool:
        return self.eval_data is not None or self.self_evaluate


@dataclass
class EvalOptions:
    """``neural-quantize eval``: a quantized checkpoint measured against its base model per language.

    model: the checkpoint directory. eval_data: directory of ``{lang}.eval.txt`` / ``{lang}.txt``
    (required). baseline: the reference model (default: the base model the checkpoint records).
    The remaining fields mean what they mean in :class:`RunOptions`.
    """

    model: str | os.PathLike
    eval_data: str | os.PathLike | None
    baseline: str | None = None
    target_languages: list[str] = field(default_factory=lambda: list(DEFAULT_LANGUAGES))
    device: str = "auto"
    trust_remote_code: bool = False
    eval_seq_len: int = 512
    max_eval_windows: int | None = None
    gates: QualityGates = field(default_factory=QualityGates)
    fail_on_gate: bool = True
    report_json: str | os.PathLike | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.eval_data:
            raise ConfigError("eval needs --eval-data DIR (a directory of {lang}.eval.txt or {lang}.txt files).")
        if self.eval_seq_len < 2:
            raise ConfigError(f"--eval-seq-len {self.eval_seq_len} must be at least 2 (512 is usual).")
        if self.max_eval_windows is not None and self.max_eval_windows <= 0:
            raise ConfigError(f"--max-eval-windows {self.max_eval_windows} must be positive.")
        if not self.target_languages:
            raise ConfigError("--target-languages is empty; name at least one language, e.g. en.")
