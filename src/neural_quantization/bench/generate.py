"""``generate`` on a GPU: fp16 vs our int4 through the same path, and eager ``model.generate()``.

    neural-quantize bench generate --output benchmarks/results/generate_h200.json
    python -m neural_quantization.bench.generate --output ...   (the same)

A Mistral-7B-shaped model (``bench/decode.py``: 32 layers, random fp16 weights built on the GPU;
speed depends on shapes, not values) is measured in fp16, then quantized in place (RTN W4 g128
symmetric, every decoder linear a ``QuantLinear``) and measured again with the same calls:

* ``generate`` (``neural_quantization.generate``, mode "graphs": static cache, the decode step in
  one CUDA graph, int4 with fused q/k/v and gate/up; ``--decode-attention`` repeats each setting
  with our grouped-query decode-attention kernel instead of transformers' SDPA): decode tokens/s at batch 1 and 16 with a
  128-token prompt and 128 new tokens (context 256), and at batch 1 with context 4096; each
  setting is run twice and the second call is reported (the first includes graph capture and kernel
  tuning; its total time is recorded too);
* time to first token for a 2048-token prompt (batch 1; first and second call);
* transformers' eager ``model.generate()`` (no graphs, no compile; DynamicCache), batch 1, 32 new
  tokens: what a user who never heard of this toolkit gets;
* greedy agreement of ``generate`` with ``model.generate()`` on the int4 model (32 tokens): with
  random weights the logits are nearly flat, so a rounding difference can flip an argmax; the
  number of equal leading tokens is recorded, not asserted.

Nothing is asserted: the JSON holds what was measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from neural_quantization.generation import generate
from neural_quantization.bench.decode import build_model, quantize_decoder
from neural_quantization.config import QuantizationConfig

SETTINGS = [  # (name, batch, prompt tokens, new tokens)
    ("b1_ctx256", 1, 128, 128),
    ("b16_ctx256", 16, 128, 128),
    ("b1_ctx4096", 1, 3968, 128),
]


def prompts_of(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=g).tolist()


def run_generate(model, prompts, new_tokens: int, decode_attention: bool = False, compile_step: bool = False) -> dict:
    def call():
        return generate(model, None, prompts, new_tokens, mode="graphs", stop_at_eos=False,
                        decode_attention=decode_attention, compile_step=compile_step)

    first_start = time.perf_counter()
    first = call()
    first_total = time.perf_counter() - first_start
    second = call()
    return {"decode_tokens_per_s": second.decode_tokens_per_s, "time_to_first_token_s": second.time_to_first_token_s,
            "total_s": second.total_s, "first_call_total_s": first_total,
            "first_call_time_to_first_token_s": first.time_to_first_token_s,
            "peak_memory_gib": second.peak_memory_bytes / 2**30}


@torch.no_grad()
def hf_eager(model, prompt: list[int], new_tokens: int) -> tuple[dict, list[int]]:
    ids = torch.tensor([prompt], device="cuda")
    config = model.generation_config
    config.eos_token_id, config.do_sample, config.pad_token_id = model.config.vocab_size, False, 0
    config.max_new_tokens = new_tokens
    for _ in range(2):  # warm-up: measured, a first call runs at a third of the speed of later ones
        model.generate(ids, generation_config=config)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, generation_config=config)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": new_tokens / seconds, "seconds": seconds}, out[0, len(prompt):].tolist()


def measure(model, name: str, layers: int, with_decode_attention: bool = False, compile_step: bool = False,
            settings: list[str] | None = None, hf_eager_too: bool = True) -> dict:
    vocab = model.config.vocab_size
    result: dict = {"precision": name}
    # eager transformers first: generate() fuses the int4 projections in place
    if hf_eager_too:
        prompt = prompts_of(1, 128, vocab, 7)[0]
        result["hf_generate_eager_b1"], hf_tokens = hf_eager(model, prompt, 32)
        ours = generate(model, None, [prompt], 32, mode="graphs", stop_at_eos=False).new_token_ids[0]
        same = next((i for i, (a, b) in enumerate(zip(ours, hf_tokens)) if a != b), len(ours))
        result["greedy_equal_leading_tokens_of_32"] = same
    for setting, batch, prompt_len, new in SETTINGS:
        if settings and setting not in settings:
            continue
        torch.cuda.empty_cache()
        result[setting] = run_generate(model, prompts_of(batch, prompt_len, vocab, 1), new, compile_step=compile_step)
        print(name, setting, json.dumps(result[setting]), flush=True)
        if with_decode_attention:  # the same call through our decode-attention kernel instead of SDPA
            key = setting + "_decode_attention"
            result[key] = run_generate(model, prompts_of(batch, prompt_len, vocab, 1), new, True, compile_step)
            print(name, key, json.dumps(result[key]), flush=True)
    if settings and "ttft" not in settings:
        return result
    long_prompt = prompts_of(1, 2048, vocab, 3)
    first = generate(model, None, long_prompt, 1, mode="graphs", stop_at_eos=False)
    second = generate(model, None, long_prompt, 1, mode="graphs", stop_at_eos=False)
    result["ttft_prompt2048_b1"] = {"first_call_s": first.time_to_first_token_s,
                                    "second_call_s": second.time_to_first_token_s}
    print(name, "ttft", json.dumps(result["ttft_prompt2048_b1"]), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--output", default=None)
    parser.add_argument("--decode-attention", action="store_true",
                        help="also run every generate setting with our grouped-query decode-attention kernel "
                             "(key <setting>_decode_attention)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (generate's compile_step)")
    parser.add_argument("--settings", nargs="+", default=None, choices=[name for name, *_ in SETTINGS] + ["ttft"],
                        help="run only these settings (and skip transformers' eager generate)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(args.layers, "cuda")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
               "layers": args.layers, "model": "Mistral-7B-shaped, random fp16 weights",
               "int4": "RTN W4 g128 symmetric, QuantLinear (kernel_backend auto), generate() fuses q/k/v and gate/up"}
    import transformers

    results["transformers"] = transformers.__version__
    results["fp16"] = measure(model, "fp16", args.layers, args.decode_attention, args.compile, args.settings,
                                 args.settings is None)
    quantize_decoder(model, QuantizationConfig(bits=4, group_size=128, method="rtn"))
    torch.cuda.empty_cache()
    results["int4"] = measure(model, "int4", args.layers, args.decode_attention, args.compile, args.settings,
                                 args.settings is None)
    results["compiled"] = args.compile
    results["speedup"] = {
        key: results["int4"][key]["decode_tokens_per_s"] / results["fp16"][key]["decode_tokens_per_s"]
        for key, row in results["int4"].items() if isinstance(row, dict) and "decode_tokens_per_s" in row
    }
    if "hf_generate_eager_b1" in results["int4"]:
        results["speedup"]["hf_generate_eager_b1"] = (results["int4"]["hf_generate_eager_b1"]["tokens_per_s"]
                                                      / results["fp16"]["hf_generate_eager_b1"]["tokens_per_s"])
    if "ttft_prompt2048_b1" in results["int4"]:
        results["ttft_ratio_int4_over_fp16"] = (results["int4"]["ttft_prompt2048_b1"]["second_call_s"]
                                                / results["fp16"]["ttft_prompt2048_b1"]["second_call_s"])
    print(json.dumps({"speedup": results["speedup"], "ttft_ratio": results.get("ttft_ratio_int4_over_fp16")}),
          flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
