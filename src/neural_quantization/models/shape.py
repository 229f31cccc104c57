"""The sizes of a decoder-only transformer, read from its Hugging Face config (one reader for all).

The pre-flight estimate (``models/preflight.py``), the deployment report (``deploy/memory.py``) and
the GGUF export (``export/gguf.py``) all need the same handful of numbers; :func:`read_model_shape`
is where they are read, from a ``config.json`` dict or a ``transformers`` config object alike:

=================  ============================  =================================================
field              config key                    when the key is missing (or 0 / None)
=================  ============================  =================================================
layers             ``num_hidden_layers``         ``fallback["layers"]``, else an error
hidden             ``hidden_size``               ``fallback["hidden"]``, else an error
intermediate       ``intermediate_size``         ``fallback["intermediate"]``, else an error
heads              ``num_attention_heads``       ``fallback["heads"]``, else an error
kv_heads           ``num_key_value_heads``       ``heads`` (multi-head attention, no GQA)
head_dim           ``head_dim``                  ``hidden // heads``
vocab              ``vocab_size``                ``fallback["vocab"]``, else an error
tied_embeddings    ``tie_word_embeddings``       False
=================  ============================  =================================================

Multimodal configs nest the language model's config (``text_config`` in a dict,
``get_text_config()`` on an object); the nested one is read. Example (Mistral-7B's config.json):
``layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=32000``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: field -> the config key it is read from, for the fields that have no default.
REQUIRED_KEYS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "heads": "num_attention_heads",
    "vocab": "vocab_size",
}


class ModelShapeError(ValueError):
    """A config that lacks sizes the caller needs; the message names the keys to add."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory, packing and GGUF metadata."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: Any, fallback: Mapping[str, int] | None = None) -> ModelShape:
        """:func:`read_model_shape` (kept as a classmethod: ``deploy.ModelShape.from_config``)."""
        return read_model_shape(config, fallback)

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of the 7 projections of one decoder layer (Llama/Mistral/Qwen style)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def text_config(config: Any) -> Any:
    """The language model's part of ``config`` (itself unless a multimodal config nests one)."""
    if isinstance(config, Mapping):
        return config.get("text_config") or config
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` of a dict or ``config.key`` of an object; ``default`` where missing or None."""
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    return default if value is None else value


def read_model_shape(config: Any, fallback: Mapping[str, int] | None = None) -> ModelShape:
    """The :class:`ModelShape` of ``config`` (a ``config.json`` dict, a transformers config, or None).

    ``fallback`` gives values for missing keys, by field name (``{"hidden": 4096, ...}``): the
    pre-flight estimate measures them from the modules when a model has no usable config. Raises
    :class:`ModelShapeError` naming every key that is missing and has no fallback.
    """
    config = text_config(config)
    fallback = fallback or {}
    values: dict[str, int] = {}
    missing = []
    for field, key in REQUIRED_KEYS.items():
        value = config_value(config, key) or fallback.get(field)
        if value:
            values[field] = int(value)
        else:
            missing.append(key)
    if missing:
        raise ModelShapeError(
            f"config has no {', '.join(repr(key) for key in missing)} entry; pass a decoder-only transformer's "
            "config.json (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size)."
        )
    heads = values["heads"]
    return ModelShape(
        layers=values["layers"],
        hidden=values["hidden"],
        intermediate=values["intermediate"],
        heads=heads,
        kv_heads=int(config_value(config, "num_key_value_heads") or heads),
        head_dim=int(config_value(config, "head_dim") or values["hidden"] // heads),
        vocab=values["vocab"],
        tied_embeddings=bool(config_value(config, "tie_word_embeddings", False)),
    )
