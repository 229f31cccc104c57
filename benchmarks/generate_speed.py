"""``generate`` benchmark on a GPU (fp16 vs our int4, and eager ``model.generate()``): writes
benchmarks/results/generate_<gpu>.json.

    PYTHONPATH=src python benchmarks/generate_speed.py --output benchmarks/results/generate_h200.json

All options: ``--help`` (the same as ``neural-quantize bench generate``); the logic lives in
``neural_quantization.bench.generate`` so the CLI and this script measure the same thing.
"""

import sys

from neural_quantization.bench.generate import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
