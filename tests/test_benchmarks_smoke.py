"""Keep the benchmark scripts from rotting: one runs at smoke size, the others must compile;
`peer.py` skips cleanly without the paper's release.

No timings are checked (benchmarks are not tests)."""

import json
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_benchmark_scripts_compile():
    for script in sorted(BENCHMARKS.glob("*.py")):
        py_compile.compile(str(script), doraise=True)


@pytest.mark.parametrize(
    "options",
    [
        {},
        # the solve options the command line passes through (benchmarks/README.md, section 15)
        {"schedule": "map", "condition_scope": "owned"},
    ],
)
def test_scaling_smoke_run(tmp_path, options):
    command = [
        sys.executable,
        str(BENCHMARKS / "scaling.py"),
        "--smoke",
        "--problem",
        "ds",
        "--no-plot",
        "--out",
        str(tmp_path),
    ]
    for name, value in options.items():
        command += ["--" + name.replace("_", "-"), value]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "scaling_ds_smoke.json").read_text())
    records = result["problems"]["diffusion_sorption"]["results"]
    assert {r["experts"] for r in records} == {1, 2}
    assert all(
        "forward" in r and "gradient" in r and r["converged_fraction"] == 1.0 for r in records
    )
    assert result["machine"]["backend"]
    solver = result["problems"]["diffusion_sorption"]["solver"]
    for name in ("schedule", "condition_scope"):
        assert solver.get(name) == options.get(name)


def test_peer_skips_without_the_release(tmp_path):
    """`peer.py` needs the paper's release (not shipped); without it: a message, exit 0."""
    out = tmp_path / "peer.json"
    command = [
        sys.executable,
        str(BENCHMARKS / "peer.py"),
        "--release",
        str(tmp_path / "no-such-release"),
        "--size",
        "small",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("peer.py: skipped: no release at"), done.stdout + done.stderr
    assert not out.exists()


def test_peer_skips_when_the_release_does_not_import(tmp_path):
    """A tree that looks like the release but fails to import is a skip too, not a crash."""
    package = tmp_path / "release" / "neptune"
    (package / "models" / "MoE").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pdes").mkdir()
    (package / "pdes" / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    command = [
        sys.executable,
        str(BENCHMARKS / "peer.py"),
        "--release",
        str(tmp_path / "release"),
        "--size",
        "small",
        "--out",
        str(tmp_path / "p.json"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "peer.py: skipped: the release at" in done.stdout, done.stdout + done.stderr
    assert "broken on purpose" in done.stdout


def test_report_renders_the_stored_results():
    # Every results/*.json the README's tables come from, the release comparison included.
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "report.py")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    stored = {p.stem for p in (BENCHMARKS / "results").glob("*.json")}
    for name in ("solvers", "scaling_ds", "memory_ds", "backbone_share_ds", "peer"):
        if name in stored:
            assert f"### {name}\n" in done.stdout
    if "peer" in stored:
        assert "| 1 | release |" in done.stdout
