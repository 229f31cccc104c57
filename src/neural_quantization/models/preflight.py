"""Pre-flight estimate: the memory, disk and time a quantization run will need, before it starts.

::

    estimate = estimate_run(model, config, num_samples=128, seq_len=2048, device=torch.device("cuda"))
    print(format_estimate(estimate))

``model`` may have its parameters on the ``meta`` device (``accelerate.init_empty_weights``): only
shapes and dtypes are read, so a 70B configuration is estimated on a laptop in milliseconds. The
decoder layers and their linears are found with ``nn/modules.py``, like the pipeline does;
attention and MLP sizes come from the model config (hidden size, heads, head_dim, intermediate size).

Memory model
------------
The device peak is the largest sum over the *phases* the pipeline goes through
(``models/sequential.py``: capture, then per layer: load, per group of linears a Hessian forward
and the solves, the forward to the next layer's inputs), counting the tensors each phase keeps
alive. For one decoder layer with linears ``j`` (N_j outputs, K_j inputs; ``U_j = 4 N_j K_j`` and
``V_j = 4 K_j²`` bytes of one fp32 weight copy and one fp32 Hessian), dtype size ``b``, ``T``
calibration tokens and ``T_b`` tokens per calibration batch:

========================  ============================================================================
term                      bytes
========================  ============================================================================
non_layer_weights         embeddings, final norm, lm_head: ``move_all_but`` puts them on the device
                          for the whole run (on a CPU device without streaming: ``model_weights``, the
                          whole model, finished layers counted packed)
layer_weights             the current layer's float weights; the original linears stay referenced
                          (``quantize_block``'s ``linears``) until the layer is done
quantized_linears         the QuantLinears solved so far: packed int32 codes, fp16 scales, int32
                          zeros, int32 g_idx (+ bias)
dequantized_linears       the ``nn.Linear`` copies the calibration runs through
                          (``dequantized_linear``): ``N_j K_j b`` each
hidden_states             ``T h b`` entering the layer; ``run_block`` builds the outputs next to them
                          (``hidden_states_next``, a second copy). With ``activations_on_host``: they
                          wait on the host, one batch in and one out on the device
                          (``hidden_states_batch``); layer 0's inputs are still captured on the device
layer_kwargs              per batch, for all batches (captured on the device once): rotary cos/sin
                          ``(1, seq, head_dim)`` per layer type, position ids, masks ``(batch, 1, seq,
                          seq)`` (eager attention: every layer type, model dtype; sdpa: sliding-window
                          layers only, bool)
forward_workspace         one batch through the block, ``T_b`` × the largest of: the RMSNorm fp32
                          temporaries, q/k/v + rotary temporaries, sdpa output (+ repeated k/v when a
                          mask is passed, + scores for eager), ``2h + 3I`` for the gated MLP
hessians                  the group's fp32 Hessian ``V_j`` (true-sequential), else one per linear of
                          the layer, all alive until the layer's solves end; while one accumulates,
                          the hook holds the batch's input, and a bf16/fp16 batch on CUDA adds a
                          ``V_j`` product (``mm(..., out_dtype=float32)``), on CPU an fp32 copy
awq_check_copy,           with ``awq``, before the layer's groups: an fp32 copy of the layer (checks the
awq_statistics            folds) and every group's fp32 Hessian and mean magnitude, all alive together
solver_workspace          ``core/gptq.py`` for one linear: ``max(U + 2 V, 7.5 U)`` (CUDA: ``U + 3 V``):
                          the W copy and the solver's H copy, handed to ``inverse_hessian_cholesky``,
                          which damps it in place and frees it once factored (two K×K matrices at a
                          time); or, at the loss, W, codes, permuted codes, the dequantized weight's
                          temporaries and the two products of ``hessian_weighted_error``. Packing
                          (``formats/gptq.py``, int64 copies: about 5 U) and ``dequantize_gptq`` (4 U)
                          come after and are smaller
========================  ============================================================================

Checked against measurements: on CPU every step above (VmHWM with glibc returning freed blocks at
once; ``tests/test_preflight.py`` checks a whole run within 20 %; it lands within 2 %); on one H100
(decoder layers on the host, solved on the GPU, 128 × 2048 tokens, W4 g128, bf16), the peak of
live tensors (``torch.cuda.max_memory_allocated``) measured / estimated: Mistral-7B shapes (4
layers) 7.37 / 7.33 GiB; Llama-70B shapes (2 layers) 27.18 / 27.17 GiB; the same with activations
on the host 23.18 / 23.17 GiB; ``benchmarks/results/quantize_streamed_llama70b_h100.json``
(streamed weights, 4 layers) 27.2 / 27.17 GiB, host RSS 5.7 / 5.9 GiB, checkpoint 5,982,234,207 /
5,982,208,000 bytes (config files aside). The CUDA Cholesky count (3 V) was inferred from the
0.25 V gap these runs showed against the CPU count. Those GPU runs predate the solver's H hand-over
(2026-12-08: 2 K×K matrices at a time instead of 3.75 on CPU), which lowers the solve's peak; they
have not been repeated since.

Host memory: a fixed runtime overhead (Python, torch, transformers; CUDA libraries and context when
the device is a GPU), the model's float weights (without ``stream_weights``: all of them at load;
with it: the non-layer weights and about one layer read from disk plus one quantized layer being
written), calibration activations when they live on the host, and the quantized model while it is
saved (safetensors >= 0.6 writes from the tensors without copying them). On a CPU device the
device *is* the host: the host peak is the device peak plus the runtime overhead.

Time (rough): forward FLOPs of the calibration tokens through each layer times the forwards the
pipeline makes (true-sequential: a partial forward per group of linears that share an input, plus
one full forward), Hessian FLOPs ``2 T K²`` per Hessian, and per linear the GPTQ solve
``K (c + c_N N) + 1.33 K³ / R_factor + 3 N K² / R_fp32``, at throughputs fitted to measurements
(see :data:`H100` and :func:`cpu_throughput`); on a GPU also the copies of layers (and of offloaded
activations) between host and device, and a one-time start-up. Against the H100 runs above:
10.1 s estimated / 10.9 s measured (Mistral-7B shapes, 4 layers, the process's first run), 20.3 /
16.4 s (Llama-70B shapes, 2 layers; kernels already compiled, so no start-up), 31.2 / 33.1 s with
the activations on the host. On CPU it can be off by 2x (shared cores, Python overhead per column).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from neural_quantization.config import QuantizationConfig
from neural_quantization.core.awq import ALPHAS
from neural_quantization.formats.gptq import gptq_layer_bytes
from neural_quantization.formats.units import GIB, MIB, format_bytes
from neural_quantization.models.shape import read_model_shape, text_config
from neural_quantization.nn.modules import find_decoder_layers, find_linear_layers

FP32 = 4

#: Host memory of the process itself besides the model: Python, torch, transformers (0.3 GiB after
#: the imports with a CPU build of torch, measured) plus allocator slack; with CUDA, the CUDA
#: libraries and context too (0.9 GiB after imports and CUDA init on an H100 machine; 1.0 to 2.7
#: GiB beside the model in measured runs, ``benchmarks/results/quantize_speed_h100.json``: 1.9 GiB).
HOST_RUNTIME_BYTES_CPU = GIB // 2
HOST_RUNTIME_BYTES_CUDA = 2 * GIB
#: The CUDA context and cuBLAS/cuSOLVER workspaces on the GPU, outside torch's allocator.
DEVICE_RUNTIME_BYTES_CUDA = GIB // 2
#: What a CPU run adds besides tensors: math libraries' code and kernel caches loaded on first use
#: (BLAS/LAPACK, oneDNN, sdpa) and glibc heap kept by the GPTQ column loop's small tensors. Measured
#: 25-30 MiB (VmHWM) on x86-64 with torch 2.13, independent of the model's width.
CPU_FIRST_USE_BYTES = 24 * MIB
#: The share of the available memory a peak may use and still "fit": the estimate counts live
#: tensors, the allocators' fragmentation comes on top (PyTorch's CUDA caching allocator reserved
#: 1.4-1.5x the live peak in the H100 runs above; it hands cached blocks back when memory runs short).
FIT_MARGIN = 0.90
#: Copies between host and GPU, measured on an H100 machine in the runs above (pageable memory):
#: to the GPU about 8 GB/s; back into freshly allocated host memory (``.to("cpu")`` of activations
#: and finished layers) about 1.3 GB/s. Reading streamed weights from disk: 2 GB/s (an assumption).
HOST_TO_DEVICE_BYTES_PER_SECOND = 8e9
DEVICE_TO_HOST_BYTES_PER_SECOND = 1.3e9
DISK_BYTES_PER_SECOND = 2e9
#: One-time costs of a GPU run (Triton compiling the GPTQ column kernel, cuBLAS/cuSOLVER set-up):
#: the first layer took 6.1 s against a median of 1.4 s in ``quantize_speed_h100.json``.
CUDA_STARTUP_SECONDS = 4.0


@dataclass(frozen=True)
class Throughput:
    """Sustained rates of one device for the pipeline's kinds of work (FLOP/s, seconds).

    matmul_flops: forward matmuls in the model dtype; hessian_flops: ``X^T X`` products;
    fp32_flops: GPTQ's lazy block updates and the loss products; factor_flops: the Cholesky
    factorisations and inverse (counted as 1.33 K³); column_seconds + column_row_seconds · N: one
    column of the GPTQ loop.
    """

    name: str
    matmul_flops: float
    hessian_flops: float
    fp32_flops: float
    factor_flops: float
    column_seconds: float
    column_row_seconds: float


#: One H100 (SXM, 80 GB), bf16. matmul: ``run_block`` of 128×2048 tokens ran at 505 (Mistral-7B
#: layer) and 560 TFLOP/s (Llama-70B layer); hessian: the Hessian forwards then fit 450 TFLOP/s
#: for ``mm(x.T, x, out_dtype=float32)``. The solve constants are a fit to
#: ``benchmarks/results/gptq_solve_speed_h100.json`` (Mistral-7B shapes, Triton column kernel:
#: 0.031 s for 4096×4096, 0.047 s for 14336×4096, 0.32 s for 4096×14336); they predict 3.0 s for
#: a Llama-70B layer's solves, 3.15 s were measured.
H100 = Throughput(
    name="H100",
    matmul_flops=550e12,
    hessian_flops=450e12,
    fp32_flops=32e12,
    factor_flops=25e12,
    column_seconds=6e-6,
    column_row_seconds=0.0,
)
#: fp32 models on a GPU: no tensor cores for the forward or the Hessian (TF32 is off by default).
GPU_FP32_MATMUL_FLOPS = 40e12


def cpu_throughput(threads: int | None = None) -> Throughput:
    """A CPU with ``threads`` torch threads (default: ``torch.get_num_threads()``).

    Measured on one core of a 2-core cloud VM (AVX2): fp32 matmul 0.11 TFLOP/s, the Cholesky chain
    0.036 TFLOP/s, the torch column loop 90 µs + 0.09 µs per row. Products scale with the threads
    (optimistically), the column loop does not (it is a chain of small ops).
    """
    threads = threads or torch.get_num_threads()
    return Throughput(
        name=f"CPU ({threads} threads)",
        matmul_flops=0.1e12 * threads,
        hessian_flops=0.1e12 * threads,
        fp32_flops=0.1e12 * threads,
        factor_flops=0.036e12 * threads,
        column_seconds=90e-6,
        column_row_seconds=0.09e-6,
    )


@dataclass
class RunEstimate:
    """What a quantization run will need; every number is an estimate (see the module docstring).

    device_peak_bytes: the largest sum of live tensors on the compute device (on CPU: the whole
        model plus the run's working memory).
    working_bytes: ``device_peak_bytes`` minus the model float weights it includes: what the run
        adds on top of the weights (on CPU, the increase over the already-loaded model).
    host_peak_bytes: the process's host memory at its peak, runtime overhead included.
    disk_bytes: the quantized checkpoint's size (tensors; config and tokenizer files not counted).
    seconds: rough wall time of the quantization (calibration forwards, Hessians, solves, copies).
    device_total_bytes / host_total_bytes: what the machine has (None if unknown).
    device_available_bytes / host_available_bytes: what the fit is checked against: free device
        memory plus what this model already holds there; the host's available memory.
    fits: both peaks fit (with a margin, :data:`FIT_MARGIN`); unknown totals are not checked.
    breakdown: named terms in bytes: ``device.*`` of the device peak's phase, ``host.*`` of the
        host peak, ``disk.*`` of the checkpoint.
    seconds_breakdown: the time by kind of work.
    peak_phase: where the device peak happens (e.g. "layer 0: GPTQ solve of mlp.down_proj").
    advice: what to change when the run does not fit.
    """

    device: str
    device_peak_bytes: int
    working_bytes: int
    host_peak_bytes: int
    disk_bytes: int
    seconds: float
    device_total_bytes: int | None
    host_total_bytes: int | None
    device_available_bytes: int | None
    host_available_bytes: int | None
    fits: bool
    breakdown: dict[str, int] = field(default_factory=dict)
    seconds_breakdown: dict[str, float] = field(default_factory=dict)
    peak_phase: str = ""
    notes: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# What the estimate reads from the model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Linear:
    name: str
    n: int  # out_features
    k: int  # in_features
    bias: bool


@dataclass(frozen=True)
class _Layer:
    weight_bytes: int  # parameters and buffers of the block (moved by block.to)
    linears: tuple[_Linear, ...]  # in registration order (= execution order for HF blocks)
    other_disk_bytes: int  # persistent tensors of the block besides the linears (norms)


@dataclass(frozen=True)
class _Shape:
    dtype_bytes: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: tuple[_Layer, ...]
    non_layer_bytes: int  # parameters and buffers outside the decoder layers
    non_layer_disk_bytes: int  # the persistent part of them, each tied tensor once
    head: tuple[int, int] | None  # (vocab, hidden) of lm_head if it is an nn.Linear
    head_tied: bool
    attn_implementation: str
    layer_types: tuple[str, ...]
    sliding_window: int | None
    moe: bool


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _persistent_bytes(root: nn.Module, skip: set[int]) -> int:
    """Bytes ``state_dict`` would hold for ``root``: parameters and persistent buffers, each tensor
    once (tied weights), leaving out the tensors whose ``id`` is in ``skip``."""
    total, seen = 0, set(skip)
    for module in root.modules():
        tensors = list(module._parameters.values()) + [
            buf for name, buf in module._buffers.items() if name not in module._non_persistent_buffers_set
        ]
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += _tensor_bytes(t)
    return total


def _model_shape(model: nn.Module) -> _Shape:
    """Read sizes from ``model`` without touching its data (works on the meta device)."""
    _, blocks = find_decoder_layers(model)
    in_blocks = {id(p) for p in blocks.parameters()} | {id(b) for b in blocks.buffers()}
    dtype = next((p.dtype for p in blocks.parameters() if p.is_floating_point()), torch.float32)
    layers = []
    for block in blocks:
        found = find_linear_layers(block)
        linears = tuple(_Linear(name, m.out_features, m.in_features, m.bias is not None) for name, m in found.items())
        weight_bytes = sum(_tensor_bytes(p) for p in block.parameters()) + sum(
            _tensor_bytes(b) for b in block.buffers()
        )
        linear_tensors = {id(t) for m in found.values() for t in (m.weight, m.bias) if t is not None}
        layers.append(_Layer(weight_bytes, linears, _persistent_bytes(block, linear_tensors)))

    non_layer = sum(_tensor_bytes(p) for p in model.parameters() if id(p) not in in_blocks)  # tied once
    non_layer += sum(_tensor_bytes(b) for b in model.buffers() if id(b) not in in_blocks)
    persistent = _persistent_bytes(model, in_blocks)

    config = text_config(getattr(model, "config", None))
    embed = model.get_input_embeddings()
    # Sizes the config does not give are measured from the modules (models/shape.py reads the rest).
    vocab, width = embed.weight.shape
    widest = max((lin.n for lin in layers[0].linears if lin.k == width), default=4 * width)
    sizes = read_model_shape(config, fallback={
        "layers": len(layers), "hidden": width, "intermediate": widest, "heads": max(1, width // 128), "vocab": vocab,
    })
    head = model.get_output_embeddings()
    head_shape = (head.out_features, head.in_features) if isinstance(head, nn.Linear) else None
    tied = head_shape is not None and head.weight is embed.weight
    layer_types = tuple(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if not layer_types:
        sliding = window is not None and getattr(config, "use_sliding_window", True)
        layer_types = ("sliding_attention" if sliding else "full_attention",)
    moe = any(getattr(config, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts"))
    return _Shape(
        dtype_bytes=dtype.itemsize,
        hidden=sizes.hidden,
        intermediate=sizes.intermediate,
        heads=sizes.heads,
        kv_heads=sizes.kv_heads,
        head_dim=sizes.head_dim,
        layers=tuple(layers),
        non_layer_bytes=non_layer,
        non_layer_disk_bytes=persistent,
        head=head_shape,
        head_tied=tied,
        attn_implementation=str(getattr(config, "_attn_implementation", None) or "sdpa"),
        layer_types=tuple(dict.fromkeys(layer_types)),
        sliding_window=int(window) if window else None,
        moe=bool(moe),
    )


# --------------------------------------------------------------------------------------------------
# Per-tensor sizes the pipeline creates
# --------------------------------------------------------------------------------------------------


def quant_linear_bytes(n: int, k: int, bits: int, group_size: int, bias: bool, dtype_bytes: int) -> int:
    """Bytes of one QuantLinear's buffers: the GPTQ tensors (``formats/gptq.py``) + bias in the layer dtype."""
    return gptq_layer_bytes(bits, group_size, k, n) + (n * dtype_bytes if bias else 0)


def _gptq_workspace(n: int, k: int, block_size: int, on_cuda: bool) -> int:
    """Peak bytes ``gptq_quantize`` allocates on top of its inputs (see the module docstring)."""
    u, v = FP32 * n * k, FP32 * k * k
    # W and the solver's H copy, which it hands to inverse_hessian_cholesky: damped in place and
    # freed once factored, so two (K, K) matrices at a time (H and its factor, factor and inverse,
    # inverse and U; the act-order permutation likewise goes rows, then columns). Measured on CPU:
    # U + 2.0 V (K = 4096, N = 512, with and without act-order; 3.75 V before the hand-over). On
    # CUDA cholesky_inverse also solves against an identity it allocates (factor, identity and
    # inverse: 3 V; from the earlier H100 runs, not re-measured since).
    cholesky = u + (3 * v if on_cuda else 2 * v)
    column_loop = 3 * u + v + 3 * FP32 * n * block_size  # W, codes, lazy-update product; U; blocks
    # W, codes, permuted codes, dequantize's gathers and products, then delta, delta @ H, product:
    # measured 7.5 U on CPU (K = 4096, N = 14336); U and H are freed before it
    loss = 7.5 * u
    return int(max(cholesky, column_loop, loss))


def _pack_workspace(n: int, k: int, bits: int) -> int:
    """``to_gptq_tensors``: the int32 codes, two int64 copies, int64 words, ``where`` temporaries."""
    return int(4 * n * k + 16 * n * k + 0.75 * n * k * bits)


def _dequantize_workspace(n: int, k: int) -> int:
    """``dequantize_gptq``: fp32 codes, gathered scales and zeros, the difference (4 fp32 copies)."""
    return 16 * n * k


def _rtn_workspace(n: int, k: int, dtype_bytes: int) -> int:
    return (FP32 * n * k if dtype_bytes != FP32 else 0) + FP32 * n * k


def _kwargs_bytes_per_batch(shape: _Shape, batch: int, seq_len: int) -> int:
    """Rotary tables, position ids and masks the model passes its decoder layers for one batch."""
    b = shape.dtype_bytes
    total = len(shape.layer_types) * 2 * seq_len * shape.head_dim * b + seq_len * 8
    for layer_type in shape.layer_types:
        sliding = "sliding" in layer_type or "chunked" in layer_type
        if shape.attn_implementation == "eager":
            total += batch * seq_len * seq_len * b
        elif shape.attn_implementation == "sdpa" and sliding:
            if shape.sliding_window is None or seq_len >= shape.sliding_window:
                total += batch * seq_len * seq_len  # bool
    return total


def _masked(shape: _Shape, seq_len: int) -> bool:
    """Whether some layer receives a materialized mask (sdpa then repeats k/v for GQA)."""
    return _kwargs_bytes_per_batch(shape, 1, seq_len) > (
        len(shape.layer_types) * 2 * seq_len * shape.head_dim * shape.dtype_bytes + seq_len * 8
    )


def _forward_workspace(shape: _Shape, batch: int, seq_len: int, first_group_only: bool = False) -> int:
    """Bytes one calibration batch needs inside a decoder block (no autograd), besides its input.

    Per token: RMSNorm keeps fp32 temporaries (2 fp32 rows; 2 more + a cast for 16-bit models);
    attention holds the normed input, q/k/v, rotary temporaries (q·cos, rotate_half(q), ·sin), then
    the sdpa output and its contiguous transpose (+ k/v repeated to all heads when a mask is
    passed; eager attention adds the scores and their fp32 softmax); the gated MLP holds the
    residual sum, the normed input and act(gate), up and their product (``2h + 3I``).
    """
    b, h, inter = shape.dtype_bytes, shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    tokens = batch * seq_len
    norm = 8 * h if b == FP32 else 12 * h
    if first_group_only:
        return tokens * norm
    qkv = (q + 2 * kv) * b
    rotary = max(3 * q, q + 3 * kv) * b
    repeat = 2 * (q - kv) * b if _masked(shape, seq_len) and kv < q else 0
    attention = max(h * b + qkv + rotary, h * b + qkv + repeat + 2 * q * b)
    mlp = max(h * b + norm, 2 * h * b + 3 * inter * b)
    per_token = max(norm, attention, mlp)
    scores = 0
    if shape.attn_implementation == "eager":
        scores = batch * shape.heads * seq_len * seq_len * (b + FP32)
    return tokens * per_token + scores


def _groups(linears: tuple[_Linear, ...]) -> list[list[_Linear]]:
    """Approximate true-sequential groups: consecutive linears under one parent with the same input size.

    The pipeline finds the groups by running the block (``linear_groups``); without running it,
    ``q/k/v`` and ``o`` of a Llama block (same parent, same input size) fall into one group.
    """
    groups: list[list[_Linear]] = []
    for lin in linears:
        parent = lin.name.rpartition(".")[0]
        if groups and groups[-1][-1].name.rpartition(".")[0] == parent and groups[-1][-1].k == lin.k:
            groups[-1].append(lin)
        else:
            groups.append([lin])
    return groups


# --------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------


@dataclass
class _Phase:
    name: str
    terms: dict[str, int]
    weights: int  # the float-weight part of the terms (for working_bytes)

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass
class _Plan:
    """The run's sizes under one choice of options; evaluated again for the advice."""

    shape: _Shape
    config: QuantizationConfig
    num_samples: int
    seq_len: int
    on_cuda: bool  # compute device is a GPU (layers live on the host between turns)
    stream_weights: bool
    activations_on_host: bool  # only meaningful with a GPU

    @property
    def one_layer_resident(self) -> bool:
        """Only the current decoder layer's float weights are in the compute device's memory."""
        return (self.on_cuda or self.stream_weights) and self.config.method != "rtn"

    @property
    def batch(self) -> int:
        return min(self.config.calibration_batch_size, self.num_samples)

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_samples / self.config.calibration_batch_size)

    def linear_bytes(self, lin: _Linear) -> int:
        return lin.n * lin.k * self.shape.dtype_bytes + (lin.n * self.shape.dtype_bytes if lin.bias else 0)

    def packed(self, lin: _Linear) -> int:
        return quant_linear_bytes(lin.n, lin.k, self.config.bits, self.config.group_size, lin.bias, self.shape.dtype_bytes)

    def activation_bytes(self) -> int:
        """One copy of the hidden states of all calibration tokens."""
        return self.num_samples * self.seq_len * self.shape.hidden * self.shape.dtype_bytes

    def kwargs_bytes(self) -> int:
        return _kwargs_bytes_per_batch(self.shape, self.batch, self.seq_len) * self.num_batches

    def device_phases(self) -> list[_Phase]:
        """Every step of ``quantize_decoder_layers`` with the bytes it keeps on the compute device."""
        shape, config = self.shape, self.config
        b = shape.dtype_bytes
        batch_hidden = self.batch * self.seq_len * shape.hidden * b
        # Between layers the activations wait on the device, or on the host (``activations_device``):
        # then each batch is copied in for the block (its input) and its output copied out.
        waiting = 0 if self.activations_on_host else self.activation_bytes()
        working_in = batch_hidden if self.activations_on_host else 0
        outputs = batch_hidden if self.activations_on_host else self.activation_bytes()
        kwargs = self.kwargs_bytes()  # captured on the device for every batch, freed after the last layer
        fwd = _forward_workspace(shape, self.batch, self.seq_len)
        fwd_first = _forward_workspace(shape, self.batch, self.seq_len, first_group_only=True)
        model_float = shape.non_layer_bytes + sum(layer.weight_bytes for layer in shape.layers)
        phases: list[_Phase] = []
        runtime = {} if self.on_cuda else {"runtime_first_use": CPU_FIRST_USE_BYTES}

        # What the device holds besides the current layer's work: on a GPU (or with streamed
        # weights) the non-layer weights and the current layer; on the CPU the whole model, its
        # finished layers already packed. RTN rounds every layer where its weights are.
        def resident(index: int) -> dict[str, int]:
            if self.one_layer_resident:
                layer = shape.layers[index].weight_bytes if index < len(shape.layers) else 0
                return {"non_layer_weights": shape.non_layer_bytes, "layer_weights": layer}
            done = shape.layers[:index]
            freed = sum(self.linear_bytes(lin) - self.packed(lin) for layer in done for lin in layer.linears)
            return {"model_weights": model_float - freed}

        def add(name: str, terms: dict[str, int]) -> None:
            terms = {k: int(v) for k, v in terms.items() if v}
            weights = sum(terms.get(k, 0) for k in ("non_layer_weights", "layer_weights", "model_weights"))
            phases.append(_Phase(name, terms, weights))

        if config.method == "rtn":
            for index, layer in enumerate(shape.layers):
                packed = 0
                for lin in layer.linears:
                    work = _rtn_workspace(lin.n, lin.k, b) + _pack_workspace(lin.n, lin.k, config.bits)
                    add(f"layer {index}: RTN of {lin.name}", {
                        **resident(index), **runtime, "quantized_linears": packed, "solver_workspace": work,
                    })
                    packed += self.packed(lin)
            return phases

        # capture_layer_inputs keeps every batch's layer-0 input on the device, then moves them.
        capture = resident(0)
        capture.pop("layer_weights", None)
        add("capturing layer 0 inputs", {
            **capture, **runtime, "hidden_states": self.activation_bytes(), "layer_kwargs": kwargs,
            "forward_workspace": batch_hidden,
        })
        # GPTAQ (asymmetric calibration) keeps a float copy of the layer and the float model's
        # hidden states beside the quantized ones, and a cross term as large as each Hessian.
        asym = bool(config.gptaq)
        for index, layer in enumerate(shape.layers):
            base = {**resident(index), **runtime, "hidden_states": waiting, "layer_kwargs": kwargs}
            if asym:
                base.update(float_layer_copy=layer.weight_bytes, float_hidden_states=waiting)
            if index > 0:  # storage.load of this layer while the previous inputs are still referenced
                add(f"layer {index}: loading the layer", {**base, "hidden_states_next": waiting})
            if config.awq:  # models/awq.py: an fp32 copy of the layer checks the folds while one run over
                # the calibration data keeps every group's input statistics (H and mean |x|); the hook
                # holds a batch's input, its fp32 copy and |x|
                widest_k = max(lin.k for lin in layer.linears)
                add(f"layer {index}: AWQ statistics", {
                    **base, "awq_check_copy": layer.weight_bytes * FP32 // b, "hidden_states_batch": working_in,
                    "awq_statistics": sum(FP32 * (g[0].k ** 2 + g[0].k) for g in _groups(layer.linears)),
                    "forward_workspace": max(fwd, self.batch * self.seq_len * widest_k * (2 * b + FP32)),
                })
            groups = _groups(layer.linears) if config.true_sequential else [list(layer.linears)]
            solved_packed = solved_copies = 0
            for g, group in enumerate(groups):
                widest_k = max(lin.k for lin in group)
                if config.true_sequential:
                    hessians = FP32 * group[0].k ** 2
                else:
                    hessians = sum(FP32 * lin.k ** 2 for lin in group)
                # The forward stops at the group's first linear: either still inside the block's
                # intermediates, or at the hook holding that linear's input batch while the Hessian
                # update runs (16-bit on CUDA: an fp32 K×K product; on CPU: an fp32 copy of x).
                tokens = self.batch * self.seq_len
                if self.on_cuda and b < FP32:
                    accumulate = FP32 * widest_k ** 2
                elif b < FP32:
                    accumulate = FP32 * tokens * widest_k
                else:
                    accumulate = 0
                hook = tokens * widest_k * b + accumulate
                if asym:  # + the float input kept from the float block, and x - x̃ (and x̃) in fp32
                    hook += tokens * widest_k * b + FP32 * tokens * widest_k * (1 if b == FP32 else 2)
                add(f"layer {index}: Hessian forwards for {group[0].name}", {
                    **base, "quantized_linears": solved_packed, "dequantized_linears": solved_copies,
                    "hessians": hessians, "cross_terms": hessians if asym else 0, "hidden_states_batch": working_in,
                    "forward_workspace": max(fwd_first if g == 0 else fwd, hook),
                })
                targets = sum(FP32 * lin.n * lin.k for lin in group) if asym else 0  # W* of each linear
                for lin in group:
                    work = max(
                        _gptq_workspace(lin.n, lin.k, config.block_size, self.on_cuda),
                        FP32 * lin.n * lin.k + _pack_workspace(lin.n, lin.k, config.bits) + self.packed(lin),
                        self.packed(lin) + _dequantize_workspace(lin.n, lin.k),
                    )
                    add(f"layer {index}: GPTQ solve of {lin.name} ({lin.n}x{lin.k})", {
                        **base, "quantized_linears": solved_packed, "dequantized_linears": solved_copies,
                        "hessians": hessians, "gptaq_targets": targets, "solver_workspace": work,
                    })
                    solved_packed += self.packed(lin)
                    solved_copies += lin.n * lin.k * b
            add(f"layer {index}: forward to the next layer's inputs", {
                **base, "quantized_linears": solved_packed, "dequantized_linears": solved_copies,
                "hidden_states_batch": working_in, "hidden_states_next": outputs, "forward_workspace": fwd,
                "float_hidden_next": outputs if asym else 0,
            })

        if config.quantize_lm_head and shape.head is not None:
            vocab, width = shape.head
            done = {**resident(len(shape.layers)), **runtime}
            done.pop("layer_weights", None)
            # the final hidden states come back to the device; the layers' kwargs are freed by now
            add(f"lm_head: GPTQ solve ({vocab}x{width})", {
                **done, "hidden_states": self.activation_bytes(), "hessians": FP32 * width ** 2,
                "untied_head": vocab * width * b if shape.head_tied else 0,
                "solver_workspace": max(
                    _gptq_workspace(vocab, width, config.block_size, self.on_cuda),
                    FP32 * vocab * width + _pack_workspace(vocab, width, config.bits),
                ),
            })
        return phases

    def disk_terms(self) -> dict[str, int]:
        shape, config = self.shape, self.config
        linears = sum(self.packed(lin) for layer in shape.layers for lin in layer.linears)
        norms = sum(layer.other_disk_bytes for layer in shape.layers)
        rest = shape.non_layer_disk_bytes
        if config.quantize_lm_head and shape.head is not None:
            vocab, width = shape.head
            head_float = vocab * width * shape.dtype_bytes
            head_packed = quant_linear_bytes(vocab, width, config.bits, config.group_size, False, shape.dtype_bytes)
            rest += head_packed - (0 if shape.head_tied else head_float)
        return {"disk.quantized_linears": linears, "disk.layer_norms": norms, "disk.other_weights": rest}

    def host_terms(self, device_peak: int) -> dict[str, int]:
        """The host peak's terms (the largest of loading, running and saving)."""
        shape = self.shape
        disk = sum(self.disk_terms().values())
        if not self.on_cuda:
            runtime = HOST_RUNTIME_BYTES_CPU
            run = {"host.runtime": runtime, "host.device_peak": device_peak}
            if self.stream_weights:  # finished layers are on disk already
                save = {"host.runtime": runtime, "host.non_layer_weights": shape.non_layer_disk_bytes}
            else:
                save = {"host.runtime": runtime, "host.quantized_model": disk}
            return max(run, save, key=lambda t: sum(t.values()))
        runtime = HOST_RUNTIME_BYTES_CUDA
        layers = [layer.weight_bytes for layer in shape.layers]
        streams = 2 if self.config.gptaq else 1  # GPTAQ: the float model's hidden states too
        activations = 2 * streams * self.activation_bytes() if self.activations_on_host else 0  # inputs and outputs
        tokens = self.num_samples * self.seq_len * 8
        if self.stream_weights:
            biggest = max(layers, default=0)
            packed = max((sum(self.packed(lin) for lin in layer.linears) for layer in shape.layers), default=0)
            load = {"host.runtime": runtime, "host.non_layer_weights": shape.non_layer_bytes}
            run = {
                "host.runtime": runtime, "host.one_layer_weights": biggest, "host.one_quantized_layer": packed,
                "host.activations": activations, "host.calibration_tokens": tokens,
            }
            save = {"host.runtime": runtime, "host.non_layer_weights": shape.non_layer_disk_bytes}
        else:
            load = {"host.runtime": runtime, "host.model_weights": shape.non_layer_bytes + sum(layers)}
            run = {
                "host.runtime": runtime, "host.layer_weights": sum(layers), "host.activations": activations,
                "host.calibration_tokens": tokens,
            }
            save = {"host.runtime": runtime, "host.quantized_model": disk}
        return {k: v for k, v in max(load, run, save, key=lambda t: sum(t.values())).items() if v}

    def seconds(self, rate: Throughput) -> dict[str, float]:
        """Rough seconds by kind of work (see the module docstring)."""
        shape, config = self.shape, self.config
        tokens = self.num_samples * self.seq_len
        matmul = rate.matmul_flops
        if self.on_cuda and shape.dtype_bytes == FP32:
            matmul = min(matmul, GPU_FP32_MATMUL_FLOPS)
        hessian_rate = rate.hessian_flops if shape.dtype_bytes < FP32 or not self.on_cuda else matmul
        attention_per_token = 2 * self.seq_len * shape.heads * shape.head_dim  # causal QK^T and PV
        forward = hessians = solve = copies = 0.0
        for layer in shape.layers:
            if config.method == "rtn":
                solve += sum(FP32 * 8 * lin.n * lin.k / 1e12 for lin in layer.linears)  # memory bound
                continue
            groups = _groups(layer.linears) if config.true_sequential else [list(layer.linears)]
            flops = [2 * lin.n * lin.k for lin in layer.linears]
            full = sum(flops) + attention_per_token
            partial, before = 0.0, 0
            for g, group in enumerate(groups):
                partial += before + (attention_per_token if g > 0 else 0)
                before += sum(2 * lin.n * lin.k for lin in group)
                ks = [group[0].k] if config.true_sequential else [lin.k for lin in group]
                hessians += (2 if config.gptaq else 1) * sum(2 * tokens * k * k for k in ks) / hessian_rate
            if not config.true_sequential:
                partial = full
            if config.awq:  # models/awq.py: one more run over the calibration data with every group's
                # statistics, and the α search: per α one (N, K)·(K, K) product per linear
                forward += tokens * full / matmul
                hessians += sum(2 * tokens * g[0].k ** 2 for g in _groups(layer.linears)) / hessian_rate
                solve += len(ALPHAS) * sum(2 * lin.n * lin.k ** 2 for lin in layer.linears) / rate.fp32_flops
            passes = 2 if config.gptaq else 1  # GPTAQ runs the float block beside the quantized one
            forward += passes * tokens * (partial + full) / matmul + self.seq_len * full / matmul  # + linear_groups
            for lin in layer.linears:
                solve += lin.k * (rate.column_seconds + rate.column_row_seconds * lin.n)
                solve += 1.33 * lin.k ** 3 / rate.factor_flops + 3 * lin.n * lin.k * lin.k / rate.fp32_flops
            if self.on_cuda:
                copies += layer.weight_bytes / HOST_TO_DEVICE_BYTES_PER_SECOND
                copies += (sum(self.packed(lin) for lin in layer.linears) + layer.other_disk_bytes) / (
                    DEVICE_TO_HOST_BYTES_PER_SECOND
                )
                if self.activations_on_host:  # in for every Hessian forward and the last; out once
                    copies += (len(groups) + 1) * self.activation_bytes() / HOST_TO_DEVICE_BYTES_PER_SECOND
                    copies += self.activation_bytes() / DEVICE_TO_HOST_BYTES_PER_SECOND
            if self.stream_weights:
                copies += layer.weight_bytes / DISK_BYTES_PER_SECOND
        if config.quantize_lm_head and shape.head is not None:
            vocab, width = shape.head
            solve += width * (rate.column_seconds + rate.column_row_seconds * vocab)
            solve += 1.33 * width ** 3 / rate.factor_flops + 3 * vocab * width * width / rate.fp32_flops
            hessians += 2 * tokens * width * width / hessian_rate
        if self.on_cuda and config.method != "rtn":  # non-layer weights in, and back at the end
            copies += shape.non_layer_bytes * (1 / HOST_TO_DEVICE_BYTES_PER_SECOND + 1 / DEVICE_TO_HOST_BYTES_PER_SECOND)
        stages = len(config.cascade_stages) if config.cascade_stages and config.cascade_mode == "sequential" else 1
        times = {"forwards": forward, "hessians": hessians, "solves": solve, "copies": copies}
        times = {k: v * stages for k, v in times.items()}
        times["startup"] = CUDA_STARTUP_SECONDS if self.on_cuda else 0.0
        return times


# --------------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------------


def host_memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of host memory, or (None, None) where neither psutil nor /proc helps."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except ImportError:
        pass
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info[key] = int(value.split()[0]) * 1024
        return info.get("MemTotal"), info.get("MemAvailable", info.get("MemFree"))
    except (OSError, ValueError, IndexError):
        return None, None


def _device_memory(model: nn.Module, device: torch.device) -> tuple[int | None, int | None]:
    """(total, available) of a CUDA device: free memory plus what ``model`` already holds there."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None, None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    held = sum(
        _tensor_bytes(t)
        for t in list(model.parameters()) + list(model.buffers())
        if t.device.type == "cuda" and t.device.index == index
    )
    return int(total), int(free + held)


def _throughput(device: torch.device) -> tuple[Throughput, str | None]:
    if device.type != "cuda":
        return cpu_throughput(), None
    if not torch.cuda.is_available():
        return H100, "no CUDA device visible: the time assumes an H100"
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name:
        return H100, None
    return H100, f"the time assumes an H100's throughput; this GPU ({name}) may be slower or faster"


# --------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------


def _evaluate(plan: _Plan) -> tuple[_Phase, dict[str, int]]:
    phases = plan.device_phases()
    peak = max(phases, key=lambda p: p.total)
    return peak, plan.host_terms(peak.total)


def estimate_run(
    model: nn.Module,
    config: QuantizationConfig,
    num_samples: int,
    seq_len: int,
    device: torch.device,
    stream_weights: bool = False,
    activations_on_host: bool = False,
    device_budget: int | None = None,
    host_budget: int | None = None,
) -> RunEstimate:
    """Estimate device and host memory, disk and time of quantizing ``model`` with ``config``.

    ``num_samples`` × ``seq_len`` calibration tokens, solved on ``device``. ``stream_weights``: the
    decoder layers' weights are read from disk one layer at a time instead of being held on the
    host; ``activations_on_host``: the calibration hidden states live in host memory and one batch
    at a time is on the device. ``device_budget`` / ``host_budget``: bytes the run may use at most
    (``--max-gpu-memory`` / ``--max-cpu-memory``); they cap the available memory the fit is checked
    against. Reads only shapes and dtypes (``model`` may be on ``meta``).
    """
    device = torch.device(device)
    shape = _model_shape(model)
    # RTN needs no calibration: the pipeline rounds every layer where its weights already are.
    on_cuda = device.type == "cuda" and config.method != "rtn"
    plan = _Plan(shape, config, num_samples, seq_len, on_cuda, stream_weights, activations_on_host and on_cuda)
    peak, host = _evaluate(plan)
    disk = plan.disk_terms()
    rate, rate_note = _throughput(device)
    times = plan.seconds(rate)

    host_total, host_available = host_memory()
    host_available = _capped(host_available, host_budget)
    if on_cuda:
        device_total, device_available = _device_memory(model, device)
        device_available = _capped(device_available, device_budget)
        device_need = peak.total + DEVICE_RUNTIME_BYTES_CUDA
    else:
        device_total, device_available = host_total, host_available
        device_need = peak.total
    host_peak = sum(host.values())
    host_fits = host_available is None or host_peak <= FIT_MARGIN * host_available
    device_fits = device_available is None or device_need <= FIT_MARGIN * device_available
    fits = host_fits and (device_fits or not on_cuda)

    notes = [
        f"time is a rough estimate from assumed throughputs ({rate.name}): forwards, Hessians and "
        "GPTQ solves; loading the model, evaluation and saving are not included",
        "memory counts live tensors; the allocator's fragmentation and caching come on top (fits "
        f"allows {100 - FIT_MARGIN * 100:.0f} % of the available memory for them)",
    ]
    if rate_note:
        notes.append(rate_note)
    budgets = [f"{name} {_size(value)}" for name, value in (("--max-gpu-memory", device_budget if on_cuda else None),
                                                           ("--max-cpu-memory", host_budget)) if value]
    if budgets:
        notes.append("available memory capped by the budget: " + ", ".join(budgets))
    if on_cuda:
        notes.append(f"device peak excludes the CUDA context and library workspaces (~{DEVICE_RUNTIME_BYTES_CUDA // MIB} MiB)")
    if device_available is None and on_cuda:
        notes.append("no CUDA device visible: the device fit is not checked")
    if host_available is None:
        notes.append("host memory unknown: the host fit is not checked")
    if shape.moe:
        notes.append("mixture-of-experts block: the forward workspace and the forward FLOPs assume every expert runs")
    if config.cascade_stages:
        notes.append(f"cascade ({config.cascade_mode}): memory of one stage; time × stages for sequential")
    if config.true_sequential and config.method == "gptq":
        notes.append("true-sequential groups are approximated from module names and input sizes")

    breakdown = {f"device.{k}": v for k, v in peak.terms.items()}
    breakdown.update(host)
    breakdown.update(disk)
    estimate = RunEstimate(
        device=str(device),
        device_peak_bytes=peak.total,
        working_bytes=peak.total - peak.weights,
        host_peak_bytes=host_peak,
        disk_bytes=sum(disk.values()),
        seconds=sum(times.values()),
        device_total_bytes=device_total,
        host_total_bytes=host_total,
        device_available_bytes=device_available,
        host_available_bytes=host_available,
        fits=fits,
        breakdown=breakdown,
        seconds_breakdown={k: round(v, 3) for k, v in times.items()},
        peak_phase=peak.name,
        notes=notes,
    )
    if not fits:
        estimate.advice = _advice(plan, device_fits, host_fits, device_available, host_available, device_need - peak.total)
    return estimate


def _capped(available: int | None, budget: int | None) -> int | None:
    if budget is None:
        return available
    return budget if available is None else min(available, budget)


class BudgetError(ValueError):
    """No plan keeps the run within its memory budget; the message says what would."""


@dataclass
class MemoryPlan:
    """The memory choices of a run under a budget (:func:`plan_for_budget`).

    stream_weights, activations_on_host, calibration_batch_size: what the run uses. estimate: the
    pre-flight estimate of that plan. changes: each choice that differs from what was asked, in words.
    """

    stream_weights: bool
    activations_on_host: bool
    calibration_batch_size: int
    estimate: RunEstimate
    changes: list[str] = field(default_factory=list)


def plan_for_budget(
    model: nn.Module,
    config: QuantizationConfig,
    num_samples: int,
    seq_len: int,
    device: torch.device,
    *,
    device_budget: int | None = None,
    host_budget: int | None = None,
    stream_weights: bool = False,
    activations_on_host: bool | None = None,
    can_stream: bool = True,
) -> MemoryPlan:
    """The fastest plan whose estimate fits the budgets (and this machine's free memory).

    Tried in this order, each with the options before it: the run as asked; the calibration
    activations in host memory (a GPU run, unless ``activations_on_host`` is False); the decoder
    weights streamed from disk (if ``can_stream``). These three give the same checkpoint. Then
    calibration batches of half the size, down to one window (the same method; the Hessians are
    summed in another order). Raises :class:`BudgetError` naming what the smallest plan needs.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda" and config.method != "rtn"
    offloads = [bool(activations_on_host)] if activations_on_host is not None or not on_cuda else [False, True]
    streams = [stream_weights] + ([True] if can_stream and not stream_weights else [])
    batches = [config.calibration_batch_size]
    while batches[-1] > 1:
        batches.append(max(1, batches[-1] // 2))
    tried: list[tuple[bool, bool, int, RunEstimate]] = []
    for batch in batches:
        for stream in streams:
            for offload in offloads:
                candidate = config if batch == config.calibration_batch_size else config.replace(
                    calibration_batch_size=batch)
                estimate = estimate_run(model, candidate, num_samples, seq_len, device, stream, offload,
                                        device_budget, host_budget)
                tried.append((stream, offload, batch, estimate))
                if estimate.fits:
                    changes = []
                    if offload and not activations_on_host:
                        changes.append("calibration activations wait in host memory (--offload-activations)")
                    if stream and not stream_weights:
                        changes.append("decoder weights stream from disk (--stream-weights)")
                    if batch != config.calibration_batch_size:
                        changes.append(f"--calibration-batch-size {batch} (asked: {config.calibration_batch_size})")
                    return MemoryPlan(stream, offload, batch, estimate, changes)
    stream, offload, batch, smallest = min(tried, key=lambda row: (row[3].device_peak_bytes if on_cuda else 0,
                                                                     row[3].host_peak_bytes))
    flags = " ".join(flag for flag, on in (("--stream-weights", stream), ("--offload-activations", offload)) if on)
    needs = []
    if on_cuda:
        needs.append(f"{_size(smallest.device_peak_bytes + DEVICE_RUNTIME_BYTES_CUDA)} of GPU memory "
                     f"(budget {_size(device_budget) if device_budget else 'none'}, "
                     f"free {_size(smallest.device_available_bytes)})")
    needs.append(f"{_size(smallest.host_peak_bytes)} of host memory (budget {_size(host_budget) if host_budget else 'none'}, "
                 f"available {_size(smallest.host_available_bytes)})")
    hints = [hint for hint in smallest.advice if hint.startswith("use --num-samples")]
    fixes = (["raise --max-gpu-memory"] if on_cuda and device_budget else []) + (
        ["raise --max-cpu-memory"] if host_budget else []) + hints + (
        ["allow --stream-weights (it needs --format gptq, no evaluation in the same run, no --rotate)"]
        if not can_stream and not stream_weights else [])
    raise BudgetError(
        f"no plan fits the memory budget: even with {flags + ' ' if flags else ''}--calibration-batch-size {batch} "
        f"the run needs {' and '.join(needs)} (fits leaves {100 - FIT_MARGIN * 100:.0f} % for the allocator). "
        + ("Fix: " + "; or ".join(fixes) + "." if fixes else "Use a machine with more memory.")
    )


def _advice(
    plan: _Plan,
    device_fits: bool,
    host_fits: bool,
    device_available: int | None,
    host_available: int | None,
    device_extra: int,
) -> list[str]:
    """What would make the run fit, each option checked with the same model."""
    advice = []

    def fits(candidate: _Plan) -> bool:
        peak, host = _evaluate(candidate)
        ok = host_available is None or sum(host.values()) <= FIT_MARGIN * host_available
        if candidate.on_cuda and device_available is not None:
            ok = ok and peak.total + device_extra <= FIT_MARGIN * device_available
        return ok

    def variant(**changes: Any) -> _Plan:
        values = {**plan.__dict__, **changes}
        return _Plan(**values)

    if not host_fits and not plan.stream_weights:
        streamed = variant(stream_weights=True)
        now = sum(_evaluate(plan)[1].values())
        then = sum(_evaluate(streamed)[1].values())
        advice.append(
            f"use --stream-weights: decoder weights are read from disk one layer at a time (host memory "
            f"{_size(then)} instead of {_size(now)})" + ("" if fits(streamed) else "; not enough alone")
        )
    if not device_fits and plan.on_cuda and not plan.activations_on_host:
        offloaded = variant(activations_on_host=True)
        advice.append(
            f"use --offload-activations: the calibration activations ({_size(2 * plan.activation_bytes())}) "
            "move to CPU memory" + ("" if fits(offloaded) else "; not enough alone")
        )
    if plan.config.calibration_batch_size > 1:
        size = max(1, plan.config.calibration_batch_size // 4)
        if fits(variant(config=plan.config.replace(calibration_batch_size=size))):
            advice.append(f"use --calibration-batch-size {size}: less forward working memory")
    samples = plan.num_samples
    while samples > 1 and not fits(variant(num_samples=samples)):
        samples //= 2
    if samples < plan.num_samples and fits(variant(num_samples=samples)):
        advice.append(f"use --num-samples {samples}: fewer calibration activations (quality may suffer)")
    smallest = variant(num_samples=1, activations_on_host=plan.on_cuda, stream_weights=True)
    if not fits(smallest):
        peak, _ = _evaluate(smallest)
        options = "--num-samples 1 --stream-weights" + (" --offload-activations" if plan.on_cuda else "")
        advice.append(
            f"even with {options} the peak is {_size(peak.total)} at {peak.name}: "
            "this model needs a machine with more memory"
        )
    return advice


def _size(n: int | None) -> str:
    """Sizes in the pre-flight lines: ``formats/units.py``'s form with one GiB decimal ("37.4 GiB")."""
    return format_bytes(n, gib_decimals=1)


def _format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_estimate(estimate: RunEstimate) -> str:
    """A few lines for the terminal, printed before a long run starts."""
    device_available = _size(estimate.device_available_bytes)
    lines = [
        f"Pre-flight estimate ({estimate.device}):",
        f"  device memory  {_size(estimate.device_peak_bytes)} peak "
        f"(available {device_available}; peak at {estimate.peak_phase})",
        f"  host memory    {_size(estimate.host_peak_bytes)} (available {_size(estimate.host_available_bytes)})",
        f"  disk           {_size(estimate.disk_bytes)} quantized checkpoint",
        f"  time           ~{_format_seconds(estimate.seconds)} (rough: "
        + ", ".join(f"{k} {_format_seconds(v)}" for k, v in estimate.seconds_breakdown.items() if v >= 0.5)
        + ")",
        "  fits           " + ("yes" if estimate.fits else "NO"),
    ]
    lines += [f"  -> {line}" for line in estimate.advice]
    return "\n".join(lines)
