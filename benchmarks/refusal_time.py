"""How long the CLI takes to refuse bad input, from the command line to exit code 2.

Each case runs ``neural-quantize`` in a fresh process (what a user types), in an empty temporary
directory, and records the wall time, the exit code, the one-line message and whether anything
was left on disk. The cases are the ones issue 14 reported as refused only after the work:

    python benchmarks/refusal_time.py          # writes benchmarks/results/refusal_time.json
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, print_and_save

from neural_quantization.reporting.report import environment_info

CASES = {
    "gguf export of a non-Llama model": ["--model-name", "gemma3-270m", "--output-dir", "o", "--format", "gguf",
                                          "--group-size", "32"],
    "--seq-len past the context": ["--model-name", "smollm2-135m", "--output-dir", "o", "--seq-len", "100000"],
    "--output-dir . --overwrite": ["--model-name", "smollm2-135m", "--output-dir", ".", "--overwrite"],
    "--devices cuda:0 without a GPU": ["--model-name", "smollm2-135m", "--output-dir", "o", "--devices", "cuda:63"],
    "mistyped relative calibration path": ["--model-name", "smollm2-135m", "--output-dir", "o",
                                           "--calibration-data", "data/typo"],
}


def main() -> None:
    rows = []
    for name, argv in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "data").mkdir()
            Path(tmp, "user-file.txt").write_text("keep")
            before = sorted(p.name for p in Path(tmp).iterdir())
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "neural_quantization.cli", *argv], cwd=tmp,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - start
            lines = [line for line in done.stderr.splitlines() if line.startswith("neural-quantize: error:")]
            rows.append({"case": name, "argv": argv, "exit_code": done.returncode, "seconds": round(seconds, 2),
                         "message": lines[-1] if lines else done.stderr[-300:],
                         "files_unchanged": sorted(p.name for p in Path(tmp).iterdir()) == before})
            print(f"{name:<40} exit {done.returncode}  {seconds:5.1f} s  {rows[-1]['message'][:100]}", flush=True)
    print_and_save({"benchmark": "refusal_time", "environment": environment_info(), "rows": rows},
                   str(REPO / "benchmarks" / "results" / "refusal_time.json"))


if __name__ == "__main__":
    main()
