"""Generic module helpers: find a causal LM's decoder layers and their linears (any architecture),
replace submodules, and say which device a name or a module means (the one device resolver).

Model knowledge is data, not code: the decoder blocks are the ``nn.ModuleList`` whose children are
of a class named in the model's ``_no_split_modules`` (what transformers itself uses to shard
models), falling back to the longest ``ModuleList`` of blocks that contain linear layers. Nothing
here is specific to Llama, Mistral, Gemma, Qwen or Phi.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's decoder layers could not be found."""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified_name, layers)`` of the model's stack of decoder blocks."""
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    candidates: list[tuple[int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        children = list(module)
        if block_classes and all(type(c).__name__ in block_classes for c in children):
            candidates.append((2, name, module))
        elif all(any(isinstance(m, nn.Linear) for m in c.modules()) for c in children):
            candidates.append((1, name, module))
    if not candidates:
        raise UnsupportedModelError(
            f"could not find the decoder layers of {type(model).__name__}: no nn.ModuleList of blocks "
            "holding nn.Linear layers. Quantize a causal LM built from transformers' model classes."
        )
    # Prefer blocks named by _no_split_modules, then the longest stack (vision towers are shorter).
    _, name, layers = max(candidates, key=lambda c: (c[0], len(c[2])))
    return name, layers


def find_linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` modules inside one decoder block, by name relative to the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def group_by_shared_input(modules: dict[str, nn.Module], run: Callable[[], Any]) -> list[list[str]]:
    """Call ``run()`` and group the named modules by the input tensor each one received.

    Pre-hooks note which module runs when and on which tensor object; consecutive calls on the
    identical tensor form one group (q/k/v of an attention block, gate/up of an MLP). Groups come
    in execution order, each module counted at its first call; modules that never ran are left out.
    """
    order: list[tuple[str, Any]] = []
    handles = [module.register_forward_pre_hook(lambda m, args, n=name: order.append((n, args[0])))
               for name, module in modules.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    previous_input = None
    seen: set[str] = set()
    for name, inp in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and inp is previous_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous_input = inp
    return groups


def untie_output_embeddings(model: nn.Module) -> bool:
    """Give a tied ``lm_head`` its own copy of the embedding's weight (and ``tie_word_embeddings =
    False`` in the config), so one can change without the other. Returns whether it was tied."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and getattr(model.config, "tie_word_embeddings", False)
    if tied:
        if head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr():
            head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
        if text_config is not None and text_config is not model.config:
            text_config.tie_word_embeddings = False
    return bool(tied)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted path) of ``root`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def move_all_but(model: nn.Module, keep: nn.Module, device) -> None:
    """Move every parameter and buffer of ``model`` to ``device`` except those inside ``keep``.

    Used to put the embeddings, rotary tables and final norm on the compute device while the
    decoder layers stay where they are (CPU or disk) until their turn.
    """
    def visit(module: nn.Module) -> None:
        for child in module.children():
            if child is keep:
                continue
            if any(m is keep for m in child.modules()):
                visit(child)
            else:
                child.to(device)
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)  # in place, so tied weights stay tied
        for name, buf in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buf.to(device) if buf is not None else None

    visit(model)


def resolve_device(device: str | torch.device) -> torch.device:
    """The device a name means: "auto" is the GPU where one is visible, else the CPU. A CUDA device
    asked for on a machine without one raises ``ValueError`` with the fix."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was asked for but no CUDA device is visible; use --device cpu.")
    return dev


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its input embeddings' device for a language model (inputs go there
    when accelerate spread the model), else its first parameter's, else the CPU."""
    try:
        return module.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        pass
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")
