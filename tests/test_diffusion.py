"""Text-to-image pipelines (neural_quantization.diffusion): GPTQ on a denoiser calibrated along its
sampling trajectories, on tiny random UNet and DiT pipelines (CPU)."""

import copy
import json

import numpy as np
import torch
import pytest

pytest.importorskip("diffusers")

from neural_quantization.cli import main  # noqa: E402
from neural_quantization.diffusion import (  # noqa: E402
    CalibrationError,
    PipelineError,
    calibrate_pipeline,
    diffusion_config,
    load_quantized_pipeline,
    quantize_pipeline,
    read_prompts,
    save_quantized_pipeline,
)
from neural_quantization.diffusion.calibration import denoiser_linears  # noqa: E402
from neural_quantization.diffusion.quality import (  # noqa: E402
    evaluate_pipelines,
    psnr,
    record_denoiser_calls,
    sample_images,
    ssim,
    step_errors,
)
from neural_quantization.diffusion.run import EVAL_PROMPTS  # noqa: E402
from neural_quantization.diffusion.tiny import TINY_RESOLUTION, tiny_pipeline  # noqa: E402
from neural_quantization.nn.qlinear import QuantLinear  # noqa: E402

SIZE = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
STEPS = 6
PROMPTS = list(EVAL_PROMPTS[:2])


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["tiny-unet", "tiny-dit"])
def quantized(request):
    """The float pipeline and its RTN / GPTQ W4 and GPTQ W8 copies, with their reports."""
    reference = _quiet(tiny_pipeline(request.param))
    out = {"name": request.param, "float": reference}
    for label, bits, method in (("rtn4", 4, "rtn"), ("gptq4", 4, "gptq"), ("gptq8", 8, "gptq")):
        pipe = copy.deepcopy(reference)
        out[label] = (pipe, quantize_pipeline(pipe, diffusion_config(bits, 32, method), steps=STEPS, **SIZE))
    out["quality"], out["images"] = evaluate_pipelines(
        reference, {label: out[label][0] for label in ("rtn4", "gptq4", "gptq8")}, PROMPTS, STEPS, 7, 5.0, **SIZE)
    return out


def test_every_denoiser_linear_is_quantized_and_the_text_encoder_is_not(quantized):
    pipe, report = quantized["gptq4"]
    denoiser = getattr(pipe, report.denoiser)
    assert report.denoiser == ("unet" if quantized["name"] == "tiny-unet" else "transformer")
    assert not denoiser_linears(denoiser)  # no nn.Linear left
    assert len(report.layers) == sum(isinstance(m, QuantLinear) for m in denoiser.modules()) > 10
    assert not any(isinstance(m, QuantLinear) for m in pipe.text_encoder.modules())
    assert report.denoiser_calls == STEPS * 3  # 12 shipped prompts, 4 per sampling call, one call per step


def test_gptq_objective_is_below_rtn(quantized):
    _, report = quantized["gptq4"]
    assert sum(layer.loss for layer in report.layers) < 0.8 * sum(layer.rtn_loss for layer in report.layers)
    assert all(layer.loss <= layer.rtn_loss * 1.0001 for layer in report.layers)
    _, rtn_report = quantized["rtn4"]
    assert all(layer.loss == layer.rtn_loss for layer in rtn_report.layers)


def test_gptq_images_are_closer_to_float_than_rtn(quantized):
    quality = quantized["quality"]
    assert quality["gptq4"]["psnr_db"] > quality["rtn4"]["psnr_db"]
    assert quality["gptq4"]["ssim"] >= quality["rtn4"]["ssim"]
    assert quality["gptq4"]["mean_step_error"] < quality["rtn4"]["mean_step_error"]
    # W8: within a small stated error of the float images (tiny random models, 6 DDIM steps)
    assert quality["gptq8"]["psnr_db"] > 55 and quality["gptq8"]["mean_step_error"] < 0.005


def test_save_then_load_gives_identical_images(quantized, tmp_path):
    from diffusers import DiffusionPipeline

    pipe, report = quantized["gptq4"]
    save_quantized_pipeline(pipe, tmp_path / "pipe", report.record())
    record = json.loads((tmp_path / "pipe" / report.denoiser / "quantization.json").read_text())
    assert record["quant_method"] == "gptq" and len(record["modules"]) == len(report.layers)
    loaded = _quiet(load_quantized_pipeline(tmp_path / "pipe"))
    ours, theirs = getattr(loaded, report.denoiser), getattr(pipe, report.denoiser)
    assert sum(isinstance(m, QuantLinear) for m in ours.modules()) == len(report.layers)
    saved_state, loaded_state = theirs.state_dict(), ours.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert all(torch.equal(saved_state[k], loaded_state[k]) for k in saved_state)
    calls = record_denoiser_calls(pipe, PROMPTS, STEPS, 3, 5.0, **SIZE)
    assert step_errors(ours, calls) == [0.0] * len(calls)  # the loaded denoiser reproduces every step exactly
    # the whole pipeline: the same images as the in-memory denoiser with the other components as
    # diffusers loads them (a plain diffusers save/load of the VAE alone already moves pixels by ~1e-6)
    reference = _quiet(DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), **{report.denoiser: theirs}))
    expected = sample_images(reference, PROMPTS, STEPS, 3, 5.0, **SIZE)
    assert np.array_equal(sample_images(loaded, PROMPTS, STEPS, 3, 5.0, **SIZE), expected)


def test_one_calibration_pass_serves_several_quantizations(quantized):
    """GPTQ from a shared calibration pass (``calibrate_pipeline``) gives the tensors of GPTQ that
    samples its own (same prompts, steps and seeds): the Hessians depend only on the float pipeline."""
    reference = quantized["float"]
    calibration = calibrate_pipeline(reference, steps=STEPS, **SIZE)
    pipe = copy.deepcopy(reference)
    report = quantize_pipeline(pipe, diffusion_config(4, 32, "gptq"), calibration=calibration)
    own_pipe, own_report = quantized["gptq4"]
    assert report.denoiser_calls == own_report.denoiser_calls
    assert [layer.loss for layer in report.layers] == [layer.loss for layer in own_report.layers]
    own = dict(own_pipe.components[report.denoiser].state_dict())
    for key, value in pipe.components[report.denoiser].state_dict().items():
        assert torch.equal(value, own[key]), key
    with pytest.raises(ValueError, match="no Hessian"):
        calibration.hessians.pop(next(iter(calibration.hessians)))
        quantize_pipeline(copy.deepcopy(reference), diffusion_config(4, 32, "rtn"), calibration=calibration)


def test_image_measures():
    rng = np.random.default_rng(0)
    image = rng.random((2, 16, 16, 3))
    assert psnr(image, image) == float("inf") and ssim(image, image) == pytest.approx(1.0)
    noisy = np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1)
    assert 15 < psnr(image, noisy) < 25 and ssim(image, noisy) < ssim(image, (image + noisy) / 2)


def test_bad_input_is_refused_with_the_fix(tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(CalibrationError, match="one prompt per line"):
        read_prompts(empty)
    assert main(["quantize-pipeline", "--pipeline", "tiny-unet", "--output-dir", str(tmp_path / "out"),
                 "--prompts", str(empty)]) == 2
    assert "holds no prompt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    class NoDenoiser:
        components = {"vae": None}

    with pytest.raises(PipelineError, match="no denoiser"):
        quantize_pipeline(NoDenoiser())
    assert main(["quantize-pipeline", "--pipeline", str(tmp_path / "missing"), "--output-dir",
                 str(tmp_path / "out")]) == 2
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["quantize-pipeline", "--pipeline", "tiny-dit", "--output-dir", str(tmp_path / "taken")]) == 2
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_cli_quantizes_saves_and_reports(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\nein Hund am Strand\n")
    assert main(["quantize-pipeline", "--pipeline", "tiny-dit", "--output-dir", str(tmp_path / "pipe"), "--steps", "3",
                 "--prompts", str(prompts), "--skip", "adaln_single", "--report", str(tmp_path / "report")]) == 0
    record = json.loads((tmp_path / "pipe" / "transformer" / "quantization.json").read_text())
    assert record["calibration"]["prompts"] == 2 and not any("adaln_single" in name for name in record["modules"])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["quality"]) == {"RTN W4", "GPTQ W4"}
    assert (tmp_path / "report" / "images.png").stat().st_size > 0
