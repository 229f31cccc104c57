"""Validated configuration for a quantization run.

One dataclass, :class:`QuantizationConfig`, describes everything that decides the numbers a run
produces: the grid (bits, group size, symmetry), the solver (GPTQ or RTN, damping, act-order) and
the calibration (languages, samples, tokens per sample, seed). It is validated when constructed, so
a bad combination fails before any model is loaded, with a message that says how to fix it.

``to_dict`` / ``from_dict`` round-trip it through JSON (the checkpoint records it); unknown keys
are rejected rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_BITS = (2, 3, 4, 8)
METHODS = ("gptq", "rtn")
KERNEL_BACKENDS = ("auto", "torch", "triton", "marlin")
CASCADE_MODES = ("sequential", "nested")
CLIP_SEARCHES = ("minmax", "mse", "hessian")
CHECKPOINT_DTYPES = ("float16", "bfloat16", "float32")
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


def default_clip(method: str, cascade_mode: str, cascade_stages: list[int] | None) -> str:
    """The clip search used when none is named: GPTQ's own objective wherever the solver has a Hessian
    and fixes grids itself, plain min/max for RTN and the nested cascade."""
    return "hessian" if method == "gptq" and not (cascade_mode == "nested" and cascade_stages) else "minmax"


@dataclass
class QuantizationConfig:
    """How to quantize a model.

    Grid
        bits: width of the integer codes, one of 2, 3, 4, 8.
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
        quantize_lm_head: also quantize the output projection (off by default).

    Calibration
        num_samples, seq_len: calibration windows and tokens per window.
        target_languages: languages to balance calibration over (and evaluate).
        seed: makes sampling and self-generated calibration reproducible.

    Runtime
        kernel_backend: "auto", "torch" (reference), "triton", or "marlin" (a deployment profile).
        device: where each decoder layer is solved ("auto" = CUDA if present, else CPU).
        cascade_stages: e.g. [8, 4] for the cascade mode; None for direct quantization. ``bits``
            must equal the last (narrowest) stage.
        checkpoint_dtype: the dtype of the tensors left unquantized (embeddings, norms, biases,
            ``lm_head``) in the returned model and its checkpoint, and the one loaders run it in:
            "float16", "bfloat16" or "float32". None: the model's own dtype when it is 16-bit, else
            bfloat16 (never float32 unless asked). The returned model keeps its compute dtype but
            holds values rounded to this dtype, so saving loses nothing more.
        cascade_mode: "sequential" (quantize to each width in turn, each stage starting from the
            previous stage's model and recalibrating through it) or "nested" (exactly two stages
            [wide, narrow]: one checkpoint stored at the wide width whose codes' high
            ``wide - narrow`` bits are the narrow codes, readable at either width; see
            ``core/cascade.py``). Nested needs method "gptq" and supports neither static_groups
            nor quantize_lm_head.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    clip: str | None = None
    rotate: bool = False
    method: str = "gptq"
    damp_percent: float = 0.01
    desc_act: bool = True
    static_groups: bool | None = None
    block_size: int = 128
    true_sequential: bool = True
    quantize_lm_head: bool = False
    num_samples: int = 128
    seq_len: int = 512
    calibration_batch_size: int = 8
    target_languages: list[str] = field(default_factory=lambda: list(DEFAULT_LANGUAGES))
    seed: int = 0
    kernel_backend: str = "auto"
    device: str = "auto"
    cascade_stages: list[int] | None = None
    cascade_mode: str = "sequential"
    checkpoint_dtype: str | None = None

    def __post_init__(self) -> None:
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
                    f"bits={self.bits} but cascade_stages={stages} ends at {stages[-1]} bits; set bits={stages[-1]} "
                    "(the width of the final model) or change the stages."
                )
        if self.checkpoint_dtype is not None:
            self.checkpoint_dtype = str(self.checkpoint_dtype).removeprefix("torch.")
            if self.checkpoint_dtype not in CHECKPOINT_DTYPES:
                raise ConfigError(f"checkpoint_dtype={self.checkpoint_dtype!r} is unknown; use one of "
                                  f"{CHECKPOINT_DTYPES} (e.g. --dtype float16) or leave it unset.")
        if self.cascade_mode not in CASCADE_MODES:
            raise ConfigError(f"cascade_mode={self.cascade_mode!r} is unknown; use one of {CASCADE_MODES}.")
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
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown QuantizationConfig keys {unknown}; known keys are {sorted(known)}.")
        return cls(**data)

    def replace(self, **changes: Any) -> QuantizationConfig:
        merged = {**self.to_dict(), **changes}
        if "static_groups" not in changes and merged["cascade_mode"] == "nested" and merged["cascade_stages"]:
            changes = {**changes, "static_groups": None}  # the default again: off for the nested cascade
        if "clip" not in changes and self.clip == default_clip(self.method, self.cascade_mode, self.cascade_stages):
            changes = {**changes, "clip": None}  # a defaulted clip follows the new method
        return dataclasses.replace(self, **changes)
