"""The GGUF export of a quantized denoiser, loaded by diffusers' own GGUF loader
(``<Class>.from_single_file(..., quantization_config=GGUFQuantizationConfig(...))``), offline on
tiny random pipelines: a StableDiffusion UNet and a FLUX.1-shaped DiT (CPU)."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("gguf")

from diffusers import GGUFQuantizationConfig  # noqa: E402
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor  # noqa: E402

from neural_quantization.cli import main  # noqa: E402
from neural_quantization.diffusion import (  # noqa: E402
    diffusion_config,
    export_gguf,
    load_quantized_pipeline,
    quantize_pipeline,
    save_quantized_pipeline,
)
from neural_quantization.diffusion.quality import record_denoiser_calls  # noqa: E402
from neural_quantization.diffusion.tiny import TINY_RESOLUTION, tiny_pipeline  # noqa: E402
from neural_quantization.export.diffusers_gguf import check_denoiser  # noqa: E402
from neural_quantization.export.gguf import GGUFExportError  # noqa: E402
from neural_quantization.nn.qlinear import QuantLinear  # noqa: E402

SIZE = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
CALIBRATION = ["a red fox sitting in fresh snow", "a bowl of ramen with an egg"]
STEPS = 3
GGUF_TYPES = {4: "Q4_0", 8: "Q8_0"}


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_with_diffusers(file, directory, denoiser_cls, subfolder):
    """diffusers' own GGUF path, offline: the config from our saved pipeline directory."""
    return denoiser_cls.from_single_file(str(file), config=str(directory), subfolder=subfolder, local_files_only=True,
                                         quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))


@pytest.fixture(scope="module", params=[("tiny-unet", 4), ("tiny-flux", 4), ("tiny-flux", 8)],
                ids=["unet-Q4_0", "flux-Q4_0", "flux-Q8_0"])
def exported(request, tmp_path_factory):
    """A tiny pipeline, GPTQ-quantized (group 32, symmetric), saved by us, its denoiser exported to
    GGUF from the saved directory and loaded back by diffusers and by our loader."""
    name, bits = request.param
    directory = tmp_path_factory.mktemp(f"{name}-{bits}") / "pipe"
    float_pipe = _quiet(tiny_pipeline(name))
    pipe = copy.deepcopy(float_pipe)
    summary = quantize_pipeline(pipe, diffusion_config(bits, 32), CALIBRATION, steps=STEPS, **SIZE)
    save_quantized_pipeline(pipe, directory, summary.record())
    file = directory / f"{summary.denoiser}-{GGUF_TYPES[bits]}.gguf"
    report = export_gguf(directory, file)
    ours = getattr(load_quantized_pipeline(directory), summary.denoiser)
    theirs = _load_with_diffusers(file, directory, type(ours), summary.denoiser)
    calls = record_denoiser_calls(float_pipe, ["a lighthouse on a cliff"], STEPS, 5, 5.0, **SIZE)
    return {"bits": bits, "summary": summary, "file": file, "report": report, "ours": ours, "theirs": theirs,
            "calls": calls, "directory": directory}


def _unpack_blocks(param: GGUFParameter, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent decode of ggml's block_q4_0 / block_q8_0 bytes (N, K/32 · bytes) -> (codes (N, K), d (N, K/32))."""
    raw = param.as_tensor().view(torch.uint8)
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 18 if bits == 4 else 34)
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)
    if bits == 4:
        packed = blocks[..., 2:].to(torch.int32)
        codes = torch.cat([packed & 15, packed >> 4], dim=-1)  # byte i: v[i] low nibble, v[i + 16] high
    else:
        codes = blocks[..., 2:].contiguous().view(torch.int8).to(torch.int32) + 128
    return codes.reshape(n, -1), d


def test_diffusers_keeps_every_quantized_linear_as_gguf_blocks_holding_our_gptq_codes(exported):
    ours, theirs, bits, report = exported["ours"], exported["theirs"], exported["bits"], exported["report"]
    quantized = {name: m for name, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == len(exported["summary"].layers) > 20
    gguf_linears = {name: m for name, m in theirs.named_modules() if isinstance(m, GGUFLinear)}
    assert gguf_linears.keys() == quantized.keys()  # every quantized linear, and only those
    clamped = 0
    for name, layer in quantized.items():
        weight = gguf_linears[name].weight
        assert isinstance(weight, GGUFParameter) and weight.quant_type.name == GGUF_TYPES[bits]
        assert tuple(weight.quant_shape) == (layer.out_features, layer.in_features)
        codes, d = _unpack_blocks(weight, bits)
        qw = layer.quantized_weight()
        assert torch.equal(d, qw.scales.T.to(torch.float16))  # (N, K/32): one GPTQ scale per block
        if bits == 4:
            assert torch.equal(codes, qw.codes.to(torch.int32))  # GPTQ's codes, bit for bit
        else:
            expected = qw.codes.to(torch.int32).clamp(min=1)  # v = q - 128, and -128 is written as -127
            assert torch.equal(codes, expected)
            clamped += int((qw.codes == 0).sum())
        # diffusers' own dequantization (fp16 d · v) = our weight of those codes rounded to fp16
        ours_fp16 = (qw.scales[qw.g_idx.long()].T.float() * (codes.float() - 2 ** (bits - 1))).half()
        assert torch.equal(dequantize_gguf_tensor(weight), ours_fp16)
        if bits == 4:
            assert torch.equal(ours_fp16, layer.dequantize_weight(torch.float16))
    assert report.clamped_codes == clamped and (bits == 4) == (clamped == 0)
    assert report.quantized_tensors == len(quantized) and not report.dequantized_on_load
    # nothing else was quantized or converted: every other tensor is diffusers' float32 copy of ours
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    others = [k for k in theirs_state if k.rpartition(".")[0] not in quantized or k.endswith(".bias")]
    assert len(others) == report.tensor_types["F32"] > 0
    for key in others:
        assert not isinstance(theirs_state[key], GGUFParameter) and theirs_state[key].dtype == torch.float32
        assert torch.equal(theirs_state[key], ours_state[key]), key


def test_diffusers_denoiser_gives_our_loaders_outputs(exported):
    """The GGUF denoiser diffusers loaded against ours (load_quantized_pipeline) on the float
    pipeline's recorded denoiser inputs (teacher-forced: every timestep's real inputs).

    The one numerical difference is where the weight is rounded: diffusers' ``dequantize_blocks_Q4_0``
    / ``_Q8_0`` multiply ``d · v`` in float16 (``fp16(d) · int``: the exact product rounded to fp16,
    relative error ≤ 2^-11 ≈ 4.9e-4 per weight), our CPU path in float32 (exact). So (1) with our
    weights rounded to fp16 the outputs agree to float32 summation order (≤ 1e-5 of the output's
    scale), and (2) as loaded, each call's relative L2 error is that rounding's: ≤ 1e-3 for Q4_0
    (measured 1.8e-4 UNet, 2.8e-4 FLUX). Q8_0 adds the codes -128 the export clamps to -127 (about
    1 % of the codes, each moved by one step d; in the fp16-rounded comparison they are applied to
    ours too): ≤ 5e-3 (measured 1.5e-3)."""
    ours, theirs, calls = exported["ours"], exported["theirs"], exported["calls"]
    rounded = copy.deepcopy(ours)
    for name, layer in list(rounded.named_modules()):
        if isinstance(layer, QuantLinear):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            linear.weight.data = layer.dequantize_weight(torch.float16).float()
            if layer.bias is not None:
                linear.bias.data = layer.bias.float()
            rounded.set_submodule(name, linear)
    if exported["bits"] == 8:  # our checkpoint keeps code 0 (v = -128); the file has -127 there
        for name, layer in ours.named_modules():
            if isinstance(layer, QuantLinear):
                qw = layer.quantized_weight()
                scale = qw.scales[qw.g_idx.long()].T.float()  # (N, K)
                fixed = (scale * (qw.codes.clamp(min=1).float() - 128)).half().float()
                rounded.get_submodule(name).weight.data = fixed
    worst_rounded, worst_relative, worst_abs = 0.0, 0.0, 0.0
    with torch.no_grad():
        for args, kwargs, _ in calls:
            mine = ours(*args, **kwargs)[0]
            rounded_out = rounded(*args, **kwargs)[0]
            gguf_out = theirs(*args, **kwargs)[0]
            scale = float(mine.abs().max())
            worst_rounded = max(worst_rounded, float((gguf_out - rounded_out).abs().max()) / scale)
            worst_relative = max(worst_relative, float((gguf_out - mine).norm() / mine.norm()))
            worst_abs = max(worst_abs, float((gguf_out - mine).abs().max()))
    print(f"{exported['file'].name}: {len(calls)} calls; vs ours with fp16-rounded weights {worst_rounded:.2e} "
          f"(max |Δ| / max |y|); vs ours as loaded: relative L2 {worst_relative:.2e}, max |Δ| {worst_abs:.2e}")
    assert len(calls) == STEPS  # one denoiser call per step (the UNet's guidance batches both halves)
    assert worst_rounded <= 1e-5
    assert worst_relative <= (1e-3 if exported["bits"] == 4 else 5e-3)


def test_the_gguf_file_records_the_run_and_the_denoiser(exported):
    import gguf

    reader = gguf.GGUFReader(str(exported["file"]))
    fields = {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    ours = exported["ours"]
    assert fields["general.architecture"] == "diffusers"
    assert fields["diffusers.class_name"] == type(ours).__name__
    assert json.loads(fields["diffusers.config"])["_class_name"] == type(ours).__name__
    assert fields["general.file_type"] == (2 if exported["bits"] == 4 else 7)  # MOSTLY_Q4_0 / MOSTLY_Q8_0
    record = json.loads(fields["neural_quantization.record"])
    assert record["bits"] == exported["bits"] and record["group_size"] == 32 and record["method"] == "gptq"
    assert set(record["modules"]) == {n for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert exported["report"].file_bytes == exported["file"].stat().st_size


def test_cli_writes_the_gguf_with_the_pipeline_and_diffusers_samples_with_it(tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\nein Hund am Strand\n")
    out = tmp_path / "flux-w4"
    assert main(["quantize-pipeline", "--pipeline", "tiny-flux", "--output-dir", str(out), "--group-size", "32",
                 "--steps", "2", "--prompts", str(prompts), "--gguf", str(out / "transformer-Q4_0.gguf")]) == 0
    record = json.loads((out / "transformer" / "quantization.json").read_text())
    transformer = _load_with_diffusers(out / "transformer-Q4_0.gguf", out, FluxTransformer2DModel, "transformer")
    assert sum(isinstance(m, GGUFLinear) for m in transformer.modules()) == len(record["modules"])
    pipe = _quiet(FluxPipeline.from_pretrained(str(out), transformer=transformer))
    images = pipe("a lighthouse", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                  **SIZE).images
    assert images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3) and np.isfinite(images).all()
    # outside the output directory: written after it, from the same in-memory pipeline
    assert main(["quantize-pipeline", "--pipeline", "tiny-unet", "--output-dir", str(tmp_path / "unet-w8"),
                 "--bits", "8", "--group-size", "32", "--steps", "1", "--prompts", str(prompts),
                 "--gguf", str(tmp_path / "unet-Q8_0.gguf")]) == 0
    assert (tmp_path / "unet-Q8_0.gguf").stat().st_size > 0 and (tmp_path / "unet-w8" / "unet").is_dir()


def test_bad_gguf_requests_exit_2_with_the_fix_before_any_work(tmp_path, capsys):
    def refused(*extra, pipeline="tiny-unet", gguf="x.gguf"):
        out = tmp_path / "out"
        code = main(["quantize-pipeline", "--pipeline", pipeline, "--output-dir", str(out), "--steps", "1",
                     "--gguf", str(tmp_path / gguf), *extra])
        assert code == 2 and not out.exists() and not (tmp_path / gguf).exists()
        return capsys.readouterr().err

    # PixArt: diffusers has no single-file loader for it, so its GGUF would not load
    err = refused("--group-size", "32", pipeline="tiny-dit")
    assert "PixArtTransformer2DModel" in err and "SINGLE_FILE_LOADABLE_CLASSES" in err
    assert "load_quantized_pipeline" in err and "FluxTransformer2DModel" in err
    assert "--group-size 32" in refused()  # the default group size 64 is not a GGUF block
    assert "--asym" in refused("--group-size", "32", "--asym")
    assert "--bits 4" in refused("--group-size", "32", "--bits", "3")
    assert "*.gguf" in refused("--group-size", "32", gguf="x.safetensors")
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    assert main(["quantize-pipeline", "--pipeline", "tiny-unet", "--output-dir", str(tmp_path / "out"),
                 "--group-size", "32", "--gguf", str(tmp_path / "taken.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "taken.gguf").read_bytes() == b"mine"

    # the Python API: an unquantized denoiser, linears that are not whole blocks of 32
    with pytest.raises(GGUFExportError, match="quantize it first"):
        export_gguf(tiny_pipeline("tiny-flux"), tmp_path / "float.gguf")
    from diffusers import FluxTransformer2DModel

    odd = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    with pytest.raises(GGUFExportError, match="--skip x_embedder"):
        check_denoiser(odd)
