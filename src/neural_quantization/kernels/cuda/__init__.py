"""CUDA C++ kernels built on first use with torch's extension loader (``gemv.py``).

Nothing here compiles or imports a compiler at import time: :func:`gemv.available` builds the
extension lazily, and only where a CUDA device and ``nvcc`` are present.
"""
