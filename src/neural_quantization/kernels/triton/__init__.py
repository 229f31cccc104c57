"""Triton kernels for GPTQ-packed int4/int8 weights with fp16/bf16 activations.

One file per launch strategy (``gemv_splitk``, ``dot_splitk``, ``dequant_matmul``), shared pieces in
``common``, the load-time layout in ``layout`` and launching, tuning and caching in ``dispatch``.
Importing this package needs ``triton``; ``available()`` says whether the kernels can run here
(a CUDA device, or the Triton interpreter with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")


def available(device_type: str = "cuda") -> bool:
    """True where Triton is importable and can run on ``device_type`` tensors."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device_type == "cuda":
        import torch

        return torch.cuda.is_available()
    return interpreting()
