"""Calibration data: read per-language text, draw balanced token windows, or let the model write its own.

texts = load_language_texts("../data/", ["en", "fr"])          # {lang: [lines]}
calib = sample_calibration(texts, tokenizer, 128, 512, seed=0)  # input_ids (128, 512)
calib = self_generated_calibration(model, tokenizer, ["en", "fr"], 16, 256, seed=0)
"""

from neural_quantization.calibration.sampling import (
    CalibrationSet,
    calibration_from_source,
    sample_calibration,
    samples_per_language,
)
from neural_quantization.calibration.self_generated import (
    PROMPTS,
    generate_calibration_texts,
    self_generated_calibration,
)
from neural_quantization.calibration.sources import CalibrationDataError, load_language_texts
from neural_quantization.config import DEFAULT_LANGUAGES

__all__ = [
    "DEFAULT_LANGUAGES",
    "PROMPTS",
    "CalibrationDataError",
    "CalibrationSet",
    "calibration_from_source",
    "generate_calibration_texts",
    "load_language_texts",
    "sample_calibration",
    "samples_per_language",
    "self_generated_calibration",
]
