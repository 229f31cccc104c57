"""End-to-end decode benchmark (fp16 vs our int4, Mistral-7B-shaped): writes benchmarks/results/e2e_<gpu>.json.

    PYTHONPATH=src python benchmarks/e2e.py --output benchmarks/results/e2e_h100.json
    PYTHONPATH=src python benchmarks/e2e.py --compile --batches 1 --profile --output benchmarks/results/e2e_h100_compiled.json

All options: ``--help`` (the same as ``neural-quantize bench decode``); the logic lives in
``neural_quantization.bench.decode`` so the CLI and this script measure the same thing.
"""

import sys

from neural_quantization.bench.decode import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
