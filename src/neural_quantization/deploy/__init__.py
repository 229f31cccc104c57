"""Deployment planning: the memory a model needs (weights + KV cache + overhead) and where it fits."""

from neural_quantization.deploy.devices import DEVICES, Device
from neural_quantization.deploy.memory import (
    DeployError,
    MemoryReport,
    ModelShape,
    estimate_weight_bytes,
    kv_cache_bytes,
    memory_report,
)

__all__ = [
    "DEVICES",
    "DeployError",
    "Device",
    "MemoryReport",
    "ModelShape",
    "estimate_weight_bytes",
    "kv_cache_bytes",
    "memory_report",
]
