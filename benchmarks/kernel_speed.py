"""Kernel benchmark (BENCHMARKS.md speed protocol): writes benchmarks/results/kernels_<gpu>.json.

    PYTHONPATH=src python benchmarks/kernel_speed.py --output benchmarks/results/kernels_h100.json

(Not ``kernels.py``: run from this folder, that name hid the ``kernels`` package transformers imports.)
All options: ``--help`` (the same as ``neural-quantize bench``); the logic lives in
``neural_quantization.bench.kernels`` so the CLI and this script measure the same thing.
"""

import sys

from neural_quantization.bench.kernels import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
