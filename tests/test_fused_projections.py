"""Fused projections (nn/fused_projections.py): same outputs, same checkpoint, weights stored once."""

import copy

import pytest
import torch

from neural_quantization import QuantizationConfig, QuantLinear, Quantizer, fuse_projections, load_quantized
from conftest import tiny_model, tiny_tokens as tokens


@pytest.fixture(scope="module")
def quantized_mistral():
    """A tiny Mistral quantized with act-order (the members of a group share one g_idx)."""
    config = QuantizationConfig(bits=4, group_size=32, calibration_batch_size=4, desc_act=True)
    model, _ = Quantizer(config).quantize_model(tiny_model("mistral"), tokens())
    return model


def _storages(model):
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}


def test_fused_model_gives_the_same_logits_and_checkpoint(quantized_mistral, tmp_path):
    model = copy.deepcopy(quantized_mistral)
    ids = tokens(2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    bytes_before = sum(_storages(model).values())
    with torch.no_grad():
        expected = model(ids).logits
    groups = fuse_projections(model)
    assert groups == [group for i in range(2) for group in (
        [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"],
        [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")],
    )]  # o_proj and down_proj read inputs of their own
    # the checkpoint is unchanged, and the fused tensors replace the members' (weights stored once)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    assert sum(_storages(model).values()) <= bytes_before
    q = model.get_submodule(groups[0][0])
    k = model.get_submodule(groups[0][1])
    assert q.qweight.untyped_storage().data_ptr() == k.qweight.untyped_storage().data_ptr()
    assert "_dense_cache" not in q.__dict__  # the probe's CPU dense weights are not kept
    assert fuse_projections(model) == []  # already fused: nothing more to do
    with torch.no_grad():
        fused = model(ids).logits
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "ckpt")  # the views are saved as the members' own tensors
    with torch.no_grad():
        reloaded = load_quantized(tmp_path / "ckpt", dtype=torch.float32)(ids).logits
    assert torch.equal(reloaded, expected)


def test_members_share_one_product_per_input_and_recompute_for_another(quantized_mistral):
    model = copy.deepcopy(quantized_mistral)
    attention = model.model.layers[0].self_attn
    reference = {p: copy.deepcopy(getattr(attention, f"{p}_proj")) for p in "qkv"}
    fuse_projections(model)
    group = attention.q_proj._shared_input[0]
    calls = []
    original = group.fused.forward
    group.fused.forward = lambda x: calls.append(x) or original(x)
    x = torch.randn(3, 64)
    with torch.no_grad():
        outs = {p: getattr(attention, f"{p}_proj")(x) for p in "qkv"}
        assert len(calls) == 1  # one matmul for three projections
        for p in "qkv":
            torch.testing.assert_close(outs[p], reference[p](x), rtol=1e-5, atol=1e-5)
        other = torch.randn(2, 64)  # a member alone, with another input: its columns of a new product
        torch.testing.assert_close(attention.k_proj(other), reference["k"](other), rtol=1e-5, atol=1e-5)
        attention.q_proj(x)
        x.mul_(2)  # modified in place between two members: recomputed, not served stale
        torch.testing.assert_close(attention.k_proj(x), reference["k"](x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 4


def test_fused_projections_compile_to_one_matmul_per_group(quantized_mistral):
    model = copy.deepcopy(quantized_mistral)
    ids = tokens(2)
    with torch.no_grad():
        expected = model(ids).logits
    fuse_projections(model)
    linears = []

    def count_linears(graph_module, example_inputs):
        linears.append(sum(1 for node in graph_module.graph.nodes
                           if node.op == "call_function" and "linear" in str(node.target)))
        return graph_module

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=count_linears, fullgraph=True)(ids)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
    torch._dynamo.reset()
    assert linears == [2 * 4 + 1]  # per block q|k|v, o, gate|up, down; plus lm_head (7 · 2 + 1 unfused)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)


def test_replaced_buffers_dissolve_the_group(quantized_mistral):
    model = copy.deepcopy(quantized_mistral)
    ids = tokens(2)
    with torch.no_grad():
        expected = copy.deepcopy(model).float()(ids).logits
    fuse_projections(model)
    model.float()  # scales become new fp32 tensors: the members no longer hold the fused views
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert all(m._shared_input is None for m in model.modules() if isinstance(m, QuantLinear))
    assert all(m.qweight.is_contiguous() for m in model.modules() if isinstance(m, QuantLinear))


def test_models_with_fused_checkpoint_layers_have_nothing_to_fuse():
    config = QuantizationConfig(bits=4, group_size=32, calibration_batch_size=4)
    model, _ = Quantizer(config).quantize_model(tiny_model("phi3"), tokens())  # qkv_proj, gate_up_proj
    assert fuse_projections(model) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_projections_on_cuda_eager_graph_and_compile(quantized_mistral):
    model = copy.deepcopy(quantized_mistral).half().cuda()  # move first: moving replaces the buffers
    ids = tokens(1, 6).cuda()
    with torch.no_grad():
        expected = model(ids).logits.float()  # unfused, our kernels
        assert fuse_projections(model)
        eager = model(ids).logits

        def close(out):
            return float((out.float() - expected).norm() / expected.norm()) < 3e-3

        assert close(eager)
        # the sharing protocol inside a CUDA graph capture (at the projections: the whole model's
        # forward is not capture-safe without a static cache)
        mlp = model.model.layers[1].mlp
        x = torch.randn(2, 64, device="cuda").half()

        def projections():
            return mlp.gate_proj(x) * mlp.up_proj(x)

        outside = projections()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            projections()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = projections()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, outside)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)(ids).logits
        torch._dynamo.reset()
        assert close(compiled)


def test_projections_with_bias_fuse_their_biases():
    config = QuantizationConfig(bits=4, group_size=32, calibration_batch_size=4, sym=False)
    model, _ = Quantizer(config).quantize_model(tiny_model("qwen2"), tokens())  # q/k/v carry biases
    ids = tokens(2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        expected = model(ids).logits
    groups = fuse_projections(model)
    assert [name.rpartition(".")[2] for name in groups[0]] == ["q_proj", "k_proj", "v_proj"]
    q = model.get_submodule(groups[0][0])
    assert q.bias is not None and q.bias.untyped_storage().data_ptr() == q._shared_input[0].fused.bias.data_ptr()
    after = model.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
