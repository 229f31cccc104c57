"""CUDA C++ kernels built on first use with torch's extension loader (``extension.py``).

``gemv.py``: split-K GEMV for M ≤ 2 on the checkpoint's packed layout; ``mma.py``: tensor-core
kernel for M ≤ 16 on the same layout. Nothing here compiles or imports a compiler at
import time: :func:`extension.load` builds the extension lazily, and only where a CUDA device and
``nvcc`` are present.
"""
