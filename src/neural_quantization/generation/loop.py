"""Text generation that sets up fast decoding by itself: our checkpoints and float models alike.

:func:`generate` tokenizes the prompts (left-padded in batches), runs the prompt through the model
once (prefill) and then one token per step. Two ways to run the steps, the same tokens:

* ``"graphs"`` (the default on a CUDA device): a ``StaticCache`` of ``prompt + max_new_tokens``
  positions, and the decode step captured once in a CUDA graph and replayed per token. Every input
  of the step lives in a fixed buffer updated on the device (the next token, its position, the
  attention mask row: a 4D boolean mask (B, 1, 1, L) that transformers passes to attention as it
  is), and the cache advances its own position counter on the device, so no host work and no
  synchronisation happen between steps (end-of-sequence is checked every ``check_every`` steps).
  Optionally the step is ``torch.compile``-d first (``compile_step=True``). Quantized models get
  their q/k/v and gate/up projections fused (``fuse_projections``) unless ``fuse=False``. The
  decode steps' attention runs through our grouped-query decode kernel (``generation/attention.py``:
  the KV cache is read once per KV head, not copied for every query head) with
  ``decode_attention=True`` (opt-in: not yet measured on a GPU); the prefill keeps transformers' SDPA.
* ``"static"``: the same buffers and steps as ``"graphs"``, run one forward at a time without a
  graph (any device; what the CPU tests use to check the graph path's inputs).
* ``"eager"`` (the default on CPU, or ``mode="eager"``): transformers' ``DynamicCache`` and one
  forward per step, what ``model.generate()`` does; on CPU its greedy tokens equal
  ``model.generate(do_sample=False)``'s (tested).

Sampling: ``temperature=0`` is greedy (argmax); otherwise logits / temperature, nucleus filtering
at ``top_p`` and one draw per sequence from a ``torch.Generator`` seeded with ``seed``.

What is measured (:class:`GenerationResult`): time to first token (prefill + first token, synchronised),
decode tokens/s (sequences × decode steps over the decode time; the first token is not a decode
step), total time and peak memory (``torch.cuda.max_memory_allocated`` on a GPU; the process's
peak resident set on CPU). Nothing is estimated.
"""

from __future__ import annotations

import inspect
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from neural_quantization.generation.attention import use_decode_attention


class GenerationError(ValueError):
    """Generation settings that cannot work; the message says how to fix them."""


MODES = ("auto", "graphs", "static", "eager")


@dataclass
class GenerationResult:
    """The generated text and what the run measured (see the module docstring)."""

    texts: list[str]
    new_token_ids: list[list[int]]
    mode: str
    device: str
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float | None
    total_s: float
    peak_memory_bytes: int
    peak_memory_kind: str
    batches: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_settings(prompts: Sequence[str], max_new_tokens: int, batch_size: int | None, temperature: float,
                    top_p: float, mode: str) -> None:
    def is_ids(p: Any) -> bool:
        return isinstance(p, (list, tuple)) and bool(p) and all(isinstance(t, int) for t in p)

    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) or is_ids(p) for p in prompts):
        raise GenerationError("prompts must be a non-empty list of strings (or of token-id lists), "
                              "e.g. ['Hello, my name is'].")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens}; ask for at least 1 new token.")
    if batch_size is not None and batch_size < 1:
        raise GenerationError(f"batch_size={batch_size}; use a positive number of prompts per batch.")
    if temperature < 0:
        raise GenerationError(f"temperature={temperature}; use 0 for greedy decoding or a positive value to sample.")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p={top_p}; use a value in (0, 1] (1 = no nucleus filtering).")
    if mode not in MODES:
        raise GenerationError(f"mode={mode!r}; use one of {MODES}.")


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) token ids: argmax, or a draw after temperature and top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest set whose mass reaches top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak resident set (host)"


def _pad_token_id(tokenizer: Any, model: nn.Module) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                      getattr(model.config, "pad_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def _eos_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    *,
    batch_size: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    mode: str = "auto",
    compile_step: bool = False,
    fuse: bool = True,
    decode_attention: bool = False,
    stop_at_eos: bool = True,
    check_every: int = 16,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens for each prompt; see the module docstring.

    model: a transformers causal LM (float, or loaded with ``load_quantized``), on the device it
        should run on. tokenizer: its tokenizer (None when every prompt is a list of token ids; the
        texts are then empty). prompts: strings, or lists of token ids. batch_size: prompts per
        batch (default: all).
    mode: "auto" (graphs on CUDA, eager elsewhere), "graphs" or "eager".
    decode_attention: run the decode steps of "graphs"/"static" mode through our grouped-query
        decode-attention kernel (``generation/attention.py``) instead of transformers' SDPA. Off by
        default until it has been measured on a GPU (tested on CPU through the Triton interpreter).
    Returns a :class:`GenerationResult`; texts hold only the new text (not the prompt).
    """
    _check_settings(prompts, max_new_tokens, batch_size, temperature, top_p, mode)
    device = next(model.parameters()).device
    if mode == "auto":
        mode = "graphs" if device.type == "cuda" else "eager"
    if mode == "graphs" and device.type != "cuda":
        raise GenerationError(f"mode='graphs' needs the model on a CUDA device (it is on {device}); use mode='eager'.")
    if mode == "graphs" and fuse:
        from neural_quantization.nn.fused_projections import fuse_projections
        from neural_quantization.nn.qlinear import QuantLinear

        if any(isinstance(m, QuantLinear) for m in model.modules()):
            fuse_projections(model)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    size = batch_size or len(prompts)
    texts: list[str] = []
    new_ids: list[list[int]] = []
    batches = []
    started = time.perf_counter()
    for begin in range(0, len(prompts), size):
        chunk = list(prompts[begin:begin + size])
        encoded = _encode(tokenizer, chunk, _pad_token_id(tokenizer, model), device)
        eos = _eos_ids(tokenizer, model) if stop_at_eos else []
        if mode == "eager":
            tokens, stats = _run_eager(model, encoded, max_new_tokens, temperature, top_p, generator, eos, check_every)
        else:
            with use_decode_attention(model, decode_attention):
                tokens, stats = _run_static(model, encoded, max_new_tokens, temperature, top_p, generator, eos,
                                            check_every, compile_step, use_graph=mode == "graphs")
        for row in tokens:
            new_ids.append(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True) if tokenizer is not None else "")
        batches.append({"prompts": len(chunk), "prompt_len": int(encoded["input_ids"].shape[1]), **stats})
    total = time.perf_counter() - started
    decode_time = sum(b["decode_s"] for b in batches)
    decode_tokens = sum(b["decode_steps"] * b["prompts"] for b in batches)
    peak, kind = _peak_memory(device)
    return GenerationResult(
        texts=texts, new_token_ids=new_ids, mode=mode, device=str(device),
        prompt_tokens=sum(int(b["prompt_len"]) * b["prompts"] for b in batches),
        new_tokens=sum(len(row) for row in new_ids),
        time_to_first_token_s=batches[0]["time_to_first_token_s"],
        decode_tokens_per_s=decode_tokens / decode_time if decode_time > 0 and decode_tokens else None,
        total_s=total, peak_memory_bytes=peak, peak_memory_kind=kind, batches=batches,
    )


def _encode(tokenizer: Any, prompts: list[str], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (B, P) on ``device``."""
    if any(isinstance(p, str) for p in prompts) and tokenizer is None:
        raise GenerationError("text prompts need the model's tokenizer; pass tokenizer=..., or token-id lists.")
    rows = [list(p) if not isinstance(p, str) else tokenizer(p)["input_ids"] for p in prompts]
    if not all(rows):
        raise GenerationError("a prompt tokenized to no tokens; give each prompt some text.")
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _trim(tokens: torch.Tensor, eos: list[int]) -> list[list[int]]:
    """(B, T) generated ids -> per row, up to and including the first end-of-sequence token."""
    out = []
    for row in tokens.tolist():
        for i, token in enumerate(row):
            if token in eos:
                row = row[: i + 1]
                break
        out.append(row)
    return out


def _run_eager(model, encoded, max_new_tokens, temperature, top_p, generator, eos, check_every):
    """DynamicCache, one forward per token: the steps ``model.generate()`` takes."""
    from transformers import DynamicCache

    device = encoded["input_ids"].device
    mask = encoded["attention_mask"]
    cache, cache_kw = DynamicCache(config=model.config), _cache_keyword(model)
    start = time.perf_counter()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=encoded["input_ids"], attention_mask=mask, position_ids=positions,
                   **{cache_kw: cache}, use_cache=True).logits[:, -1]
    token = next_tokens(logits, temperature, top_p, generator)
    _sync(device)
    first = time.perf_counter() - start

    def advance(token: torch.Tensor) -> torch.Tensor:
        nonlocal mask, positions
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        positions = positions[:, -1:] + 1
        return model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                     **{cache_kw: cache}, use_cache=True).logits[:, -1]

    decode_start = time.perf_counter()
    generated = _decode(token, max_new_tokens - 1, advance, temperature, top_p, generator, eos, check_every)
    _sync(device)
    decode = time.perf_counter() - decode_start
    return _trim(torch.stack(generated, dim=1), eos), {
        "time_to_first_token_s": first, "decode_s": decode, "decode_steps": len(generated) - 1}


def _decode(token: torch.Tensor, steps: int, advance: Callable[[torch.Tensor], torch.Tensor], temperature: float,
            top_p: float, generator: torch.Generator | None, eos: list[int], check_every: int) -> list[torch.Tensor]:
    """The decode steps both paths share: ``advance(token)`` runs the model on the last token and
    returns the next logits; up to ``steps`` new tokens after ``token``, stopping early (checked on the
    host every ``check_every`` steps) once every sequence has produced an end-of-sequence token."""
    generated = [token]
    done = torch.zeros_like(token, dtype=torch.bool)
    eos_t = torch.tensor(eos, device=token.device) if eos else None
    for index in range(steps):
        if eos_t is not None:
            done |= torch.isin(token, eos_t)
            if index and index % check_every == 0 and bool(done.all()):
                break
        token = next_tokens(advance(token), temperature, top_p, generator)
        generated.append(token)
    return generated


def _mask_values(model: nn.Module, dtype: torch.dtype) -> tuple[Any, Any, torch.dtype]:
    """(value for an allowed key, for a masked key, mask dtype) in the form the model's attention
    adds or selects: boolean for SDPA and flash kernels, additive (0 / dtype min) for eager."""
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        return 0.0, torch.finfo(dtype).min, dtype
    return True, False, torch.bool


def _run_static(model, encoded, max_new_tokens, temperature, top_p, generator, eos, check_every, compile_step,
                use_graph):
    """StaticCache, fixed step buffers, and (``use_graph``) the decode step in one CUDA graph."""
    from transformers import StaticCache

    device = encoded["input_ids"].device
    ids, pad_mask = encoded["input_ids"], encoded["attention_mask"].bool()
    batch, prompt_len = ids.shape
    length = prompt_len + max_new_tokens
    cache, cache_kw = StaticCache(config=model.config, max_cache_len=length), _cache_keyword(model)
    # prefill: causal within the prompt, never a padded key; a padded query sees itself (no empty row)
    rows = torch.arange(prompt_len, device=device)
    keys = torch.arange(length, device=device)
    causal = keys[None, :] <= rows[:, None]  # (P, L)
    allowed = causal[None] & torch.cat([pad_mask, pad_mask.new_ones((batch, max_new_tokens))], dim=1)[:, None, :]
    allowed |= (keys[None, :] == rows[:, None])[None]
    yes, no, mask_dtype = _mask_values(model, next(model.parameters()).dtype)

    def as_mask(ok: torch.Tensor) -> torch.Tensor:
        return torch.where(ok, torch.tensor(yes, dtype=mask_dtype, device=device),
                           torch.tensor(no, dtype=mask_dtype, device=device))

    start = time.perf_counter()
    positions = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=as_mask(allowed[:, None]), position_ids=positions,
                   **{cache_kw: cache}, use_cache=True).logits[:, -1]
    token = next_tokens(logits, temperature, top_p, generator)
    _sync(device)
    first = time.perf_counter() - start

    # the decode step's fixed buffers, updated in place between replays
    step_ids = token[:, None].clone()
    step_pos = positions[:, -1:] + 1
    key_ok = torch.cat([pad_mask, pad_mask.new_zeros((batch, max_new_tokens))], dim=1)  # keys written so far
    step_mask = as_mask(key_ok[:, None, None, :]).contiguous()  # (B, 1, 1, L)
    forward = torch.compile(model.forward, dynamic=False) if compile_step else model.forward

    def step() -> torch.Tensor:
        return forward(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, **{cache_kw: cache},
                       use_cache=True).logits[:, -1]

    steps_wanted = max_new_tokens - 1
    cursor = torch.tensor([prompt_len], device=device)  # the cache slot the next step writes
    step_mask[:, 0, 0].index_fill_(-1, cursor, yes)
    run_step = step
    if steps_wanted and use_graph:
        # one warm-up step runs eagerly on a side stream (lazy initialisation, kernel tuning), then
        # the cache's position counters are put back: the first replay writes the same slot
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        counters = cache_counters(cache)
        with torch.cuda.stream(stream):
            step()
            rewind_cache(cache, counters)
            with torch.cuda.graph(graph, stream=stream):
                out = step()
            rewind_cache(cache, counters)  # capture records the counter's increment without running it
        torch.cuda.current_stream(device).wait_stream(stream)

        def run_step() -> torch.Tensor:
            graph.replay()
            return out

    advanced = 0

    def advance(last: torch.Tensor) -> torch.Tensor:
        nonlocal advanced
        if advanced:  # the buffers of step 0 were set above, from the prefill
            step_ids.copy_(last[:, None])
            step_pos.add_(1)
            cursor.add_(1)
            step_mask[:, 0, 0].index_fill_(-1, cursor, yes)
        advanced += 1
        return run_step()

    decode_start = time.perf_counter()
    generated = _decode(token, steps_wanted, advance, temperature, top_p, generator, eos, check_every)
    _sync(device)
    decode = time.perf_counter() - decode_start
    return _trim(torch.stack(generated, dim=1), eos), {
        "time_to_first_token_s": first, "decode_s": decode, "decode_steps": len(generated) - 1}


def _cache_keyword(model: nn.Module) -> str:
    """The name the model's forward takes the KV cache by: ``cache`` in newer transformers
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_counters(cache: Any) -> list[torch.Tensor]:
    """Copies of a static cache's per-layer position counters (transformers >= 5.2x keeps them on
    the device and advances them in every forward), for :func:`rewind_cache`."""
    return [layer.cumulative_length.clone() for layer in cache.layers if hasattr(layer, "cumulative_length")]


def rewind_cache(cache: Any, counters: list[torch.Tensor]) -> None:
    """Put the cache layers' position counters back to ``counters`` (in place: a graph reads them)."""
    layers = [layer for layer in cache.layers if hasattr(layer, "cumulative_length")]
    for layer, counter in zip(layers, counters):
        layer.cumulative_length.copy_(counter)
