"""Triton kernels against ``kernels/reference.py``.

Without a GPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1`` is set below,
before any kernel module is imported); with a GPU they run for real and the CUDA-only tests run too.
Shapes are small and odd on purpose: K not a multiple of 128 (or of 8), N an odd multiple of 8,
M = 1, 3, 16, 33.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from neural_quantization.config import QuantizationConfig
from neural_quantization.core.rtn import rtn_quantize
from neural_quantization.formats.packing import pack, unpack
from neural_quantization.kernels import ops
from neural_quantization.kernels.reference import quant_linear_reference
from neural_quantization.kernels import dispatch
from neural_quantization.kernels.dispatch import LaunchConfig, launch
from neural_quantization.kernels.layout import prepare_kernel_layout
from neural_quantization.nn.qlinear import QuantLinear

DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def random_gptq(in_features, out_features, bits, group_size, sym, act_order, seed, device=DEVICE):
    """Random GPTQ tensors; with ``act_order`` the groups are assigned through a random permutation
    (``g_idx[perm[i]] = i // group_size``), as desc_act checkpoints have."""
    gen = torch.Generator().manual_seed(seed)
    size = in_features if group_size == -1 else group_size
    groups = -(-in_features // size)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (in_features, out_features), generator=gen, dtype=torch.int32)
    if sym:
        zeros = torch.full((groups, out_features), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(1, maxq + 1, (groups, out_features), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, out_features, generator=gen) * 0.05 + 0.005).half()
    order = torch.arange(in_features) // size
    if act_order:
        g_idx = torch.empty(in_features, dtype=torch.int64)
        g_idx[torch.randperm(in_features, generator=gen)] = order
    else:
        g_idx = order
    return {
        "qweight": pack(codes, bits, dim=0).to(device),
        "qzeros": pack(zeros - 1, bits, dim=1).to(device),
        "scales": scales.to(device),
        "g_idx": g_idx.to(torch.int32).to(device),
    }


def relative_error(out, ref):
    assert torch.isfinite(out).all(), "non-finite output (unwritten or wrong element)"
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# (strategy, M, K, N, bits, group_size, sym, act_order, dtype, split_k, block_n, block_k)
CASES = [
    ("gemv", 1, 200, 40, 4, 32, False, False, torch.float16, 3, 32, 64),
    ("gemv", 1, 196, 24, 4, 128, True, True, torch.bfloat16, 1, 32, 128),
    ("gemv", 3, 320, 40, 4, 64, False, True, torch.float16, 4, 16, 64),
    ("gemv", 3, 200, 24, 8, 32, True, True, torch.float16, 1, 32, 32),
    ("dot", 3, 200, 40, 4, 32, False, True, torch.float16, 2, 32, 128),
    ("dot", 16, 392, 40, 4, 128, True, False, torch.bfloat16, 3, 32, 128),
    ("dot", 33, 200, 40, 8, 64, False, False, torch.float16, 2, 32, 64),
    ("dot", 3, 196, 40, 8, -1, True, True, torch.bfloat16, 1, 16, 64),
    ("dequant", 33, 200, 40, 4, 32, False, True, torch.float16, 1, 32, 128),
    ("dequant", 16, 196, 24, 8, 128, True, False, torch.bfloat16, 1, 16, 64),
    # block_k of these = ROWS words · codes per word, inside one group
    ("gemv_rows", 1, 200, 40, 4, 32, False, False, torch.float16, 3, 32, 32),
    ("gemv_rows", 1, 196, 24, 4, 128, True, True, torch.bfloat16, 2, 32, 64),
    ("gemv_rows", 3, 200, 40, 4, -1, True, False, torch.float16, 2, 32, 64),
    ("gemv_rows", 2, 200, 40, 8, 128, False, False, torch.bfloat16, 2, 32, 32),
    ("dot_slices_xs", 3, 200, 40, 4, 32 * 4, False, True, torch.float16, 2, 32, 128),
    ("dot_slices_swap_xs", 16, 392, 40, 4, 128, True, False, torch.bfloat16, 3, 32, 128),
    ("dot_slices_swap_xs", 5, 260, 40, 8, 64, False, True, torch.float16, 2, 32, 64),
    ("gemv_rows", 3, 200, 24, 8, 32, True, True, torch.float16, 1, 32, 16),
    ("dot_slices", 3, 200, 40, 4, -1, False, True, torch.float16, 2, 32, 128),
    ("dot_slices", 16, 392, 40, 4, 128, True, False, torch.bfloat16, 3, 32, 128),
    ("dot_slices", 33, 260, 40, 8, 64, False, True, torch.float16, 2, 32, 64),
    ("dot_slices_swap", 1, 392, 40, 4, 128, False, True, torch.float16, 3, 32, 128),
    ("dot_slices_swap", 16, 256, 24, 4, 128, True, False, torch.bfloat16, 2, 16, 128),
    ("dot_slices_swap", 33, 196, 40, 8, -1, False, False, torch.float16, 1, 32, 64),
]

BLOCK_M = {"gemv": 1, "gemv_rows": 1}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:8])) + f"-{str(c[8])[6:]}")
def test_kernel_matches_reference(case):
    strategy, m, k, n, bits, group, sym, act_order, dtype, split, block_n, block_k = case
    t = random_gptq(k, n, bits, group, sym, act_order, seed=m * 7 + k + n)
    layout = prepare_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, k)
    assert layout is not None
    assert layout.symmetric == sym
    assert (layout.perm is not None) == (act_order and group != -1)  # one group needs no sorting
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    config = LaunchConfig(strategy, BLOCK_M.get(strategy, 16), block_n, block_k, split)
    out = launch(config, x, layout.qweight, t["qzeros"], t["scales"], layout.perm, bias, bits,
                 layout.group_size, k, layout.symmetric)
    ref = quant_linear_reference(x.double(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias.double(),
                                 bits, k)
    assert out.shape == (m, n) and out.dtype == dtype
    assert relative_error(out, ref) < TOLERANCE[dtype]


def test_split_k_is_deterministic_and_resets_its_counters():
    t = random_gptq(512, 40, 4, 64, False, False, seed=1)
    layout = prepare_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 512)
    x = torch.randn(2, 512, device=DEVICE).half()
    config = LaunchConfig("gemv", 1, 16, 64, 8)
    first = launch(config, x, layout.qweight, t["qzeros"], t["scales"], None, None, 4, layout.group_size, 512, False)
    second = launch(config, x, layout.qweight, t["qzeros"], t["scales"], None, None, 4, layout.group_size, 512, False)
    assert torch.equal(first, second)
    tickets = dispatch._TICKETS[(x.device.type, x.device.index)]
    assert int(tickets.abs().sum()) == 0


def test_layout_permutes_act_order_rows_and_rejects_unsupported():
    t = random_gptq(96, 16, 4, 32, True, True, seed=3)
    layout = prepare_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 96)
    codes = unpack(t["qweight"], 4, 96)
    assert torch.equal(unpack(layout.qweight, 4, 96), codes[layout.perm.long()])
    assert torch.equal(t["g_idx"][layout.perm.long()].long(), torch.arange(96, device=DEVICE) // 32)
    assert prepare_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 3, 96) is None
    ragged = t["g_idx"].clone()
    ragged[ragged == 1] = 0  # group 0 twice as long as the others: not a kernel layout
    assert prepare_kernel_layout(t["qweight"], t["qzeros"], t["scales"], ragged, 4, 96) is None


def _act_order_layer(backend, in_features=136, out_features=40):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    qw = rtn_quantize(linear.weight.detach(), QuantizationConfig(bits=4, group_size=32, sym=False, method="rtn"))
    perm = torch.randperm(in_features)
    qw.g_idx = qw.g_idx[perm].contiguous()  # a valid act-order g_idx (the codes stay consistent with it)
    layer = QuantLinear.from_quantized(linear, qw, kernel_backend=backend)
    return layer.to(DEVICE)


def test_quant_linear_triton_backend_matches_torch_backend_with_act_order():
    layer = _act_order_layer("triton").half()
    x = torch.randn(3, 5, 136, device=DEVICE).half()
    fast = layer(x)
    layer.kernel_backend = "torch"
    ref = layer(x)
    assert fast.shape == (3, 5, 40)
    assert relative_error(fast, ref.double()) < 3e-3
    assert not any(name.startswith("kernel_") for name in layer.state_dict())


def test_prepared_layer_survives_state_dict_round_trip():
    layer = _act_order_layer("triton").half()
    layer.prepare_kernels()
    assert layer._kernel_layout and "kernel_qweight" in dict(layer.named_buffers())
    state = layer.state_dict()
    assert "kernel_qweight" not in state
    layer.load_state_dict(state)
    assert layer._kernel_layout is None and "kernel_qweight" not in dict(layer.named_buffers())
    x = torch.randn(2, 136, device=DEVICE).half()
    expected = quant_linear_reference(x.double(), layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                                      layer.bias.double(), 4, 136)
    assert relative_error(layer(x), expected) < 3e-3


def test_custom_op_fake_implementation_and_compile():
    t = random_gptq(64, 24, 4, 32, False, True, seed=5, device="cpu")
    layout = prepare_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 64)
    args = (layout.qweight, t["qzeros"], t["scales"], layout.perm, None, 4, layout.group_size, 64,
            layout.symmetric, "torch")
    x = torch.randn(2, 3, 64).half()
    torch.library.opcheck(torch.ops.neural_quantization.gptq_matmul.default, (x, *args),
                          test_utils=("test_schema", "test_faketensor"))

    def f(inp):
        return torch.ops.neural_quantization.gptq_matmul(inp, *args) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    expected = quant_linear_reference(x.double(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, 4, 64)
    assert relative_error(compiled(x), 2 * expected) < 3e-3


def test_auto_backend_on_cpu_is_the_reference():
    t = random_gptq(64, 16, 4, 32, True, False, seed=6, device="cpu")
    x = torch.randn(2, 64)
    out = ops.quant_linear(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, 4, 64, "auto")
    ref = quant_linear_reference(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, 4, 64)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError):
        ops.quant_linear(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, 4, 64, "cuda-magic")


# ------------------------------------------------------------------------------------------- CUDA
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16, 33, 130])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,sym,act_order", [(128, True, False), (32, False, True), (-1, False, False)])
def test_cuda_auto_dispatch_matches_reference(m, dtype, group, sym, act_order, monkeypatch):
    monkeypatch.setenv("NQ_KERNEL_AUTOTUNE", "0")  # the heuristic choice; every candidate is tested below
    t = random_gptq(4096 + 136, 1032, 4, group, sym, act_order, seed=m)
    layout = prepare_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 4096 + 136)
    x = torch.randn(m, 4096 + 136, device="cuda").to(dtype)
    out = ops.quant_linear(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, 4, 4096 + 136, "auto",
                           layout=layout)
    ref = quant_linear_reference(x.double(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, 4, 4096 + 136)
    assert relative_error(out, ref) < TOLERANCE[dtype]


@cuda_only
@pytest.mark.gpu
def test_cuda_every_candidate_matches_reference():
    """Every configuration tuning may pick computes the same function (odd shape, asym, act-order)."""
    for m, bits in ((1, 4), (4, 4), (16, 8), (64, 4)):
        t = random_gptq(1160, 520, bits, 64, False, True, seed=m)
        layout = prepare_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 1160)
        x = torch.randn(m, 1160, device="cuda").half()
        ref = quant_linear_reference(x.double(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, bits, 1160)
        configs = dispatch.candidate_configs(m, 1160, 520, bits, 132, layout.group_size)
        kinds = {(c.strategy, c.block_m, c.num_warps, c.split_k > 1) for c in configs}
        # one configuration per (strategy, rows, warps, split or not), to bound compile time
        configs = [next(c for c in configs if (c.strategy, c.block_m, c.num_warps, c.split_k > 1) == kind)
                   for kind in sorted(kinds)]
        for config in configs:
            out = launch(config, x, layout.qweight, t["qzeros"], t["scales"], layout.perm, None, bits,
                         layout.group_size, 1160, layout.symmetric)
            assert relative_error(out, ref) < 3e-3, config


@cuda_only
@pytest.mark.gpu
def test_cuda_graph_capture_of_quant_linear():
    layer = _act_order_layer("auto").half()
    x = torch.randn(1, 136, device="cuda").half()
    eager = layer(x)  # first eager call prepares the layout and tunes
    assert layer._kernel_plan.direct_status == "direct"  # the lean launcher works with this Triton
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(static_out, layer.float()(static_x.float()).double() if False else
                          quant_linear_reference(static_x.double(), layer.qweight, layer.qzeros, layer.scales,
                                                 layer.g_idx, layer.bias.double(), 4, 136)) < 3e-3
    assert eager.shape == static_out.shape


@pytest.mark.parametrize(
    "bits,group,sym,act_order,static,block",
    [(4, 32, False, False, False, 128), (4, 128, True, True, False, 128), (3, -1, False, False, False, 64),
     (8, 64, True, True, True, 128), (4, 48, True, False, False, 96)],
)
def test_gptq_column_kernel_matches_torch_loop(bits, group, sym, act_order, static, block, monkeypatch):
    """The solver's fused column loop gives the codes of the torch loop (the reference)."""
    from neural_quantization.core import gptq
    from neural_quantization.core.gptq_columns import quantize_columns

    gen = torch.Generator().manual_seed(bits * 100 + block)
    weight = torch.randn(37, 200, generator=gen)
    x = torch.randn(600, 200, generator=gen) * torch.linspace(0.1, 3, 200)
    hessian = (2 * x.T @ x / x.shape[0])
    config = QuantizationConfig(bits=bits, group_size=group, sym=sym, desc_act=act_order,
                                static_groups=static, block_size=block)
    monkeypatch.setenv("NQ_GPTQ_COLUMN_KERNEL", "0")
    reference = gptq.gptq_quantize(weight.to(DEVICE), hessian.to(DEVICE), config)
    if HAS_CUDA:
        monkeypatch.setenv("NQ_GPTQ_COLUMN_KERNEL", "1")
    else:  # force the kernel (in the interpreter) on CPU tensors
        monkeypatch.setattr(gptq, "_column_solver",
                            lambda w, size, groups, _: (quantize_columns, groups.to(torch.int32)))
    fused = gptq.gptq_quantize(weight.to(DEVICE), hessian.to(DEVICE), config)
    # Same arithmetic; a GPU may contract w - e·u into one fused multiply-add, which can move a
    # value sitting exactly on a rounding boundary, so allow a handful of differing codes there.
    same = (fused.codes == reference.codes).float().mean().item()
    assert same == 1.0 if not HAS_CUDA else same > 0.995
    assert torch.equal(fused.g_idx, reference.g_idx)
    assert fused.loss == pytest.approx(reference.loss, rel=1e-3)


# ------------------------------------------------------------------------ CUDA C++ GEMV (cuda_gemv)
def test_cuda_gemv_candidates_and_cpu_guard():
    """The CUDA GEMV's candidate list is plain Python; without CUDA nothing is built or offered."""
    from neural_quantization.kernels.cuda import gemv as cuda_gemv

    configs = dispatch.cuda_gemv_configs(1, 4096, 4096, 4, 128)
    assert configs and all(c.strategy == "cuda_gemv" and c.block_m == 1 for c in configs)
    assert len({(c.num_warps, c.split_k, c.variant) for c in configs}) == len(configs)
    for c in configs:
        assert c.split_k == cuda_gemv.splits(4096, c.num_warps, c.num_stages)
        assert cuda_gemv.shared_bytes(c.block_m, c.num_warps, c.num_stages, 8) <= cuda_gemv.MAX_SHARED_BYTES
        assert c.variant in (0, 1) and (c.variant == 0 or c.num_stages > 1)
    assert {c.block_m for c in dispatch.cuda_gemv_configs(2, 4096, 4096, 4, 128)} == {2}
    assert dispatch.cuda_gemv_configs(3, 4096, 4096, 4, 128) == []  # M > 2
    assert dispatch.cuda_gemv_configs(1, 4096, 4096, 8, 128) == []  # 8-bit
    assert dispatch.cuda_gemv_configs(1, 4096, 4096, 4, 48) == []  # group not a multiple of 32
    assert not any(c.strategy == "cuda_gemv" for c in dispatch.candidate_configs(1, 4096, 4096, 4, 132, 128))
    if not HAS_CUDA:
        assert not dispatch.cuda_gemv_ready("cuda") and not cuda_gemv.available()
        from neural_quantization.kernels.cuda import extension

        assert extension.can_build() is not None  # says why, without compiling anything


def _cuda_gemv_or_skip():
    from neural_quantization.kernels.cuda import gemv as cuda_gemv
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        pytest.skip("no nvcc: the CUDA GEMV cannot be built here")
    from neural_quantization.kernels.cuda import extension

    assert cuda_gemv.available(), extension.LOAD_ERROR
    return cuda_gemv


# (M, K, N, group_size, sym, act_order, dtype, warps, units_per_warp, bias, prefetch)
CUDA_GEMV_CASES = [
    (1, 200, 40, 32, False, False, torch.float16, 4, 1, True, 0),
    (1, 196, 24, 128, True, True, torch.bfloat16, 2, 1, False, 0),
    (1, 1160, 520, 64, False, True, torch.float16, 4, 2, True, 1),
    (2, 1160, 520, 64, True, False, torch.bfloat16, 8, 1, False, 0),
    (2, 4232, 1032, -1, False, False, torch.float16, 4, 4, True, 1),
    (1, 4232, 1032, 32, True, True, torch.float16, 8, 2, False, 0),
    (2, 4232, 1032, 32, False, True, torch.bfloat16, 2, 3, True, 1),
    (1, 4096, 1024, 128, True, False, torch.bfloat16, 4, 16, True, 1),  # one block along K
    (1, 520, 136, 128, False, False, torch.float16, 1, 1, False, 0),  # 128-column tile with a tail
]


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_GEMV_CASES, ids=lambda c: "-".join(map(str, c[:6])) + f"-{str(c[6])[6:]}")
def test_cuda_gemv_matches_reference(case):
    m, k, n, group, sym, act_order, dtype, warps, upw, with_bias, prefetch = case
    cuda_gemv = _cuda_gemv_or_skip()
    t = random_gptq(k, n, 4, group, sym, act_order, seed=m * 13 + k + n)
    layout = prepare_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, k)
    # activations as a strided view (row stride > K) to exercise stride_xm
    x = torch.randn(m, k + 24, device="cuda").to(dtype)[:, 5:5 + k]
    bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
    block_m = cuda_gemv.block_m_for(m)
    config = LaunchConfig("cuda_gemv", block_m, 128, 64, cuda_gemv.splits(k, warps, upw), warps, upw, prefetch)
    ref = quant_linear_reference(x.double(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"],
                                 None if bias is None else bias.double(), 4, k)
    for _ in range(2):  # the second launch reuses the split-K counters the first reset
        out = launch(config, x, layout.qweight, t["qzeros"], t["scales"], layout.perm, bias, 4,
                     layout.group_size, k, layout.symmetric)
        assert out.shape == (m, n) and out.dtype == dtype
        assert relative_error(out, ref) < TOLERANCE[dtype]
        worst = float(((out.double() - ref).abs() / (ref.abs().mean() + 1e-6)).max())
        assert worst < 30 * TOLERANCE[dtype]  # no stray element (each one was written)
    tickets = dispatch._TICKETS.get(("cuda", x.device.index))
    assert tickets is None or int(tickets.abs().sum()) == 0


@cuda_only
@pytest.mark.gpu
def test_cuda_gemv_deterministic_in_graph_and_tuned():
    cuda_gemv = _cuda_gemv_or_skip()
    k, n = 2048 + 72, 776
    t = random_gptq(k, n, 4, 128, False, True, seed=11)
    layout = prepare_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, k)
    args = (layout.qweight, t["qzeros"], t["scales"], layout.perm, None, 4, layout.group_size, k, layout.symmetric)
    config = LaunchConfig("cuda_gemv", 1, 128, 64, cuda_gemv.splits(k, 4, 2), 4, 2, 1)
    x = torch.randn(1, k, device="cuda").half()
    first = launch(config, x, *args)
    assert torch.equal(first, launch(config, x, *args))  # fixed reduction order
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = launch(config, static_x, *args)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = quant_linear_reference(static_x.double(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, 4, k)
    assert relative_error(static_out, ref) < 3e-3
    # the tuner times the CUDA candidates with the others
    configs = dispatch.candidate_configs(1, k, n, 4, 132, layout.group_size, cuda_kernels=True)
    assert any(c.strategy == "cuda_gemv" for c in configs)
    dispatch.tune(x, *args)
    assert any(name.startswith("cuda_gemv") for name in dispatch.TUNING_LOG[-1]["timings_us"])


# ---------------------------------------------------------------------------------------------
# the tensor-core CUDA kernel (kernels/cuda/mma_int4.cuh) on the kernel-order GPTQ tensors
def _emulate_mma_kernel(x, qweight, qzeros, scales, symmetric, group, variant):
    """What mma_int4.cuh computes, lane by lane, in float64, written from the kernel's code: each lane
    loads the words of its 2·NT columns in its two packed rows of a chunk and the scales / stored
    zeros of its group (zeros as the kernel shifts them out of the packed word), decodes its A
    fragments with the kernel's nibble → register map (step p, registers 0/1: nibbles 2p, 2p+4 of
    the words of columns 2i / 2i+1; registers 2/3: nibbles 2p+1, 2p+5), builds its B fragments the
    way the byte permutes do (b0 = x[2p], x[2p+4]; b1 = x[2p+1], x[2p+5] of the row's 8
    positions), places both where PTX's m16n8k16 puts them, and sums the instruction's product.
    Checks the fragment map and the GPTQ indexing without a GPU."""
    from neural_quantization.kernels.cuda import mma

    M, K = x.shape
    N = scales.shape[1]
    nt = mma.VARIANTS[variant][0]
    tile_n = mma.tile_n(variant)
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    zero_words = qzeros.to(torch.int64) & 0xFFFFFFFF
    s_all = scales.double()
    out = torch.zeros(M, mma.tiles(variant, N) * tile_n, dtype=torch.float64)
    xp = torch.zeros(M, -(-K // mma.CHUNK_K) * mma.CHUNK_K, dtype=torch.float64)
    xp[:, :K] = x  # the kernel loads zeros past K
    for tile in range(mma.tiles(variant, N)):
        for c in range(-(-K // mma.CHUNK_K)):
            A = torch.zeros(nt, 2, 2, 16, 16, dtype=torch.float64)  # m-tile, packed row h, step, A
            B = torch.zeros(2, 2, 16, 8, dtype=torch.float64)  # packed row h, step, B
            for lane in range(32):
                g, t = lane // 4, lane % 4
                col_out = tile * tile_n + 2 * nt * g
                col0 = col_out if col_out < N else 0  # lanes past N read column 0; those outputs are not stored
                group_index = min((c * mma.CHUNK_K + 16 * t) // group, s_all.shape[0] - 1)
                packed_zeros = int(zero_words[group_index, col0 // 8]) >> (4 * (col0 % 8))
                for h in range(2):
                    row = 8 * c + 2 * t + h
                    base = mma.CHUNK_K * c + 16 * t + 8 * h  # the row's first position
                    m = g if g < M else 0  # rows past M read row 0; those outputs are not stored
                    for p in range(2):
                        B[h, p, 2 * t, g], B[h, p, 2 * t + 1, g] = xp[m, base + 2 * p], xp[m, base + 2 * p + 4]
                        B[h, p, 2 * t + 8, g] = xp[m, base + 2 * p + 1]
                        B[h, p, 2 * t + 9, g] = xp[m, base + 2 * p + 5]
                    for i in range(nt):
                        cols = (col0 + 2 * i, col0 + 2 * i + 1)
                        s = [float(s_all[group_index, col]) for col in cols]
                        z = [8.0 if symmetric else float(((packed_zeros >> (8 * i + 4 * r)) & 0xF) + 1) for r in (0, 1)]
                        w = [int(words[row, col]) if row < K // 8 else 0 for col in cols]
                        for p in range(2):
                            # registers a0..a3: (row g | g+8) x (slots 2t, 2t+1 | 2t+8, 2t+9)
                            for r in range(4):
                                a_row = g + 8 * (r % 2)
                                slot = 2 * t + 8 * (r // 2)
                                for j, nibble in enumerate((2 * p + r // 2, 2 * p + r // 2 + 4)):
                                    code = (w[r % 2] >> (4 * nibble)) & 0xF
                                    A[i, h, p, a_row, slot + j] = (code - z[r % 2]) * s[r % 2]
            for i in range(nt):
                C = sum(A[i, h, p] @ B[h, p] for h in range(2) for p in range(2))  # (16 A rows, 8 B columns)
                for a_row in range(16):
                    col = tile * tile_n + 2 * nt * (a_row % 8) + 2 * i + a_row // 8
                    out[:, col] += C[a_row, :M]
    return out[:, :N]


@pytest.mark.parametrize("k,n,group,sym,variant", [(208, 40, 16, False, 0), (192, 24, 64, True, 3),
                                                   (200, 44, -1, False, 4), (128, 18, 32, True, 1)])
def test_mma_fragment_map_is_the_gptq_layout(k, n, group, sym, variant):
    from neural_quantization.kernels.cuda import mma

    t = random_gptq(k, n, 4, group, sym, False, seed=k + n, device="cpu")
    layout = prepare_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, k)
    assert layout.symmetric == sym and mma.variant_supports(variant, n)
    x = torch.randn(3, k, dtype=torch.float64)
    ref = quant_linear_reference(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, 4, k)
    got = _emulate_mma_kernel(x, layout.qweight, t["qzeros"], t["scales"], sym,
                              mma.group_length(layout.group_size, k), variant)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9)


def test_mma_shapes_and_candidates():
    from neural_quantization.kernels.cuda import mma

    assert [mma.block_m_for(m) for m in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, None]
    assert mma.group_length(128, 4096) == 128 and mma.group_length(-1, 1040) == 1088
    assert mma.group_length(48, 4096) is None  # groups must be powers of two (or one group)
    assert mma.supports(16, 4096, 4096, 4, 128) and not mma.supports(17, 4096, 4096, 4, 128)
    assert mma.supports(1, 4104, 4096, 4, 128) and not mma.supports(1, 4100, 4096, 4, 128)
    assert not mma.supports(1, 4096, 4096, 8, 128) and not mma.supports(1, 4096, 4095, 4, 128)
    assert not mma.supports(1, 4096, 4096, 4, 128, torch.float32)
    configs = dispatch.candidate_configs(4, 4096, 4096, 4, 132, 128, cuda_mma=True)
    mine = [c for c in configs if c.strategy == "cuda_mma"]
    assert mine and all(c.block_m == 8 and 0 <= c.variant < len(mma.VARIANTS) for c in mine)
    assert {c.block_n for c in mine} == {16, 32} and {c.variant for c in mine} == set(range(len(mma.VARIANTS)))
    assert not any(c.strategy == "cuda_mma" for c in dispatch.candidate_configs(4, 4096, 4096, 4, 132, 128))
    # variants with 32 columns per warp need N % 4 == 0
    assert all(c.block_n == 16 for c in dispatch.cuda_mma_configs(1, 4096, 4098, 4, 128, 132))
    # narrow layers may split along K, wide ones never
    assert any(c.split_k > 1 for c in dispatch.cuda_mma_configs(1, 4096, 512, 4, 128, 132))
    assert all(c.split_k == 1 for c in dispatch.cuda_mma_configs(1, 4096, 28672, 4, 128, 132))
    default = dispatch.default_config(1, 4096, 4096, 4, 132, 128, cuda_mma=True)
    assert default.strategy == "cuda_mma" and default.variant == 1 and default.split_k == 1
    # the untuned rule reproduces the H100's tuned choices on the shapes they were read from
    # (benchmarks/results/tuning_defaults_h100.json): down projections split, wide ones 4 warps
    assert mma.default_launch(14336, 4096, 132) == (3, 3, 8)
    assert mma.default_launch(8960, 1536, 132) == (3, 8, 8)
    assert mma.default_launch(4096, 28672, 132) == (3, 1, 4)
    assert mma.default_launch(4096, 6144, 132) == (3, 1, 8)
    assert mma.default_launch(2048, 512, 132) == (1, 1, 8)
    assert dispatch.default_config(1, 4096, 4098, 4, 132, 128, cuda_mma=True).block_n == 16  # N % 4 == 2


def _cuda_mma_or_skip():
    from torch.utils import cpp_extension

    from neural_quantization.kernels.cuda import extension, mma

    if cpp_extension.CUDA_HOME is None:
        pytest.skip("no nvcc: the CUDA kernels cannot be built here")
    if not mma.device_supported(torch.device("cuda")):
        pytest.skip("the tensor-core kernel needs compute capability 8.0")
    assert extension.available(), extension.LOAD_ERROR
    return mma


# (M, K, N, group_size, sym, act_order, dtype, warps, variant, splits, bias)
CUDA_MMA_CASES = [
    (1, 208, 40, 16, False, False, torch.float16, 4, 0, 1, True),
    (3, 192, 24, 64, True, False, torch.bfloat16, 2, 1, 2, False),
    (5, 1024, 72, 128, False, True, torch.float16, 4, 2, 4, False),
    (8, 1040, 100, -1, True, False, torch.float16, 8, 3, 1, True),
    (9, 4096, 520, 128, False, False, torch.bfloat16, 8, 4, 3, True),
    (16, 512, 512, 32, False, True, torch.bfloat16, 8, 5, 2, True),
    (16, 4096, 1032, 128, True, False, torch.float16, 8, 2, 1, False),
    (2, 2048, 264, 256, True, True, torch.float16, 1, 6, 8, False),
    (12, 200, 42, -1, False, False, torch.float16, 4, 1, 1, True),
    (4, 4096, 4096, 128, True, False, torch.bfloat16, 8, 4, 2, False),
]


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_MMA_CASES, ids=lambda c: "-".join(map(str, c[:6])) + f"-{str(c[6])[6:]}")
def test_cuda_mma_matches_reference(case):
    m, k, n, group, sym, act_order, dtype, warps, variant, splits, with_bias = case
    mma = _cuda_mma_or_skip()
    t = random_gptq(k, n, 4, group, sym, act_order, seed=m * 7 + k + n)
    layout = prepare_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, k)
    x = torch.randn(m, k + 24, device="cuda").to(dtype)[:, 8:8 + k]  # strided rows
    bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
    config = dispatch._cuda_mma_config(mma.block_m_for(m), variant, splits, warps)
    ref = quant_linear_reference(x.double(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"],
                                 None if bias is None else bias.double(), 4, k)
    outs = []
    for pdl in ("0", "1"):
        os.environ["NQ_PDL"] = pdl
        try:
            for _ in range(2):  # the second launch reuses the split-K counters the first reset
                out = launch(config, x, layout.qweight, t["qzeros"], t["scales"], layout.perm, bias, 4,
                             layout.group_size, k, layout.symmetric)
                assert out.shape == (m, n) and out.dtype == dtype
                assert relative_error(out, ref) < TOLERANCE[dtype]
                worst = float(((out.double() - ref).abs() / (ref.abs().mean() + 1e-6)).max())
                assert worst < 30 * TOLERANCE[dtype]  # no stray element
                outs.append(out)
        finally:
            os.environ.pop("NQ_PDL", None)
    assert all(torch.equal(outs[0], o) for o in outs[1:])  # deterministic, with and without PDL
    tickets = dispatch._TICKETS.get(("cuda", x.device.index))
    assert tickets is None or int(tickets.abs().sum()) == 0


@cuda_only
@pytest.mark.gpu
def test_quant_linear_uses_the_tensor_core_kernel_in_graphs_and_compile():
    _cuda_mma_or_skip()
    k, n = 1024, 264
    t = random_gptq(k, n, 4, 128, False, True, seed=5)
    layer = QuantLinear(k, n, bits=4, group_size=128, bias=True).cuda()
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(layer, name).copy_(t[name].to(getattr(layer, name).dtype))
    layer.bias.copy_(torch.randn(n).half())
    x = torch.randn(4, k, device="cuda").half()
    ref = quant_linear_reference(x.double(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"],
                                 layer.bias.double(), 4, k)
    eager = layer(x)  # prepares the layout and tunes M bucket 4 (the tensor-core kernel is a candidate)
    # the kernel reads the checkpoint's tensors: no copy beyond act-order's sorted qweight
    assert {name for name, _ in layer.named_buffers()} <= {"qweight", "qzeros", "scales", "g_idx", "bias",
                                                           "kernel_qweight", "kernel_perm"}
    assert any(name.startswith("cuda_mma") for name in dispatch.TUNING_LOG[-1]["timings_us"])
    assert relative_error(eager, ref) < TOLERANCE[torch.float16]
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    compiled = torch.compile(layer, fullgraph=True)
    assert relative_error(compiled(x), ref) < TOLERANCE[torch.float16]
    # the kernel layout is not part of the checkpoint
    assert not any(name.startswith("kernel_") for name in layer.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else []))
@pytest.mark.parametrize("batch,heads,kv_heads,length,head_dim", [(2, 8, 2, 37, 64), (1, 4, 4, 300, 32),
                                                                  (3, 6, 1, 129, 16), (1, 32, 8, 1000, 128)])
def test_decode_attention_matches_reference(dtype, batch, heads, kv_heads, length, head_dim):
    """The grouped-query decode-attention kernel against the fp32 reference: holes in the mask (left
    padding), a row whose second half is masked (a static cache's unwritten tail), G = 1, 3, 4."""
    from neural_quantization.kernels.attention import decode_attention
    from neural_quantization.kernels.reference import decode_attention_reference

    if not HAS_CUDA and length > 300:
        pytest.skip("long caches only on the GPU (the interpreter is slow)")
    g = torch.Generator().manual_seed(length)
    q = torch.randn(batch, heads, head_dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=g).to(DEVICE, dtype)
    mask = torch.rand(batch, length, generator=g) > 0.3
    mask[:, 0] = True
    mask[0, length // 2:] = False
    mask = mask.to(DEVICE)
    out = decode_attention(q, k, v, mask, head_dim ** -0.5)
    ref = decode_attention_reference(q.float(), k.float(), v.float(), mask, head_dim ** -0.5)
    tolerance = {torch.float32: 1e-4 if not HAS_CUDA else 5e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - ref).abs().max().item() < tolerance
