"""Text-to-image pipelines (diffusers): GPTQ-calibrated quantization of the denoiser.

``quantize_pipeline(pipe, config, prompts)`` (``quantize.py``; ``calibrate_pipeline`` runs the
sampling pass once for several quantizations), calibration along sampling
trajectories (``calibration.py``), saving and loading, and the GGUF export that diffusers reads
(``pipeline.py``), image-quality measures (``quality.py``). Needs the ``diffusion`` extra (diffusers).
"""

from neural_quantization.diffusion.calibration import DEFAULT_PROMPTS, CalibrationError, read_prompts
from neural_quantization.diffusion.pipeline import (
    PipelineError,
    export_gguf,
    load_pipeline,
    load_quantized_pipeline,
    save_quantized_pipeline,
)
from neural_quantization.diffusion.quantize import (
    TrajectoryCalibration,
    calibrate_pipeline,
    diffusion_config,
    quantize_pipeline,
)

__all__ = ["DEFAULT_PROMPTS", "CalibrationError", "PipelineError", "TrajectoryCalibration", "calibrate_pipeline",
           "diffusion_config", "export_gguf", "load_pipeline",
           "load_quantized_pipeline", "quantize_pipeline", "read_prompts", "save_quantized_pipeline"]
