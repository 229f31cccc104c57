"""Where decoder layers come from during a run, and where finished layers go.

Two independent options of the layer pipeline (``models/sequential.py``):

* **streamed weights** (:class:`CheckpointWeights`): the model is built with its decoder layers'
  parameters on the ``meta`` device (no memory); each layer's float weights are read from the
  safetensors checkpoint on disk just before the layer is quantized, and the layer goes back to
  ``meta`` once its quantized tensors are written. Host memory stays near one layer's size.
* **work directory** (:class:`WorkDir`): each finished layer's tensors (its ``state_dict`` after
  quantization: GPTQ-packed linears, norms; full names such as ``model.layers.3.mlp.up_proj.qweight``)
  are written as they are produced, one safetensors file per layer, atomically (temporary file +
  rename). A run started again with ``resume=True`` on the same work directory loads the finished
  layers instead of solving them again and replays their forward to rebuild the next layer's
  calibration inputs, so it writes the same tensors as an uninterrupted run. The per-layer files
  are also the shards of the final checkpoint when the weights are streamed
  (``export/checkpoint.py: save_streamed``).

Layout of a work directory::

    run.json                      the run's fingerprint (config, calibration tokens, model), checked on resume
    finished.json                 written once the run's checkpoint is saved (a kept work dir of a finished
                                  run: the next run into the same place removes it instead of refusing)
    layers/layer-00000.json          the layer's solve reports (loss, damping, seconds per linear)
    layers/layer-00000.safetensors   its tensors; written last, so its presence marks the layer finished
    ...
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from neural_quantization.formats.integrity import INDEX_FILE, SINGLE_FILE

RUN_FILE = "run.json"
FINISHED_FILE = "finished.json"


class WorkDirError(ValueError):
    """The work directory cannot be used for this run (with the reason and what to do)."""


class CheckpointWeights:
    """Read tensors by name from a safetensors checkpoint directory (one file, or shards + index)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: self.directory / file for name, file in weight_map.items()}
        elif (self.directory / SINGLE_FILE).is_file():
            with safe_open(str(self.directory / SINGLE_FILE), framework="pt") as f:
                self.file_of = {name: self.directory / SINGLE_FILE for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}: streaming the weights needs a "
                "safetensors checkpoint (convert .bin or GGUF checkpoints first, or run without streaming)."
            )

    def names(self) -> list[str]:
        return list(self.file_of)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each file opened once (tensors are read lazily, one at a time)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(name)
        return tensors

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keyed by the rest of its name."""
        names = [name for name in self.file_of if name.startswith(prefix)]
        return {name[len(prefix) :]: tensor for name, tensor in self.read(names).items()}


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (for recognising the same calibration tokens on resume)."""
    data = tensor.detach().to("cpu").contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


class WorkDir:
    """Finished layers of one run on disk (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any], resume: bool) -> None:
        self.path = Path(path)
        self.layers = self.path / "layers"
        run_file = self.path / RUN_FILE
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # compare as it was stored (tuples -> lists)
        if run_file.is_file():
            recorded = json.loads(run_file.read_text())
            if not resume:
                raise WorkDirError(
                    f"work directory {self.path} holds an earlier run ({len(self.finished())} layers done); "
                    "pass resume=True (--resume) to continue it, or remove the directory to start over."
                )
            if recorded != fingerprint:
                changed = sorted(k for k in set(recorded) | set(fingerprint) if recorded.get(k) != fingerprint.get(k))
                raise WorkDirError(
                    f"work directory {self.path} was written by a different run ({', '.join(changed)} differ); "
                    "resume with the same model, configuration and calibration data, or use a new work directory."
                )
        elif self.path.exists() and any(self.path.iterdir()):
            raise WorkDirError(
                f"{self.path} exists and is not a work directory of ours; choose an empty or new directory."
            )
        self.layers.mkdir(parents=True, exist_ok=True)
        if not run_file.is_file():
            _atomic_write_text(run_file, json.dumps(fingerprint, indent=1, sort_keys=True))

    @staticmethod
    def is_started(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a run of ours (its fingerprint file), finished or not."""
        return (Path(path) / RUN_FILE).is_file()

    @staticmethod
    def is_finished(path: str | os.PathLike) -> bool:
        """Whether the work directory at ``path`` belongs to a run whose checkpoint was saved."""
        return (Path(path) / FINISHED_FILE).is_file()

    @staticmethod
    def mark_finished(path: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
        """Record that the run in work directory ``path`` saved its checkpoint (at ``checkpoint``)."""
        _atomic_write_text(Path(path) / FINISHED_FILE, json.dumps({"checkpoint": str(checkpoint)}))

    def layer_file(self, index: int) -> Path:
        return self.layers / f"layer-{index:05d}.safetensors"

    def finished(self) -> list[int]:
        return WorkDir.finished_in(self.path)

    @staticmethod
    def finished_in(path: str | os.PathLike) -> list[int]:
        """Indices of the finished layers in the work directory at ``path`` (none if it does not exist)."""
        return sorted(int(p.stem.split("-")[1]) for p in (Path(path) / "layers").glob("layer-*.safetensors"))

    def has_layer(self, index: int) -> bool:
        return self.layer_file(index).is_file()

    def write_layer(self, index: int, tensors: dict[str, torch.Tensor], reports: list[dict[str, Any]]) -> None:
        """Store one finished layer's tensors (full names) and its solve reports, atomically.

        The reports go first; the layer counts as finished once its safetensors file exists.
        """
        target = self.layer_file(index)
        _atomic_write_text(target.with_suffix(".json"), json.dumps(reports, indent=1))
        partial = target.with_name(target.name + ".partial")
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        save_file(cpu, str(partial), metadata={"format": "pt"})
        os.replace(partial, target)

    def read_layer(self, index: int) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """(tensors by full name, solve reports) of a finished layer."""
        with safe_open(str(self.layer_file(index)), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return tensors, json.loads(self.layer_file(index).with_suffix(".json").read_text())


def _atomic_write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def materialize_layer(block: nn.Module, state: dict[str, torch.Tensor], device: torch.device, where: str) -> None:
    """Give ``block`` (parameters on ``meta``) the tensors ``state`` (names relative to the block) on ``device``."""
    current = block.state_dict(keep_vars=True)
    state = {
        name: tensor.to(current[name].dtype) if name in current and tensor.is_floating_point() else tensor
        for name, tensor in state.items()
    }
    try:
        block.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(
            f"the checkpoint's tensors for {where} do not match the model built from its config.json ({error}); "
            "stream only checkpoints whose tensor names are the model's state_dict names, or run without streaming."
        ) from None
    block.to(device)


class LayerStorage:
    """How the pipeline gets each decoder layer onto the compute device and puts it away again.

    weights: stream the float layers from this checkpoint (the model's decoder layers are on
        ``meta``); None keeps them where they are (CPU or GPU) and moves them to the device in turn.
    work_dir: write each finished layer there, and skip layers it already holds (resume).
    activations_device: where the calibration activations wait between layers (the compute
        device by default; "cpu" when they do not fit next to a layer on the GPU).
    """

    def __init__(
        self,
        weights: CheckpointWeights | None = None,
        work_dir: WorkDir | None = None,
        activations_device: torch.device | str | None = None,
    ) -> None:
        self.weights, self.work_dir = weights, work_dir
        self.activations_device = torch.device(activations_device) if activations_device is not None else None
        self._home: dict[int, torch.device] = {}

    def load(self, index: int, prefix: str, block: nn.Module, device: torch.device) -> None:
        """Put layer ``index``'s float weights on ``device``."""
        if self.weights is not None:
            materialize_layer(block, self.weights.read_prefix(prefix), device, where=prefix.rstrip("."))
        else:
            self._home[index] = next(block.parameters()).device
            block.to(device)

    def restore(self, index: int, block: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Put a finished layer's stored tensors (names relative to the block) into ``block`` on ``device``."""
        if self.weights is None:
            self._home[index] = next(block.parameters()).device
        materialize_layer(block, state, device, where=f"layer {index}")

    def release(self, index: int, block: nn.Module) -> None:
        """Move a finished layer out of the compute device (back home, or to ``meta`` when streamed)."""
        block.to("meta" if self.weights is not None else self._home.pop(index, "cpu"))
