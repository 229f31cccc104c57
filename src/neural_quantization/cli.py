"""``neural-quantize``: the command line. The only module that reads ``argv``.

Subcommands::

    neural-quantize quantize --model-name M --output-dir D [options]   (also the bare form)
    neural-quantize demo                                                 (built-in model, end to end)
    neural-quantize eval --model D --eval-data DIR                       (per-language quality)
    neural-quantize bench [kernel options]                               (GPU kernel speed)
    neural-quantize bench decode [options]                               (GPU end-to-end decode speed)
    neural-quantize deploy-report DIR_OR_CONFIG                          (memory needed, device fit)

Exit codes: 0 success, 2 bad input (the message says how to fix it), 3 a quality gate failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from neural_quantization.config import (
    CHECKPOINT_DTYPES,
    CLIP_SEARCHES,
    DEFAULT_CASCADE_STAGES,
    DEFAULT_LANGUAGES,
    EXPORT_FORMATS,
    PRESETS,
    ConfigError,
    EvalOptions,
    QualityGates,
    QuantizationConfig,
    RunOptions,
)

EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)
DEMO_MODEL = "smollm2-135m"
SUBCOMMANDS = ("quantize", "demo", "eval", "bench", "deploy-report")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once: not where the help already states it, not for options
    whose default is None (their help says what happens), not for the "off" half of a pair."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default is None or action.default is argparse.SUPPRESS
                or isinstance(action, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


def _add_config_file_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="TOML or YAML file of options (keys are the option names: bits = 4, group-size = 128, "
                        "format = \"gguf\"; templates/ holds ready ones); options on the command line override it")


def _add_quantization_options(p: argparse.ArgumentParser, defaults: QuantizationConfig) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--bits", type=int, default=None,
                   help=f"code width: 2, 3, 4 or 8 (default: {defaults.bits}; with --cascade-stages, the last stage)")
    g.add_argument(
        "--group-size", type=int, default=defaults.group_size,
        help="input columns sharing one scale/zero; -1 = one per output channel",
    )
    g.add_argument("--preset", choices=sorted(PRESETS), default="standard",
                   help="fast: round to nearest; best: adds --rotate --asym to standard GPTQ (act-order, static "
                        "groups, Hessian clip search), the most accurate measured (docs/quality.md). Options given "
                        "explicitly override the preset's")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric grid, zero point fixed at 2^(bits-1) (the default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (zero point per group)")
    g.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=defaults.desc_act,
                   help="act-order: quantize columns by decreasing Hessian diagonal")
    g.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="with --desc-act, fix group grids before the solve, so g_idx stays trivial and every kernel "
                        "runs the checkpoint at full speed (default: on, except for --cascade-mode nested)")
    g.add_argument("--damp", type=float, default=defaults.damp_percent, help="Hessian damping, fraction of its mean diagonal")
    g.add_argument("--block-size", type=int, default=defaults.block_size, help="columns per lazy-update block of GPTQ")
    g.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=defaults.true_sequential,
                   help="solve a layer's linears in execution order, each seeing the quantized outputs before it")
    g.add_argument("--clip", choices=CLIP_SEARCHES, default=None,
                   help="each group's grid: its min/max range, or clipped to minimise the weights' error (mse) or "
                        "GPTQ's Hessian-weighted output error (hessian; the default for GPTQ, minmax for RTN)")
    g.add_argument("--mse-clip", dest="clip", action="store_const", const="mse", help="the same as --clip mse")
    g.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="rotate the residual stream by a Hadamard matrix merged into the weights before quantizing "
                        "(spreads outliers; the checkpoint stays an ordinary one)")
    g.add_argument("--awq", action=argparse.BooleanOptionalAction, default=None,
                   help="activation-aware scaling (AWQ): per-input-channel scales searched on the calibration data "
                        "and folded into the preceding norm or linear before GPTQ (the model computes the same "
                        "function; the checkpoint stays an ordinary one; GPTQ only) (default: off)")
    g.add_argument("--gptaq", action=argparse.BooleanOptionalAction, default=None,
                   help="asymmetric calibration: fit each layer, fed the quantized model's inputs, to the float "
                        "model's outputs (GPTAQ; undoes the error that reached the layer; one device)")
    g.add_argument("--method", choices=("gptq", "rtn"), default=None, help="solver (default: the preset's, gptq)")
    g.add_argument("--quantize-lm-head", action="store_true", help="also quantize the output projection")
    g.add_argument("--kernel-backend", choices=("auto", "torch", "triton", "marlin"), default=defaults.kernel_backend,
                   help="matmul kernels of the quantized model")
    g.add_argument("--cascade", action="store_true",
                   help="cascade quantization through the widths of --cascade-stages (default stages: 8 4)")
    g.add_argument("--cascade-stages", type=int, nargs="+", default=None, metavar="BITS",
                   help="cascade widths, wide to narrow (implies --cascade); --bits defaults to the last one")
    g.add_argument("--cascade-mode", choices=("sequential", "nested"), default=None,
                   help="sequential: requantize stage by stage, recalibrating through each stage's model; "
                   "nested: one checkpoint readable at both widths (implies --cascade) (default: sequential)")
    g.add_argument("--dynamic", default=None, metavar="FILE",
                   help="per-module widths: a JSON table {\"+:<regex>\": {\"bits\": 8, \"group_size\": 128}} "
                        "(GPTQModel's and vLLM's `dynamic`), e.g. the plan `neural-quantize analyze --target-bits` writes")
    c = p.add_argument_group("calibration")
    c.add_argument(
        "--calibration-data", default=None,
        help="text file, directory of {lang}.txt / {lang}.calib.txt files, or hf:<dataset>; "
        "default: the model writes its own calibration text",
    )
    c.add_argument("--num-samples", type=int, default=defaults.num_samples, help="calibration windows")
    c.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per calibration window")
    c.add_argument("--target-languages", nargs="+", default=list(DEFAULT_LANGUAGES),
                   help="languages to calibrate (and evaluate) on")
    c.add_argument("--seed", type=int, default=defaults.seed, help="seed for sampling and self-generated text")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=defaults.device, help="where each layer is solved: auto, cpu, cuda, cuda:1")
    r.add_argument("--dtype", default=None, choices=CHECKPOINT_DTYPES,
                   help="the model's float dtype: for loading and for the checkpoint's unquantized tensors "
                        "(embeddings, norms). Default: load as the source is stored (GGUF: float32 on CPU, bfloat16 "
                        "on GPU) and store 16-bit (the source's 16-bit dtype, else bfloat16)")
    r.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own Python code from its directory or hub repository (off: never run "
                        "code you have not read)")
    r.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                   help="devices sharing the work, e.g. cuda:0 cuda:1 (default: every visible GPU for --device "
                        "auto/cuda)")
    r.add_argument("--stream-weights", action="store_true",
                   help="read the decoder layers from the safetensors checkpoint one at a time (host memory ~ one "
                        "layer; for models larger than RAM); writes a sharded checkpoint")
    r.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations in host memory between layers (when they do not fit on the GPU)")
    r.add_argument("--max-gpu-memory", default=None, metavar="SIZE",
                   help="GPU memory budget, e.g. 12GiB: the pre-flight estimate picks the fastest plan within it "
                        "(activations on the host, streamed weights, smaller calibration batches) or refuses the run "
                        "before any work, naming what would fit; also enforced as the process's memory fraction "
                        "(default: the free memory of the GPU)")
    r.add_argument("--max-cpu-memory", default=None, metavar="SIZE",
                   help="host memory budget, e.g. 16GiB, planned like --max-gpu-memory (default: the available RAM)")
    r.add_argument("--work-dir", default=None,
                   help="where finished layers are written as they are produced (default: OUTPUT_DIR.work)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from its --work-dir")
    r.add_argument("--keep-work-dir", action="store_true", help="keep the work directory after the checkpoint is saved")
    r.add_argument("--calibration-batch-size", type=int, default=defaults.calibration_batch_size,
                   help="calibration windows per forward")


def _add_export_options(p: argparse.ArgumentParser) -> None:
    x = p.add_argument_group("output format and deployment")
    x.add_argument(
        "--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0],
        help="gptq: our GPTQ checkpoint (transformers, vLLM); compressed-tensors: pack-quantized checkpoint "
        "(vLLM, transformers + compressed-tensors; 4/8 bits); gguf: the GPTQ checkpoint plus "
        "<output-dir name>-Q4_0.gguf / -Q8_0.gguf inside it for llama.cpp (needs --group-size 32, --sym)",
    )
    x.add_argument("--optimize-for-edge", action="store_true",
                   help="after saving, print the memory needed on edge devices (weights + KV cache + overhead)")
    x.add_argument("--edge-context", type=int, default=4096, help="context length for --optimize-for-edge")
    x.add_argument("--edge-batch", type=int, default=1, help="batch size for --optimize-for-edge")


def _add_eval_options(p: argparse.ArgumentParser, with_eval_data_help: str) -> None:
    e = p.add_argument_group("evaluation and quality gates")
    e.add_argument("--eval-data", default=None, help=with_eval_data_help)
    e.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window (stride = length)")
    e.add_argument("--max-eval-windows", type=int, default=None, help="cap on windows per language (all by default)")
    e.add_argument("--max-degradation", type=float, default=2.0, help="gate: average perplexity increase, %%")
    e.add_argument("--max-language-degradation", type=float, default=3.0, help="gate: worst language's increase, %%")
    fail = e.add_mutually_exclusive_group()
    fail.add_argument("--fail-on-gate", dest="no_fail_on_gate", action="store_false", default=False,
                      help="exit 3 when a quality gate fails (what quantize and eval do unless told otherwise)")
    fail.add_argument("--no-fail-on-gate", dest="no_fail_on_gate", action="store_true",
                      help="exit 0 even when a gate fails")
    e.add_argument("--report-json", default=None, help="write the JSON report here (plus .md and .png beside it)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    defaults = QuantizationConfig()
    parser = argparse.ArgumentParser(
        prog="neural-quantize",
        description="GPTQ quantization of Hugging Face causal LMs, with per-language quality reports.",
        formatter_class=_Formatter,
        epilog="The bare form `neural-quantize --model-name M --output-dir D ...` means `quantize`.",
    )
    from neural_quantization._version import __version__

    parser.add_argument("--version", action="version", version=f"neural-quantization {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{quantize,demo,eval,generate,analyze,tune,quantize-pipeline,bench,deploy-report}")

    q = sub.add_parser("quantize", help="quantize a model and save a GPTQ checkpoint", formatter_class=_Formatter)
    q.add_argument("--model-name", required=True,
                   help="alias (smollm2-135m, gemma3-270m), local directory, .gguf file or Hugging Face id")
    q.add_argument("--output-dir", required=True,
                   help="where to write the checkpoint: a new or empty directory (never . or above it)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output-dir, only if it holds a checkpoint of ours and nothing else")
    _add_config_file_option(q)
    _add_quantization_options(q, defaults)
    _add_export_options(q)
    _add_eval_options(q, "evaluate per language right after quantizing: directory of {lang}.eval.txt / {lang}.txt")

    d = sub.add_parser("demo", help=f"quantize the built-in {DEMO_MODEL} end to end on this machine",
                       formatter_class=_Formatter)
    d.add_argument("--output-dir", default=f"{DEMO_MODEL}-gptq-w4g64", help="where to write the checkpoint")
    d.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output-dir, only if it holds a checkpoint of ours and nothing else")
    d.add_argument("--model-name", default=DEMO_MODEL, help="model to quantize")
    demo_defaults = QuantizationConfig(group_size=64, num_samples=32, seq_len=256)
    _add_config_file_option(d)
    _add_quantization_options(d, demo_defaults)
    _add_export_options(d)
    _add_eval_options(d, "evaluation texts; default: held-out text the model writes itself (a different seed)")
    # The demo shows what the gates say but exits 0: a 135M model at 4 bits is far past a 2 % gate.
    d.set_defaults(eval_seq_len=256, no_fail_on_gate=True)

    e = sub.add_parser("eval", help="measure a quantized checkpoint against its reference, per language",
                       formatter_class=_Formatter)
    e.add_argument("--model", required=True, help="quantized checkpoint directory (GPTQ, compressed-tensors) or .gguf file")
    e.add_argument("--baseline", default=None, help="reference model; default: the base model recorded in the checkpoint")
    e.add_argument("--target-languages", nargs="+", default=list(DEFAULT_LANGUAGES), help="languages to evaluate")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--trust-remote-code", action="store_true", help="run the baseline model's own Python code")
    _add_eval_options(e, "directory of {lang}.eval.txt / {lang}.txt files (required)")

    g = sub.add_parser("generate", formatter_class=_Formatter,
                       help="generate text with a quantized checkpoint or a float model; prints tokens/s, time to "
                            "first token and peak memory")
    g.add_argument("--model", required=True,
                   help="quantized checkpoint directory (ours, GPTQModel's, llm-compressor's) or a float model "
                        "(alias, directory, .gguf file, Hugging Face id)")
    g.add_argument("--prompt", action="append", default=None, help="a prompt; repeat for several")
    g.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    g.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: all at once)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--dtype", default="auto", help="auto (float16 on a GPU, float32 on the CPU), float16, "
                                                   "bfloat16 or float32")
    g.add_argument("--mode", default="auto", help="auto (graphs on a GPU, eager on the CPU), graphs, static or eager")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step before capturing it")
    g.add_argument("--no-fuse", action="store_true", help="keep q/k/v and gate/up as separate matmuls")
    g.add_argument("--decode-attention", action="store_true",
                   help="decode steps through our grouped-query attention kernel (reads the KV cache once per KV "
                        "head) instead of SDPA; graphs/static modes (default: off, not yet measured on a GPU)")
    g.add_argument("--no-stop-at-eos", action="store_true", help="always generate --max-new-tokens tokens")
    g.add_argument("--json", default=None, metavar="PATH", help="also write the texts and measurements as JSON")
    g.add_argument("--trust-remote-code", action="store_true", help="run the model's own Python code")

    a = sub.add_parser("analyze", formatter_class=_Formatter,
                       help="where quantization hurts: weight/activation statistics, outlier dimensions and the "
                            "KL of quantizing one decoder layer at a time, with verdicts")
    a.add_argument("model", help="float model: alias, directory, .gguf file or Hugging Face id")
    a.add_argument("--calibration-data", required=True,
                   help="text for the activation statistics: a file or a directory of {lang}.calib.txt / {lang}.txt")
    a.add_argument("--eval-data", default=None,
                   help="held-out text for the sensitivity sweep (default: the calibration source's eval split)")
    a.add_argument("--target-languages", nargs="+", default=["en"], help="languages to read from the data")
    a.add_argument("--bits", nargs="+", type=int, default=[4, 3], help="widths to sweep")
    a.add_argument("--group-size", type=int, default=128, help="group size of the swept grids")
    a.add_argument("--num-samples", type=int, default=8, help="calibration windows")
    a.add_argument("--eval-windows", type=int, default=4, help="held-out windows per measurement")
    a.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    a.add_argument("--seed", type=int, default=0, help="window sampling seed")
    a.add_argument("--device", default="auto", help="auto, cpu or cuda")
    a.add_argument("--report-json", default="analysis.json", help="report path (+ .md, and .png with matplotlib)")
    a.add_argument("--target-bits", type=float, default=None,
                   help="also plan one width per decoder layer (from --bits) for this average, scales included")
    a.add_argument("--plan-json", default=None, metavar="PATH",
                   help="where to write the plan for `quantize --dynamic PATH` (default: REPORT.plan.json)")

    # The benchmarks own their options (bench/kernels.py, bench/decode.py);
    # `neural-quantize bench --help` and `neural-quantize bench decode --help` list them.
    t = sub.add_parser("tune", formatter_class=_Formatter,
                       help="time the int4 kernels for a checkpoint's layer shapes on this GPU and cache the fastest "
                            "choices, so its first forward needs no tuning",
                       description="Shapes come from the checkpoint (each quantized linear, and the fused q/k/v and "
                                   "gate/up groups `generate` runs); each token count is tuned per activation dtype. "
                                   "Choices go to the user's tuning cache (~/.cache/neural_quantization/tuning, or "
                                   "$NQ_TUNING_CACHE); keys already cached or shipped are skipped unless --retune. "
                                   "Also builds the CUDA extension if it is not built yet.")
    t.add_argument("model", metavar="MODEL_DIR", help="quantized checkpoint directory (ours, GPTQModel's, "
                                                      "llm-compressor's) or .gguf file")
    t.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="activation rows to tune (batch × new tokens in decode, prompt length in prefill); "
                        "default 1 2 4 … 4096")
    t.add_argument("--dtype", nargs="+", default=["float16"], choices=["float16", "bfloat16"],
                   help="activation dtypes the model will run in")
    t.add_argument("--no-fused", action="store_true", help="skip the fused q/k/v and gate/up shapes")
    t.add_argument("--retune", action="store_true", help="tune keys that already have a stored choice too")
    t.add_argument("--json", default=None, metavar="PATH", help="also write every tuned key as JSON")
    t.add_argument("--trust-remote-code", action="store_true", help="run the model's own Python code")

    qp = sub.add_parser(
        "quantize-pipeline", formatter_class=_Formatter,
        help="quantize the denoiser of a diffusers text-to-image pipeline (UNet or DiT), calibrated on its own "
             "sampling trajectories",
        description="Runs the float pipeline on the calibration prompts, collects every linear layer's Hessian of "
                    "the denoiser over all sampling steps, solves each layer with GPTQ (or RTN) and saves the "
                    "pipeline (diffusers layout; the denoiser's linears as GPTQ tensors, loaded by "
                    "neural_quantization.diffusion.load_quantized_pipeline). Text encoders and VAE stay in float. "
                    "Needs diffusers (pip install 'neural-quantization[diffusion]').")
    qp.add_argument("--pipeline", required=True,
                    help="a diffusers pipeline: Hugging Face id, local directory, or the built-in tiny-unet / tiny-dit / tiny-flux "
                         "(random weights, for a first try offline)")
    qp.add_argument("--output-dir", required=True, help="where to write the quantized pipeline: a new or empty directory")
    qp.add_argument("--method", default="gptq", choices=["gptq", "rtn"], help="gptq (calibrated) or rtn (round to nearest)")
    qp.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8], help="code width")
    qp.add_argument("--group-size", type=int, default=64, help="input columns per scale (-1: one per output channel)")
    qp.add_argument("--asym", action="store_true", help="asymmetric grid (a zero point per group)")
    qp.add_argument("--prompts", default=None, metavar="FILE",
                    help="calibration prompts, one per line (default: the shipped prompts in several languages)")
    qp.add_argument("--steps", type=int, default=20, help="sampling steps per calibration prompt")
    qp.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance while calibrating")
    qp.add_argument("--height", type=int, default=None, help="image height for calibration (default: the pipeline's)")
    qp.add_argument("--width", type=int, default=None, help="image width for calibration (default: the pipeline's)")
    qp.add_argument("--skip", nargs="+", default=[], metavar="NAME_PART",
                    help="leave in float the linears whose name contains any of these (e.g. time_embedding)")
    qp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    qp.add_argument("--dtype", default="auto", help="auto (float16 on a GPU, float32 on the CPU), float16, bfloat16, float32")
    qp.add_argument("--seed", type=int, default=0, help="seed of the calibration trajectories")
    qp.add_argument("--report", default=None, metavar="DIR",
                    help="also sample held-out prompts with the float, RTN and quantized pipelines and write "
                         "report.json, report.md and images.png (PSNR, SSIM, per-step error) here")
    qp.add_argument("--gguf", default=None, metavar="FILE",
                    help="also write the quantized denoiser as a GGUF file (Q4_0/Q8_0 holding the GPTQ codes) that "
                         "diffusers loads with <Class>.from_single_file(FILE, config=OUTPUT_DIR, subfolder=..., "
                         "quantization_config=GGUFQuantizationConfig(...)); needs --bits 4 or 8, --group-size 32, "
                         "no --asym, and a denoiser diffusers single-file loads (UNet2DConditionModel, SD3, FLUX.1, "
                         "Sana; not PixArt)")

    b = sub.add_parser("bench", add_help=False,
                       help="GPU speed: kernels against cuBLAS fp16 and PyTorch int4; `bench decode`: end-to-end "
                            "decode tokens/s, fp16 vs int4")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="options passed to the benchmark")

    r = sub.add_parser(
        "deploy-report", formatter_class=_Formatter,
        help="memory a model needs (weights + KV cache + overhead) and which edge devices it fits",
        description="From a checkpoint directory the weights are measured (file sizes); from a config.json "
        "(or a directory without weights) they are estimated for --bits / --group-size, so you can plan "
        "before downloading.",
    )
    r.add_argument("source", metavar="DIR_OR_CONFIG", help="checkpoint directory, config.json or .gguf file")
    r.add_argument("--context", type=int, default=4096, help="tokens of KV cache per sequence")
    r.add_argument("--batch", type=int, default=1, help="sequences held at once")
    r.add_argument("--bits", type=int, default=4, help="estimate only: code width")
    r.add_argument("--group-size", type=int, default=128, help="estimate only: GPTQ group size")
    r.add_argument("--kv-bytes", type=float, default=2, help="bytes per KV-cache element (2 = fp16, 1 = 8-bit)")
    r.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")
    return parser


def read_options_file(path: str | Path) -> dict[str, Any]:
    """The table of options in a ``.toml``, ``.yaml`` or ``.yml`` file (keys as the options are named,
    with dashes or underscores; a TOML file may put them under a ``[quantize]`` table)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"--config {path}: not valid TOML ({err}).") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path}: not valid YAML ({_one_line(err)}).") from None
    else:
        raise ValueError(f"--config {path}: use a .toml, .yaml or .yml file.")
    if isinstance(data, dict) and set(data) == {"quantize"} and isinstance(data["quantize"], dict):
        data = data["quantize"]
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a table of options (key = value), got {type(data).__name__}.")
    return data


def _file_defaults(sub: argparse.ArgumentParser, values: dict[str, Any], path: str) -> dict[str, Any]:
    """Turn a config file's ``{option: value}`` into the subcommand's parsed defaults, converted and
    checked as the same option on the command line would be."""
    by_option = {opt[2:]: action for action in sub._actions for opt in action.option_strings if opt.startswith("--")}
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("_", "-")
        action = by_option.get(name)
        if action is None or name in ("config", "help"):
            known = ", ".join(sorted(k for k in by_option if k not in ("config", "help")))
            raise ValueError(f"--config {path}: unknown option {key!r}; the options are: {known}.")
        if action.nargs == 0:  # a flag: true sets it, false leaves (or, for the "off" half, sets) the other value
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: {key} is a flag; write {key} = true or false.")
            if isinstance(action, argparse.BooleanOptionalAction):
                defaults[action.dest] = value
            elif value:
                defaults[action.dest] = action.const
            elif isinstance(action, argparse._StoreFalseAction):
                defaults[action.dest] = True
            continue
        many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
        items = value if isinstance(value, list) else [value]
        if not many and isinstance(value, list):
            raise ValueError(f"--config {path}: {key} takes one value, not a list.")
        converted = []
        for item in items:
            try:
                item = action.type(item) if action.type is not None and not isinstance(item, bool) else item
            except (TypeError, ValueError):
                raise ValueError(f"--config {path}: {key} = {item!r} is not a valid value.") from None
            if action.choices is not None and item not in action.choices:
                raise ValueError(f"--config {path}: {key} = {item!r}; choose from {', '.join(map(str, action.choices))}.")
            converted.append(item)
        defaults[action.dest] = converted if many else converted[0]
    return defaults


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE`` the file's values become the subcommand's defaults and
    the command line's options are parsed over them (an option given on the command line always wins;
    the file may name the required ones, e.g. ``model-name``)."""
    path = next((arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
                 for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")), None)
    if path and argv[:1] in (["quantize"], ["demo"]):
        sub = parser._subparsers._group_actions[0].choices[argv[0]]
        defaults = _file_defaults(sub, read_options_file(path), path)
        for action in sub._actions:
            if action.dest in defaults:
                action.required = False
        sub.set_defaults(**defaults)
    return parser.parse_args(argv)


def _normalise_argv(argv: list[str]) -> list[str]:
    """The original README's bare form (`neural-quantize --model-name …`) means `quantize`."""
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        return ["quantize", *argv]
    return argv


def config_from_args(args: argparse.Namespace) -> QuantizationConfig:
    """The :class:`QuantizationConfig` the options describe: the preset's fields, then every option
    given explicitly. ``--cascade`` alone means the default stages; the rest (``--bits`` left out is
    the cascade's last width, an explicit one that contradicts the stages is refused) is the config's
    own rule."""
    stages = args.cascade_stages
    if stages is None and args.cascade:
        stages = list(DEFAULT_CASCADE_STAGES)
    chosen = {"sym": args.sym, "rotate": args.rotate, "method": args.method, "bits": args.bits,
              "cascade_mode": args.cascade_mode, "static_groups": args.static_groups, "clip": args.clip,
              "gptaq": args.gptaq, "awq": args.awq}
    return QuantizationConfig.from_preset(
        args.preset,
        **{name: value for name, value in chosen.items() if value is not None},
        group_size=args.group_size,
        damp_percent=args.damp,
        block_size=args.block_size,
        true_sequential=args.true_sequential,
        desc_act=args.desc_act,
        quantize_lm_head=args.quantize_lm_head,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        calibration_batch_size=args.calibration_batch_size,
        target_languages=args.target_languages,
        seed=args.seed,
        kernel_backend=args.kernel_backend,
        device=args.device,
        cascade_stages=stages,
        checkpoint_dtype=args.dtype,
        dynamic=_read_dynamic(getattr(args, "dynamic", None)),
    )


def _read_dynamic(path: str | None) -> dict | None:
    """The ``dynamic`` table of ``--dynamic FILE`` (a plan from ``analyze`` holds it under "dynamic")."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--dynamic {file} does not exist; give the JSON plan `neural-quantize analyze "
                          "--target-bits B --plan-json FILE` wrote, or a table of per-module overrides.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"--dynamic {file} is not valid JSON ({err}).") from None
    return data.get("dynamic", data) if isinstance(data, dict) else data


def options_from_args(args: argparse.Namespace, demo: bool = False) -> RunOptions:
    """The :class:`RunOptions` the options of ``quantize`` / ``demo`` describe (validated on construction)."""
    return RunOptions(
        model_name=args.model_name, output_dir=args.output_dir, config=config_from_args(args),
        overwrite=args.overwrite, export_format=args.format, trust_remote_code=args.trust_remote_code,
        calibration_data=args.calibration_data, eval_data=args.eval_data, self_evaluate=demo and not args.eval_data,
        eval_seq_len=args.eval_seq_len, max_eval_windows=args.max_eval_windows,
        gates=QualityGates(args.max_degradation, args.max_language_degradation),
        fail_on_gate=not args.no_fail_on_gate, work_dir=args.work_dir, resume=args.resume,
        keep_work_dir=args.keep_work_dir, stream_weights=args.stream_weights,
        offload_activations=True if args.offload_activations else None, devices=args.devices,
        max_gpu_memory=args.max_gpu_memory, max_cpu_memory=args.max_cpu_memory,
        report_json=args.report_json, optimize_for_edge=args.optimize_for_edge, edge_context=args.edge_context,
        edge_batch=args.edge_batch, show_progress=not args.quiet,
    )


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input, reported as one line with the fix and exit code 2."""
    from neural_quantization.calibration.sources import CalibrationDataError
    from neural_quantization.config import ConfigError
    from neural_quantization.export.checkpoint import CheckpointError
    from neural_quantization.export.directories import OutputExistsError
    from neural_quantization.nn.modules import UnsupportedModelError
    from neural_quantization.models.loading import ModelNotFoundError

    return (ConfigError, CalibrationDataError, CheckpointError, OutputExistsError, ModelNotFoundError,
            UnsupportedModelError, ValueError, FileNotFoundError)


def _resume_command(argv: list[str]) -> str:
    import shlex

    return "neural-quantize " + " ".join(shlex.quote(a) for a in [*argv, *([] if "--resume" in argv else ["--resume"])])


def run_quantize(args: argparse.Namespace, demo: bool = False) -> int:
    """``quantize`` / ``demo``: :func:`neural_quantization.runner.run_quantization` with the options given.

    Ctrl-C (or a failure) during the work keeps the finished layers in the work directory and says
    how to continue (``--resume``); the runner removes a work directory with nothing to resume.
    """
    from neural_quantization.checks import check_run
    from neural_quantization.runner import finished_layers, run_checked

    options = options_from_args(args, demo)
    checked = check_run(options)  # a failing check leaves everything as it was: nothing to resume
    try:
        outcome = run_checked(options, checked)
    except BaseException as err:
        finished = finished_layers(options)
        command = _resume_command(getattr(args, "argv", []))
        if isinstance(err, KeyboardInterrupt):
            if finished:
                print(f"neural-quantize: interrupted. {len(finished)} finished layers are kept in "
                      f"{options.work_path}; continue with:\n    {command}", file=sys.stderr)
            else:
                print("neural-quantize: interrupted before any layer finished; nothing was written.", file=sys.stderr)
            return EXIT_INTERRUPTED
        if finished:
            print(f"note: {len(finished)} finished layers are kept in {options.work_path}; after fixing the problem "
                  f"below, continue with: {command}", file=sys.stderr)
        raise
    return _gate_exit(outcome.gates_passed, options.fail_on_gate)


def _gate_exit(passed: bool, fail_on_gate: bool) -> int:
    if passed or not fail_on_gate:
        return 0
    print("A quality gate failed (exit 3; --no-fail-on-gate to ignore).")
    return EXIT_GATE_FAILED


def run_eval(args: argparse.Namespace) -> int:
    """``eval``: :func:`neural_quantization.runner.run_evaluation` with the options given."""
    from neural_quantization.runner import run_evaluation

    options = EvalOptions(
        model=args.model, eval_data=args.eval_data, baseline=args.baseline, target_languages=args.target_languages,
        device=args.device, trust_remote_code=args.trust_remote_code, eval_seq_len=args.eval_seq_len,
        max_eval_windows=args.max_eval_windows,
        gates=QualityGates(args.max_degradation, args.max_language_degradation), fail_on_gate=not args.no_fail_on_gate,
        report_json=args.report_json, show_progress=not args.quiet,
    )
    return _gate_exit(run_evaluation(options).gates_passed, options.fail_on_gate)


def run_deploy_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from neural_quantization.deploy.memory import memory_report
    from neural_quantization.deploy.render import render_memory_report, write_memory_report_json

    console = Console(soft_wrap=True)  # paths in messages stay on one line, copyable
    report = memory_report(args.source, context=args.context, batch=args.batch, bits=args.bits,
                           group_size=args.group_size, kv_bytes_per_element=args.kv_bytes)
    render_memory_report(report, console)
    if args.json:
        console.print(f"JSON written to {write_memory_report_json(report, args.json)}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from neural_quantization.generation import GenerationError, generate
    from neural_quantization.generation.session import load_for_generation, render_generation
    from neural_quantization.nn.modules import resolve_device

    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise GenerationError(f"--prompts-file {path} does not exist; give a text file with one prompt per line.")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise GenerationError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    console = Console(soft_wrap=True)  # paths in messages stay on one line, copyable
    device = resolve_device(args.device)
    model, tokenizer, kind = load_for_generation(args.model, device, args.dtype, args.trust_remote_code)
    result = generate(model, tokenizer, prompts, args.max_new_tokens, batch_size=args.batch_size,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, mode=args.mode,
                      compile_step=args.compile, fuse=not args.no_fuse, stop_at_eos=not args.no_stop_at_eos,
                      decode_attention=args.decode_attention)
    render_generation(result, prompts, kind, console)
    if args.json:
        data = {"model": str(args.model), "kind": kind, "prompts": prompts, **result.to_dict()}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        console.print(f"JSON written to {args.json}")
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    from rich.console import Console

    from neural_quantization.analysis import analyze, write_analysis
    from neural_quantization.analysis.mixed_precision import PlanError, plan_widths
    from neural_quantization.calibration.sampling import calibration_from_source
    from neural_quantization.calibration.sources import check_language_source
    from neural_quantization.models.loading import load_model, resolve_model
    from neural_quantization.nn.modules import resolve_device

    console = Console(soft_wrap=True)  # paths in messages stay on one line, copyable
    if args.target_bits is not None and not 2 <= args.target_bits <= 8:
        raise PlanError(f"--target-bits {args.target_bits}: choose an average between 2 and 8 bits per weight.")
    device = resolve_device(args.device)
    resolve_model(args.model)
    eval_source = args.eval_data or args.calibration_data
    check_language_source(args.calibration_data, args.target_languages, split="calib")
    check_language_source(eval_source, args.target_languages, split="eval")
    loaded = load_model(args.model, device=device)
    calib = calibration_from_source(args.calibration_data, loaded.tokenizer, args.target_languages, args.num_samples,
                                    args.seq_len, args.seed)
    held_out = calibration_from_source(eval_source, loaded.tokenizer, args.target_languages, args.eval_windows,
                                       args.seq_len, args.seed + 1, split="eval")
    report = analyze(loaded.model, calib.input_ids, held_out.input_ids, bits=args.bits, group_size=args.group_size)
    report["model"] = str(args.model)
    if args.target_bits is not None:
        plan = plan_widths(report["sensitivity"], [[tuple(s) for s in shapes] for shapes in report["layer_shapes"]],
                           args.target_bits, report["layers_prefix"])
        report["plan"] = plan
        plan_path = Path(args.plan_json or Path(args.report_json).with_suffix(".plan.json"))
        plan_path.write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
        console.print(f"plan: {plan['average_bits']:.3f} bits per weight (target {args.target_bits}), widths "
                      f"{plan['widths']}; written to {plan_path}: quantize with --dynamic {plan_path} "
                      f"--group-size {plan['group_size']}")
    for path in write_analysis(report, args.report_json):
        console.print(f"written: {path}")
    sens = report["sensitivity"]
    narrow = str(min(sens["bits"]))
    worst = sens["ranking"][:5]
    console.print(f"most sensitive layers at {narrow} bits: "
                  + ", ".join(f"{i} ({sens['layers'][i]['widths'][narrow]['verdict']}, KL "
                              f"{sens['layers'][i]['widths'][narrow]['kl']:.4f})" for i in worst))
    console.print(f"outlier dimensions: {[d['channel'] for d in report['outlier_dimensions'][:10]] or 'none'}; "
                  f"analysis took {report['seconds']:.1f} s")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from neural_quantization.generation.session import load_for_generation
    from neural_quantization.kernels import tuning, tuning_cache
    from neural_quantization.nn.kernel_tuning import tune_model

    if not torch.cuda.is_available():
        raise ValueError("tune times the kernels on an NVIDIA GPU and none is visible here "
                         "(torch.cuda.is_available() is False); run it on the machine that will serve the model.")
    if args.tokens is not None and min(args.tokens) < 1:
        raise ValueError(f"--tokens {' '.join(map(str, args.tokens))}: every token count must be at least 1.")
    console = Console(soft_wrap=True)
    dtypes = [getattr(torch, name) for name in args.dtype]
    model, _, _ = load_for_generation(args.model, torch.device("cuda"), args.dtype[0], args.trust_remote_code)
    started = time.perf_counter()
    rows = tune_model(model, args.tokens or tuning.DEFAULT_TOKEN_COUNTS, dtypes, fused=not args.no_fused,
                      retune=args.retune, log=console.print)
    seconds = time.perf_counter() - started
    table = Table(title=f"kernel choices tuned on {torch.cuda.get_device_name()}")
    for column in ("layer shape", "M", "dtype", "tuned µs", "heuristic µs", "heuristic / tuned", "choice"):
        table.add_column(column, justify="left" if column in ("layer shape", "choice", "dtype") else "right")
    for row in rows:
        table.add_row(row["shape"], str(row["M"]), row["dtype"], f"{row['tuned_us']:.1f}", f"{row['heuristic_us']:.1f}",
                      f"{row['heuristic_over_tuned']:.2f}", row["tuned"])
    if rows:
        console.print(table)
    where = tuning_cache.user_cache_file(torch.cuda.get_device_name())
    console.print(f"{len(rows)} keys tuned in {seconds:.0f} s"
                  + (f"; saved to {where}" if where is not None else f" (not saved: {tuning_cache.ENV_CACHE} is off)")
                  + ("" if rows else " (every key already had a stored choice; --retune tunes them again)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(args.model), "seconds": round(seconds, 1), "rows": rows},
                                              indent=2) + "\n", encoding="utf-8")
        console.print(f"JSON written to {args.json}")
    return 0


def run_quantize_pipeline(args: argparse.Namespace) -> int:
    import importlib.util

    import torch

    from neural_quantization.nn.modules import resolve_device

    if importlib.util.find_spec("diffusers") is None:
        raise ValueError("quantize-pipeline needs diffusers; install it with pip install 'neural-quantization[diffusion]'.")
    from neural_quantization.diffusion import diffusion_config, read_prompts
    from neural_quantization.diffusion.run import quantize_and_save
    from neural_quantization.generation.session import DTYPES

    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: sample at least one step per prompt.")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype}; use one of {', '.join(DTYPES)}.")
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] or (torch.float16 if device.type == "cuda" else torch.float32)
    prompts = read_prompts(args.prompts) if args.prompts else None
    config = diffusion_config(args.bits, args.group_size, args.method, sym=not args.asym)
    quantize_and_save(args.pipeline, args.output_dir, config, prompts, args.steps, args.guidance_scale, args.height,
                      args.width, tuple(args.skip), device, dtype, args.seed, args.report, gguf=args.gguf)
    return 0


def run_bench(bench_args: list[str]) -> int:
    """Hand the arguments to the benchmark, which owns its options: ``bench decode …`` the end-to-end
    decode benchmark (``bench/decode.py``), ``bench generate …`` ``generate`` against fp16 and eager
    transformers (``bench/generate.py``), otherwise the kernel benchmark (``bench/kernels.py``)."""
    import torch

    if bench_args[:1] == ["decode"]:
        from neural_quantization.bench import decode as benchmark

        name, bench_args = "the decode benchmark", bench_args[1:]
    elif bench_args[:1] == ["generate"]:
        from neural_quantization.bench import generate as benchmark

        name, bench_args = "the generate benchmark", bench_args[1:]
    else:
        from neural_quantization.bench import kernels as benchmark

        name = "the kernel benchmark"
    if not torch.cuda.is_available() and not {"-h", "--help"} & set(bench_args):
        raise ValueError(f"{name} needs a CUDA GPU; run it on a machine with one (see docs/kernels.md).")
    return int(benchmark.main(bench_args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        if argv[:1] == ["bench"]:
            return run_bench(argv[1:])
        parser = build_parser()
        args = _parse(parser, argv)
        args.argv = argv
        if args.command is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        if args.command == "quantize":
            return run_quantize(args)
        if args.command == "demo":
            return run_quantize(args, demo=True)
        if args.command == "deploy-report":
            return run_deploy_report(args)
        if args.command == "eval":
            return run_eval(args)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "analyze":
            return run_analyze(args)
        if args.command == "tune":
            return run_tune(args)
        if args.command == "quantize-pipeline":
            return run_quantize_pipeline(args)
        return run_bench(args.bench_args)
    except _user_errors() as err:
        print(f"neural-quantize: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("neural-quantize: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


def _one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line message, e.g. the list of ways to name a model,
    has its lines joined), so scripts and logs get one line per failure."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
