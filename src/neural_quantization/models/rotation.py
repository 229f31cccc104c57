"""Rotate a model's residual stream by an orthogonal matrix merged into its weights (QuaRot's R1).

A pre-norm transformer carries a residual stream ``h`` (one row of width ``d`` per token) that
only three kinds of linear maps touch:

* the embedding writes it: ``h = E[token]``;
* *readers* see it through an RMS norm: ``y = (h / rms(h)) · diag(g) · Wᵀ`` (q/k/v, gate/up and,
  after the final norm, ``lm_head``);
* *writers* add to it: ``h += z · W_oᵀ + b`` (the attention output and MLP down projections).

For an orthogonal ``R`` (``R Rᵀ = I``) ``rms(h R) = rms(h)``, so with the norm's scale ``g`` folded
into its readers first (``W ← W diag(g)``, the norm's own scale set to 1) the model computes the
same function on the rotated stream ``h R`` when

    E ← E R,    W_reader ← W_reader R,    W_writer ← Rᵀ W_writer,    b_writer ← b_writer R.

The rotated model is an ordinary model of the same architecture (norm scales of 1, an untied
``lm_head`` when the embedding was tied), so its GPTQ checkpoint needs nothing new from any loader.
What changes is the weights' statistics: a Hadamard ``R`` spreads each outlier channel of the
stream over all ``d`` channels, so groups of the readers' weights and of the writers' outputs hold
no single huge value, and GPTQ's grid fits them better. (QuaRot, Ashkboos et al. 2024; SpinQuant,
Liu et al. 2024: their first rotation; the online rotations inside attention and the MLP are not
applied here.)

Which modules are readers, writers and norms is found by running the model once on a few tokens
and matching tensors (what each linear reads is the output of which norm), not from module names;
architectures that put a norm on a branch's output before the residual add (Gemma 2/3's
post-norms), norms that subtract the mean (LayerNorm) and linears that read the stream without a
norm are refused, because the rotation would change what the model computes. The model's logits
are compared before and after on the same tokens as a final check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from neural_quantization.core.hadamard import random_rotation
from neural_quantization.nn.modules import find_decoder_layers, untie_output_embeddings

#: largest relative change of the logits accepted from a rotation (fp32 round-off is ~1e-6)
MAX_LOGIT_CHANGE = 1e-3


class RotationError(ValueError):
    """The model's architecture is not invariant under a rotation of its residual stream."""


@dataclass
class ResidualStream:
    """The modules that touch the residual stream, by qualified name."""

    width: int
    embedding: str
    readers: dict[str, list[str]] = field(default_factory=dict)  # norm -> the linears reading its output
    writers: list[str] = field(default_factory=list)


@dataclass
class RotationReport:
    kind: str  # "hadamard" or "random orthogonal"
    width: int
    readers: int
    writers: int
    norms: int
    max_logit_change: float  # relative, measured on the probe tokens
    untied_lm_head: bool
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def is_norm(module: nn.Module, width: int) -> bool:
    """A leaf module named like a norm whose scale ``weight`` is one value per channel of a width-``width`` input."""
    weight = getattr(module, "weight", None)
    return (not list(module.children()) and "norm" in type(module).__name__.lower()
            and isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == width)


def tensor_key(t: torch.Tensor) -> tuple:
    """Identifies a tensor's values in memory: a view of all of it (``h[:, -0:]``) gets the same key."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _probe_ids(model: nn.Module, length: int = 8) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return torch.arange(length).mul(7919).remainder(vocab - 2).add(2)[None, :]


@torch.no_grad()
def find_residual_stream(model: nn.Module) -> ResidualStream:
    """Readers, writers and norms of the residual stream, found by one traced forward on a few tokens."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    width = embedding.embedding_dim
    names = {module: name for name, module in model.named_modules()}
    norms = {m for m in model.modules() if is_norm(m, width)}
    _, layers = find_decoder_layers(model)
    layer_linears = {m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)}
    linears = layer_linears | ({head} if isinstance(head, nn.Linear) else set())
    inputs: dict[nn.Module, tuple] = {}
    outputs: dict[tuple, nn.Module] = {}

    def pre(module, args):
        inputs.setdefault(module, tensor_key(args[0]))
        kept.append(args[0])

    def post(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        outputs.setdefault(tensor_key(out), module)
        kept.append(out)  # every tensor seen stays alive until the end, so no id is reused

    kept: list[torch.Tensor] = []
    stream_inputs: set[tuple] = set()  # the raw residual stream as each decoder layer receives it

    def layer_pre(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        stream_inputs.add(tensor_key(hidden))
        kept.append(hidden)

    handles = [layer.register_forward_pre_hook(layer_pre, with_kwargs=True) for layer in layers]
    handles += [m.register_forward_pre_hook(pre) for m in norms | linears]
    handles += [m.register_forward_hook(post) for m in norms | linears]
    try:
        device = next(model.parameters()).device
        model(input_ids=_probe_ids(model).to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    stream = ResidualStream(width=width, embedding=names[embedding])
    for linear in sorted(linears, key=lambda m: names[m]):
        source = outputs.get(inputs.get(linear))
        if source in norms:
            stream.readers.setdefault(names[source], []).append(names[linear])
        elif inputs.get(linear) in stream_inputs:
            raise RotationError(f"{names[linear]} reads a width-{width} input that no norm produced; rotating the "
                                "residual stream would change it. Quantize this model without --rotate.")
        elif linear in layer_linears and linear.out_features == width:
            stream.writers.append(names[linear])
    for norm in norms:
        if outputs.get(inputs.get(norm)) in linears:
            raise RotationError(
                f"{names[norm]} normalises the output of {names[outputs[inputs[norm]]]} before it joins the residual "
                "stream (a post-norm, as in Gemma 2/3): the stream cannot be rotated through it. Quantize this model "
                "without --rotate."
            )
    if not isinstance(head, nn.Linear) or not any(names[head] in r for r in stream.readers.values()):
        raise RotationError("the output projection does not read a final norm; this model cannot be rotated. "
                            "Quantize it without --rotate.")
    if not stream.writers:
        raise RotationError("no linear writes to the residual stream; this model cannot be rotated.")
    return stream


def norm_offset(norm: nn.Module) -> float:
    """0 for ``x/rms · w`` norms, 1 for Gemma's ``x/rms · (1 + w)``: what the scale is with ``w = 0``."""
    x = torch.linspace(-1, 1, norm.weight.numel(), dtype=norm.weight.dtype, device=norm.weight.device)[None]
    saved = norm.weight.detach().clone()
    norm.weight.zero_()
    y = norm(x)
    norm.weight.copy_(saved)
    return 1.0 if y.abs().max() > 0.5 * x.abs().max() / x.pow(2).mean().sqrt() else 0.0


def _check_rms_norm(norm: nn.Module, name: str, rotation: torch.Tensor) -> None:
    """The norm, with its scale neutral, must commute with the rotation (an RMS norm; not LayerNorm)."""
    x = torch.randn(3, norm.weight.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.to(norm.weight.dtype).to(norm.weight.device)
    r = rotation.to(norm.weight.dtype).to(norm.weight.device)
    if getattr(norm, "bias", None) is not None or not torch.allclose(norm(x @ r), norm(x) @ r, rtol=1e-3, atol=1e-3):
        raise RotationError(f"{name} ({type(norm).__name__}) is not an RMS norm that commutes with a rotation "
                            "(LayerNorm subtracts the mean); quantize this model without --rotate.")


@torch.no_grad()
def rotate_residual_stream(model: nn.Module, seed: int = 0, device: torch.device | None = None) -> RotationReport:
    """Fold every norm's scale into its readers and rotate the residual stream by a randomised
    Hadamard matrix (see the module docstring). In place; the model computes the same function.

    Each weight is transformed in float64 on ``device`` (default: where it lives) and stored back in
    its own dtype. Raises :class:`RotationError`, before changing anything, for an architecture that
    is not rotation-invariant.
    """
    import time

    start = time.perf_counter()
    stream = find_residual_stream(model)
    rotation, kind = random_rotation(stream.width, seed)  # (d, d), rows orthonormal
    modules = dict(model.named_modules())
    offsets = {}
    for name in stream.readers:
        offsets[name] = norm_offset(modules[name])
        original = modules[name].weight.detach().clone()
        modules[name].weight.fill_(1.0 - offsets[name])
        try:
            _check_rms_norm(modules[name], name, rotation)
        finally:
            modules[name].weight.copy_(original)
    probe = _probe_ids(model).to(next(model.parameters()).device)
    before = model(input_ids=probe, use_cache=False).logits.double()
    untied = untie_output_embeddings(model)
    modules = dict(model.named_modules())

    def transform(weight: torch.Tensor, fn) -> None:
        work = weight.detach().to(device or weight.device, torch.float64)
        weight.copy_(fn(work).to(weight.device, weight.dtype))

    r = {}

    def rot(on: torch.device) -> torch.Tensor:
        return r.setdefault(on, rotation.to(on))

    for norm_name, readers in stream.readers.items():
        norm = modules[norm_name]
        scale = norm.weight.detach().double() + offsets[norm_name]
        for reader in readers:
            transform(modules[reader].weight, lambda w, g=scale: (w * g.to(w.device)) @ rot(w.device))
        norm.weight.fill_(1.0 - offsets[norm_name])
    for writer in stream.writers:
        linear = modules[writer]
        transform(linear.weight, lambda w: rot(w.device).T @ w)
        if linear.bias is not None:
            transform(linear.bias, lambda b: b @ rot(b.device))
    transform(modules[stream.embedding].weight, lambda e: e @ rot(e.device))

    after = model(input_ids=probe, use_cache=False).logits.double()
    change = float((after - before).abs().max() / before.abs().max().clamp(min=1e-12))
    if not change < MAX_LOGIT_CHANGE:
        raise RotationError(
            f"the rotated model's logits differ from the original's by {change:.2e} (relative): this architecture "
            "adds something to the residual stream that the rotation does not reach. The model in memory is no "
            "longer the original; reload it and quantize without --rotate."
        )
    return RotationReport(kind=kind, width=stream.width, readers=sum(map(len, stream.readers.values())),
                          writers=len(stream.writers), norms=len(stream.readers), max_logit_change=change,
                          untied_lm_head=untied, seconds=time.perf_counter() - start)
