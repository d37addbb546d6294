"""Keep the benchmark scripts from rotting: one runs at smoke size, the others must compile.

No timings are checked (benchmarks are not tests)."""

import json
import py_compile
import subprocess
import sys
from pathlib import Path


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_benchmark_scripts_compile():
    for script in sorted(BENCHMARKS.glob("*.py")):
        py_compile.compile(str(script), doraise=True)


def test_scaling_smoke_run(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "scaling.py"), "--smoke", "--problem", "ds",
               "--no-plot", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "scaling_ds_smoke.json").read_text())
    records = result["problems"]["diffusion_sorption"]["results"]
    assert {r["experts"] for r in records} == {1, 2}
    assert all("forward" in r and "gradient" in r and r["converged_fraction"] == 1.0
               for r in records)
    assert result["machine"]["backend"]
