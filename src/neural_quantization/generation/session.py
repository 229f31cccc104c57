"""``neural-quantize generate``: load what the user names (our checkpoint or a float model), run
:func:`~neural_quantization.generation.loop.generate`, print the text and the measured speed."""

from __future__ import annotations

from typing import Any

import torch

from neural_quantization.generation.loop import GenerationError, GenerationResult

DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def is_quantized_checkpoint(name: str) -> bool:
    """Whether ``load_quantized`` reads ``name``: a directory whose config.json has a quantization_config
    we load, or a GGUF file (a ``.gguf`` path, or a directory with one and no quantized config.json)."""
    from neural_quantization.export.gguf_reader import find_gguf_file
    from neural_quantization.models.loading import quantization_method

    return quantization_method(name) in ("gptq", "compressed-tensors") or find_gguf_file(name) is not None


def load_for_generation(name: str, device: torch.device, dtype: str = "auto",
                        trust_remote_code: bool = False) -> tuple[Any, Any, str]:
    """``(model, tokenizer, kind)`` on ``device``: ``load_quantized`` for our (or GPTQModel's,
    llm-compressor's) checkpoints and for GGUF files (Q4_0 / Q8_0 layers on our kernels, the rest
    dequantized; kind "float" when none is Q4_0 / Q8_0), ``load_model`` for float models. ``dtype``
    "auto": float16 on a GPU (fp16 and int4 then run in the same precision), float32 on the CPU."""
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise GenerationError(f"--dtype {dtype}; use one of {', '.join(DTYPES)}.")
    torch_dtype = DTYPES[dtype] or (torch.float16 if device.type == "cuda" else torch.float32)
    if is_quantized_checkpoint(name):
        from neural_quantization.export.checkpoint import load_quantized
        from neural_quantization.export.gguf_reader import find_gguf_file, gguf_tokenizer

        model = load_quantized(name, device=device, dtype=torch_dtype)
        gguf_file = find_gguf_file(name)
        tokenizer = gguf_tokenizer(gguf_file) if gguf_file is not None else AutoTokenizer.from_pretrained(name)
        return model, tokenizer, "quantized" if model.config.quantization_config else "float"
    from neural_quantization.models.loading import load_model

    loaded = load_model(name, device=device, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return loaded.model, loaded.tokenizer, "float"


def render_generation(result: GenerationResult, prompts: list[str], kind: str, console: Any) -> None:
    """The prompts with their continuations, then one table of what was measured."""
    from rich.table import Table

    from neural_quantization.formats.units import format_bytes

    for prompt, text in zip(prompts, result.texts):
        console.print(f"[bold]{prompt}[/bold]{text}")
        console.print()
    table = Table(title=f"generate: {kind} model, {result.mode} on {result.device}")
    table.add_column("measured")
    table.add_column("value", justify="right")
    table.add_row("prompts / prompt tokens", f"{len(prompts)} / {result.prompt_tokens}")
    table.add_row("new tokens", str(result.new_tokens))
    table.add_row("time to first token", f"{result.time_to_first_token_s * 1000:.1f} ms")
    rate = result.decode_tokens_per_s
    table.add_row("decode tokens/s", "-" if rate is None else f"{rate:.1f}")
    table.add_row("total", f"{result.total_s:.2f} s")
    table.add_row(f"peak memory ({result.peak_memory_kind})", format_bytes(result.peak_memory_bytes))
    console.print(table)
