"""The Python API: ``Quantizer(config).quantize_model(model, calibration_data) -> (model, results)``.

``MistralQuantizer``, ``LlamaQuantizer``, ``GemmaQuantizer`` and ``QwenQuantizer`` are the same
class under the names users know: the pipeline discovers each architecture's layers by itself.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from neural_quantization._version import __version__
from neural_quantization.config import QuantizationConfig, check_storage_options
from neural_quantization.export.checkpoint import (
    attach_save_pretrained,
    gptq_quantization_config,
    gptq_scale_names,
    stored_bytes,
    unique_state_items,
)
from neural_quantization.nn.modules import find_decoder_layers, resolve_device
from neural_quantization.models.layer_storage import LayerStorage, WorkDir, tensor_fingerprint
from neural_quantization.models.sequential import quantize_decoder_layers
from neural_quantization.nn.qlinear import QuantLinear

FP16_BYTES = 2
FP16_MAX = 65504.0


@dataclass
class QuantizationResults:
    """Measured outcome of one run. Every number is computed from the model, none is a target.

    final_compression_ratio: fp16 bytes of the quantized linear weights / bytes of their packed
        tensors (qweight + qzeros + scales + g_idx); 4-bit g128 gives about 3.9.
    stages: for cascade runs (``config.cascade_stages``), one dict per stage with its bits, measured
        compression, seconds and per-layer losses (see ``models/cascade.py``); ``layers`` then holds
        the final stage's layers (sequential) or the stored wide layers (nested). Empty otherwise.
    model_compression_ratio: fp16 bytes of the whole model / bytes of the quantized model's tensors
        (embeddings, norms and lm_head stay in their dtype, so this is lower).
    memory_reduction: (1 - quantized bytes / fp16 bytes) × 100 for the whole model.
    """

    model: str
    config: dict[str, Any]
    final_compression_ratio: float
    model_compression_ratio: float
    memory_reduction: float
    size_bytes: dict[str, int]
    quantization_seconds: float
    calibration: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    device: str = "cpu"
    stages: list[dict[str, Any]] = field(default_factory=list)  # cascade runs: one entry per stage
    work_dir: str | None = None  # where finished layers were written (resume / streamed runs)
    rotation: dict[str, Any] | None = None  # config.rotate: what models/rotation.py did (RotationReport)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def mean_layer_loss(self) -> float | None:
        losses = [layer["loss"] for layer in self.layers if layer["loss"] is not None]
        return sum(losses) / len(losses) if losses else None


def resolve_devices(device: torch.device, devices: list[str] | None) -> list[torch.device]:
    """The devices a run uses: ``devices`` as given, else all visible GPUs for an unindexed "cuda"."""
    if devices:
        return [torch.device(d) for d in devices]
    if device.type == "cuda" and device.index is None:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


def settle_checkpoint_dtype(model: nn.Module, requested: str | None) -> torch.dtype:
    """Choose the dtype of the unquantized float tensors (``QuantizationConfig.checkpoint_dtype``),
    round them to it in place (their storage keeps the compute dtype) and record it as
    ``model.config.dtype``, which the checkpoint stores them in and loaders run the model in.

    Default: the model's own 16-bit dtype, else bfloat16 (a GGUF or float32 source records none).
    Not float16: models trained in bfloat16 can overflow it at run time (Gemma-3-270M's logits are
    NaN in float16 and finite in bfloat16, measured). Layers of a streamed run are on ``meta`` here;
    the checkpoint casts them when it writes their shards.
    """
    from neural_quantization.config import ConfigError

    gptq_scales = gptq_scale_names(model)
    floats = [t for name, t in model.state_dict(keep_vars=True).items()
              if t.is_floating_point() and not t.is_meta and name not in gptq_scales]
    current = floats[0].dtype if floats else torch.float32
    if requested is not None:
        dtype = getattr(torch, requested)
    elif current in (torch.float16, torch.bfloat16) or not floats:
        dtype = current
    else:
        dtype = torch.bfloat16
    if dtype == torch.float16 and any(float(t.detach().abs().max()) > FP16_MAX for t in floats if t.numel()):
        raise ConfigError("the model's unquantized tensors hold values beyond float16's range (65504); store them "
                          "as bfloat16 (--dtype bfloat16) or float32.")
    with torch.no_grad():
        for t in floats:
            if t.dtype != dtype and dtype.itemsize < t.dtype.itemsize:
                t.data.copy_(t.data.to(dtype))
    model.config.dtype = dtype
    return dtype


def measure_sizes(model: nn.Module, reference_fp16_bytes: int) -> dict[str, Any]:
    """Bytes of the quantized model (as its checkpoint stores it) and of its quantized linears, against fp16."""
    quantized_bytes = stored_bytes(model)
    linear_fp16 = linear_packed = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            linear_fp16 += module.in_features * module.out_features * FP16_BYTES
            linear_packed += sum(
                t.numel() * t.element_size() for t in (module.qweight, module.qzeros, module.scales, module.g_idx)
            )
    return {
        "final_compression_ratio": linear_fp16 / linear_packed if linear_packed else 1.0,
        "model_compression_ratio": reference_fp16_bytes / quantized_bytes,
        "memory_reduction": (1 - quantized_bytes / reference_fp16_bytes) * 100,
        "size_bytes": {
            "reference": reference_fp16_bytes,
            "quantized": quantized_bytes,
            "quantized_linears_fp16": linear_fp16,
            "quantized_linears_packed": linear_packed,
        },
    }


class Quantizer:
    """Quantize a Hugging Face causal LM layer by layer with GPTQ (or RTN).

    >>> config = QuantizationConfig(bits=4, group_size=128)
    >>> model, results = Quantizer(config).quantize_model("smollm2-135m", "./texts/")  # doctest: +SKIP
    >>> model.save_pretrained("./smollm2-w4")  # doctest: +SKIP
    """

    def __init__(self, config: QuantizationConfig | None = None, **overrides: Any) -> None:
        config = config or QuantizationConfig()
        self.config = config.replace(**overrides) if overrides else config

    def quantize_model(
        self,
        model: nn.Module | str | Any,
        calibration_data: Any = None,
        tokenizer: Any = None,
        target_languages: list[str] | None = None,
        on_layer_done: Callable[[int, int], None] | None = None,
        model_name: str | None = None,
        work_dir: str | os.PathLike | None = None,
        resume: bool = False,
        stream_weights: bool = False,
        offload_activations: bool = False,
        devices: list[str] | None = None,
    ) -> tuple[nn.Module, QuantizationResults]:
        """Quantize every linear layer of the decoder blocks, in place; return ``(model, results)``.

        model: a transformers causal LM, a :class:`~neural_quantization.models.loading.LoadedModel`,
            or a name: a built-in alias (``smollm2-135m``, ``gemma3-270m``), a local directory, a
            ``.gguf`` file or a Hugging Face id.
        calibration_data: a list of strings, a text file, a directory of ``{lang}.txt`` /
            ``{lang}.calib.txt`` files, a dict language -> texts, a (num_samples, seq_len) tensor of
            token ids, or None to let the model write its own calibration text.
        tokenizer: needed when ``model`` is a module and the calibration data is text.
        target_languages: overrides ``config.target_languages`` for calibration balancing.
        work_dir: write each finished decoder layer there as it is produced (see
            ``models/layer_storage.py``); with ``resume=True`` an interrupted run continues from the
            layers it holds and gives the same checkpoint as an uninterrupted run.
        stream_weights: ``model`` must then be a name or directory of a safetensors checkpoint; the
            decoder layers are read from disk one at a time and written to ``work_dir`` (a temporary
            directory if not given: ``results.work_dir``; delete it once the checkpoint is saved),
            so host memory stays near one layer. The returned model holds
            its decoder layers on ``meta``; ``model.save_pretrained(dir)`` assembles the checkpoint.
        offload_activations: keep the calibration activations in host memory between layers (for
            runs whose activations do not fit next to a layer on the GPU).
        devices: devices that share the work (calibration batches split across replicas of each
            layer, Hessians averaged, a group's linears solved in parallel). Default: every visible
            GPU when ``config.device`` is "auto" or "cuda", else ``config.device`` alone.
        """
        config = self.config
        if target_languages is not None:
            config = config.replace(target_languages=list(target_languages))
        check_storage_options(config, work_dir, resume, stream_weights)
        from neural_quantization.checks import check_devices

        check_devices(config.device, devices)  # a missing GPU fails here, not inside the pipeline
        from neural_quantization.models.loading import LoadedModel, load_model

        if isinstance(model, (str, os.PathLike)):
            model = load_model(str(model), stream_weights=stream_weights)
        weights = None
        if isinstance(model, LoadedModel):
            loaded = model
            model, tokenizer, model_name = loaded.model, tokenizer or loaded.tokenizer, model_name or loaded.source
            weights = loaded.weights
        if stream_weights and weights is None:
            raise ValueError("stream_weights needs the model's name or directory (or a LoadedModel from "
                             "load_model(..., stream_weights=True)), not a model already in memory.")
        check_storage_options(config, work_dir, resume, stream_weights=weights is not None)  # a streamed LoadedModel
        model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        device = resolve_device(config.device)
        model.eval()
        if config.kernel_backend == "marlin":
            from neural_quantization.checks import check_marlin_shapes

            check_marlin_shapes(model, config)

        start = time.perf_counter()
        rotation = None
        if config.rotate:
            from neural_quantization.models.rotation import rotate_residual_stream

            rotation = rotate_residual_stream(model, seed=config.seed, device=device).to_dict()
        input_ids, calibration = self._calibration_tokens(model, tokenizer, calibration_data, config)
        reference_fp16_bytes = sum(t.numel() for _, t in unique_state_items(model)) * FP16_BYTES
        stages = []
        storage = None
        if config.cascade_stages:
            from neural_quantization.models.cascade import run_cascade

            stages = run_cascade(model, input_ids, config, device, on_layer_done)
            layer_reports = stages[-1].layers
        else:
            storage = self._layer_storage(model, model_name, input_ids, config, weights, work_dir, resume,
                                          offload_activations)
            work_devices = resolve_devices(device, devices)
            device = work_devices[0]
            layer_reports = quantize_decoder_layers(model, input_ids, config, device, on_layer_done, storage=storage,
                                                    devices=work_devices)
        seconds = time.perf_counter() - start

        every_layer = [r for stage in stages for r in stage.layers] or layer_reports
        warnings = sorted({r.note for r in every_layer if r.note})
        if rotation is not None and rotation["kind"] != "hadamard":
            warnings.append(f"no Hadamard matrix of order {rotation['width']} is built here; the residual stream was "
                            f"rotated by a random orthogonal matrix instead")
        settle_checkpoint_dtype(model, config.checkpoint_dtype)
        model.config.quantization_config = gptq_quantization_config(
            config,
            base_model=model_name,
            extra={"calibration": calibration, "quantization_seconds": round(seconds, 3),
                   **({"rotation": rotation} if rotation else {})},
        )
        attach_save_pretrained(model, tokenizer, work_dir=storage.work_dir if weights is not None else None)
        sizes = measure_sizes(model, reference_fp16_bytes)
        results = QuantizationResults(
            model=model_name,
            config=config.to_dict(),
            quantization_seconds=seconds,
            calibration=calibration,
            layers=[r.to_dict() for r in layer_reports],
            warnings=warnings,
            device=", ".join(str(d) for d in work_devices) if storage is not None else str(device),
            stages=[stage.to_dict() for stage in stages],
            work_dir=str(storage.work_dir.path) if storage is not None and storage.work_dir is not None else None,
            rotation=rotation,
            **sizes,
        )
        return model, results

    @staticmethod
    def _layer_storage(
        model: nn.Module,
        model_name: str,
        input_ids: torch.Tensor,
        config: QuantizationConfig,
        weights: Any,
        work_dir: str | os.PathLike | None,
        resume: bool,
        offload_activations: bool,
    ) -> LayerStorage:
        """Where layers come from and go for this run (see ``models/layer_storage.py``)."""
        if weights is not None and work_dir is None:
            work_dir = tempfile.mkdtemp(prefix="neural-quantize-work-")
        directory = None
        if work_dir is not None:
            fingerprint = {
                "model": model_name,
                "layers": len(find_decoder_layers(model)[1]),
                "config": {k: v for k, v in config.to_dict().items() if k != "device"},
                "calibration_sha256": tensor_fingerprint(input_ids),
                "neural_quantization": __version__,
            }
            directory = WorkDir(work_dir, fingerprint, resume=resume)
        return LayerStorage(weights=weights, work_dir=directory, activations_device="cpu" if offload_activations else None)

    @staticmethod
    def _calibration_tokens(
        model: nn.Module, tokenizer: Any, calibration_data: Any, config: QuantizationConfig
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Token windows (num_samples, seq_len) and a description of where they came from."""
        if config.method == "rtn":
            return torch.empty(0, config.seq_len, dtype=torch.long), {"source": "none (RTN needs no data)"}
        if isinstance(calibration_data, torch.Tensor):
            ids = calibration_data.long()
            if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
                raise ValueError("calibration token ids must have shape (num_samples, seq_len) with seq_len >= 2.")
            return ids, {"source": "token ids", "languages": [], "tokens": int(ids.numel()), "self_generated": False}
        if tokenizer is None:
            raise ValueError("calibration from text needs a tokenizer: pass tokenizer=... or a model name.")
        from neural_quantization.calibration.sampling import calibration_from_source
        from neural_quantization.calibration.self_generated import self_generated_calibration

        if calibration_data is None:
            calib = self_generated_calibration(
                model, tokenizer, config.target_languages, config.num_samples, config.seq_len, config.seed
            )
        else:
            calib = calibration_from_source(
                calibration_data, tokenizer, config.target_languages, config.num_samples, config.seq_len, config.seed
            )
        info = {
            "source": calib.source,
            "languages": list(calib.languages),
            "tokens": int(calib.input_ids.numel()),
            "tokens_per_language": dict(calib.tokens_per_language),
            "self_generated": bool(calib.self_generated),
            "num_samples": int(calib.input_ids.shape[0]),
            "seq_len": int(calib.input_ids.shape[1]),
        }
        return calib.input_ids, info


# The names users know from the original README: one implementation, several names.
MistralQuantizer = Quantizer
LlamaQuantizer = Quantizer
GemmaQuantizer = Quantizer
QwenQuantizer = Quantizer
