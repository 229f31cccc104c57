"""How long llm-compressor's GPTQ takes on the model and tokens that quantize_speed.py times ours on.

The same Mistral-7B-shaped model with random bf16 weights (``MISTRAL_7B`` from quantize_speed.py,
built on the device right after ``torch.manual_seed(0)``) and the same random token ids
(``torch.randint`` right after the build; default 128 x 2048), so both scripts calibrate on
identical inputs; the JSON records the ids' sha256 to check that. llm-compressor (PyPI
``llmcompressor``) runs ``oneshot`` with ``GPTQModifier(targets="Linear", scheme="W4A16",
ignore=["lm_head"])`` on a ``datasets.Dataset`` of those ids. W4A16 is compressed-tensors' preset
``_int_wnam(4)``: int4 weights, strategy group, group_size 128, symmetric, static; activations
untouched. ``block_size=128`` and ``dampening_frac=0.01`` (a fraction of the Hessian diagonal's
mean, as our damp_percent) are its defaults and are passed explicitly; ``actorder`` is None to match
our ``desc_act=False`` (llm-compressor's own default is "static": ``--actorder static`` times that).
Calibration uses oneshot's default pipeline ("independent", which infers the sequential pipeline
for GPTQ) and its default batch size 1.

On the GPU machine (no internet) with the wheels in .whl/ (``carry: [".whl"]``), in the same
command as quantize_speed.py so both run on the same card:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src && python3 benchmarks/llmcompressor_speed.py --layers 32 --output $OUT/quantize_speed_llmcompressor_h100.json

On a CPU: ``python3 benchmarks/llmcompressor_speed.py --tiny --device cpu`` (2 layers, hidden 256,
8 x 64 tokens; about 1 s of oneshot).

Records total seconds (``oneshot`` from call to return, fx tracing and setup included) and seconds
per decoder layer: a forward pre-hook on each decoder layer marks its first real call, which opens
the layer's calibration pass; a layer's time runs to the next layer's first call (the last layer's
to the end of its last call), so each covers calibrate + solve + propagate. ``phases_seconds``
splits the total: ``setup`` (before layer 0), ``gptq_solves`` (``GPTQModifier.compress_module_list``
timed; compare with quantize_speed.py's ``phases_seconds.gptq_solves``), ``layer_forwards`` (the
rest of the layers' time: calibration forwards with the Hessian hooks, propagation forwards,
activation offloading) and ``tail`` (after the last layer). Also peak GPU memory, CPU RSS, versions.

Known differences from our pipeline (read the numbers with these in mind):
  * not true-sequential: llm-compressor collects the Hessians of all of a decoder layer's Linears
    in one calibration pass over the layer's unquantized inputs, solves them all, then runs the
    layer again ("propagating") to hand quantized outputs to the next layer; ours
    (true_sequential=True) re-calibrates after each group of sub-layers.
  * batch size 1 (oneshot's default) against our calibration_batch_size 8 (``--batch-size``).
  * activations between layers wait on the CPU (``sequential_offload_device="cpu"``, the
    default; ``--offload-device cuda`` keeps them on the GPU).
  * calibration forces eager attention (``calibration_forward_context``), the model is traced
    with torch.fx first, Hessians are accumulated in float32 per Linear (q, k and v each their
    own, from the same input), and same-shape Linears are solved as one batch
    (``batched_quantization="auto"``) with llm-compressor's Triton GPTQ kernel on CUDA.

Workarounds, none changing what is timed:
  * the model has no tokenizer and oneshot insists on one when given a dataset, so a one-word
    WordLevel tokenizer is passed as ``processor``; the dataset is already tokenized and it is
    never called.
  * a model built from a config has ``_name_or_path == ""`` and oneshot re-reads the config from
    that path (``Oneshot.validate_model``), so it points at a temporary copy of the config.
  * datasets fingerprints the Arrow table with dill, and dill pickles by value every module whose
    file is neither under sys.prefix nor in a "site-packages" folder; pyarrow pickled by value
    fails ("Can't pickle <class 'MonthDayNano'>"). pyarrow must therefore come from a
    site-packages folder, as it does on the GPU image; the wheels in .whl/ may live anywhere.

Wheels carried in .whl/ (Python 3.12, for the GPU image's torch 2.11 / transformers 5.17.0):
llmcompressor 0.14.0.1 (pins transformers>=5.15.0,<=5.17.0, torch>=2.10,<=2.14 and
compressed-tensors==0.19.0), compressed-tensors 0.19.0, datasets 5.2.0, dill 0.4.1, multiprocess
0.70.19, loguru 0.7.3, pydantic 2.13.4, pydantic-core 2.46.4, annotated-types 0.7.0,
typing-inspection 0.4.2. llmcompressor also requires auto-round, which only its AutoRoundModifier
imports (and its modifier registry, when a recipe names modifiers by string); this script hands it
a GPTQModifier instance, so auto-round is not carried and never imported.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import resource
import tempfile
import time
from unittest.mock import patch

import torch
from common import print_and_save
from quantize_speed import MISTRAL_7B
from transformers import AutoModelForCausalLM, MistralConfig, PreTrainedTokenizerFast

from neural_quantization.reporting.report import environment_info

TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
TINY_DEFAULTS = dict(layers=2, num_samples=8, seq_len=64)
FULL_DEFAULTS = dict(layers=32, num_samples=128, seq_len=2048)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _placeholder_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that is never called: oneshot needs one when a dataset is given."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab={"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>"
    )


def _sync() -> None:
    # llm-compressor computes on the GPU whenever there is one, wherever the model was built
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, help="decoder layers to build (default 32, as Mistral-7B)")
    parser.add_argument("--num-samples", type=int, help="calibration windows (default 128)")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default 2048)")
    parser.add_argument("--batch-size", type=int, default=1, help="oneshot's calibration batch size (its default: 1)")
    parser.add_argument(
        "--actorder", default="none", choices=["none", "static", "group", "weight"],
        help="GPTQ act-order: 'none' matches our desc_act=False; 'static' is llm-compressor's default",
    )
    parser.add_argument(
        "--offload-device", default="cpu",
        help="where activations wait between layers (sequential_offload_device; llm-compressor's default: cpu)",
    )
    parser.add_argument(
        "--device", default="cuda",
        help="where the model is built; llm-compressor computes on its main device (the GPU if any, else the CPU)",
    )
    parser.add_argument(
        "--tiny", action="store_true",
        help="tiny Mistral: 2 layers, hidden 256, intermediate 512, 4 heads, 2 KV heads, 8 x 64 tokens",
    )
    parser.add_argument("--output", help="JSON path")
    args = parser.parse_args()
    defaults = TINY_DEFAULTS if args.tiny else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU (use --tiny --device cpu to check the script on a CPU)")

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    # The same steps in the same order as quantize_speed.py, so the token ids are identical.
    torch.manual_seed(0)
    shape = {**MISTRAL_7B, **(TINY if args.tiny else {}), "num_hidden_layers": args.layers}
    config = MistralConfig(**shape)
    start = time.perf_counter()
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    _sync()
    build_seconds = time.perf_counter() - start
    ids = torch.randint(0, config.vocab_size, (args.num_samples, args.seq_len))
    ids_sha256 = hashlib.sha256(ids.numpy().tobytes()).hexdigest()

    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    modifier = GPTQModifier(
        targets="Linear", scheme="W4A16", ignore=["lm_head"], block_size=128, dampening_frac=0.01,
        actorder=None if args.actorder == "none" else args.actorder,
    )

    # Per-layer clock: layer i runs from its first real (not traced) call to layer i+1's; the last
    # one to the return of its last call (its subgraph also holds the final norm and lm_head).
    layers = list(model.model.layers)
    marks: dict[int, float] = {}

    def is_real(hook_args) -> bool:
        return bool(hook_args) and isinstance(hook_args[0], torch.Tensor) and hook_args[0].device.type != "meta"

    def mark_start(index: int):
        def hook(_module, hook_args):
            if index not in marks and is_real(hook_args):
                _sync()
                marks[index] = time.perf_counter()

        return hook

    def mark_end(_module, hook_args, _output):
        if is_real(hook_args):
            _sync()
            marks[len(layers)] = time.perf_counter()

    handles = [layer.register_forward_pre_hook(mark_start(i)) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(mark_end))

    # GPTQ solve time per decoder layer: GPTQModifier.compress_module_list gets the layer's
    # calibrated Linears once its calibration pass is done (wrapped for timing only, then restored).
    solve_seconds: list[float] = []
    compress_module_list = GPTQModifier.compress_module_list

    def timed_compress_module_list(self, module_list):
        if not module_list:
            return compress_module_list(self, module_list)
        _sync()
        solve_start = time.perf_counter()
        result = compress_module_list(self, module_list)
        _sync()
        solve_seconds.append(time.perf_counter() - solve_start)
        return result

    with tempfile.TemporaryDirectory() as config_dir:
        config.save_pretrained(config_dir)
        model.config._name_or_path = config_dir  # oneshot re-reads the config from this path
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        _sync()
        start = time.perf_counter()
        with patch.object(GPTQModifier, "compress_module_list", timed_compress_module_list):
            oneshot(
                model=model, processor=_placeholder_tokenizer(), dataset=dataset, recipe=modifier,
                num_calibration_samples=args.num_samples, max_seq_length=args.seq_len,
                batch_size=args.batch_size, sequential_offload_device=args.offload_device,
            )
        _sync()
        end = time.perf_counter()
    for handle in handles:
        handle.remove()
    total = end - start

    if len(marks) != len(layers) + 1:
        raise SystemExit(f"per-layer hooks fired for {sorted(marks)} only; expected 0..{len(layers)}")
    bounds = [marks[i] for i in range(len(layers) + 1)]
    per_layer = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    quantized = [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and getattr(module, "quantization_scheme", None) is not None
    ]
    weights_args = layers[0].self_attn.q_proj.quantization_scheme.weights
    environment = environment_info("cuda" if torch.cuda.is_available() else "cpu")
    environment.update({
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else environment["device_name"],
        **{name: _version(name) for name in (
            "llmcompressor", "compressed-tensors", "datasets", "pydantic", "accelerate", "loguru")},
    })
    document = {
        "benchmark": "quantize_speed_llmcompressor",
        "model": ("tiny Mistral config" if args.tiny else "Mistral-7B config") + ", random bf16 weights",
        "layers": args.layers,
        "calibration": {
            "num_samples": args.num_samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "ids_sha256": ids_sha256,
        },
        "config": {
            "library": "llmcompressor",
            "modifier": "GPTQModifier", "scheme": "W4A16", "targets": "Linear", "ignore": ["lm_head"],
            "weights": weights_args.model_dump(mode="json"),
            "block_size": modifier.block_size, "dampening_frac": modifier.dampening_frac,
            "actorder": args.actorder, "batched_quantization": modifier.batched_quantization,
            "pipeline": "oneshot default (independent -> sequential for GPTQ)",
            "sequential_offload_device": args.offload_device,
            "quantized_linears": len(quantized),
        },
        "build_seconds": build_seconds,
        "total_seconds": total,
        "total_per_layer_seconds": total / args.layers,
        "first_layer_seconds": per_layer[0],
        "median_layer_seconds": sorted(per_layer)[len(per_layer) // 2],  # as quantize_speed.py
        "per_layer_seconds": per_layer,
        "solve_seconds_per_layer": solve_seconds,
        "phases_seconds": {  # keys unlike quantize_speed.py's: llm-compressor's steps differ
            "setup": bounds[0] - start,
            "layer_forwards": sum(per_layer) - sum(solve_seconds),
            "gptq_solves": sum(solve_seconds),
            "tail": end - bounds[-1],
        },
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "peak_cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "environment": environment,
    }
    print_and_save(document, args.output, omit=("per_layer_seconds", "solve_seconds_per_layer"))


if __name__ == "__main__":
    main()
