"""Batched constraint solves finish: a guard against the jaxlib releases whose CPU LAPACK
kernels can hang (`hcmoe._jaxlib_check`), and the warning for them."""

import subprocess
import sys
import warnings
from pathlib import Path

import jax
import pytest

import hcmoe
from hcmoe import _jaxlib_check


WORKER = Path(__file__).with_name("batched_solves_worker.py")
TIMEOUT_S = 240  # the worker takes 15-30 s on 2 cores; a hang never ends


def test_vmapped_joint_solve_over_64_samples_finishes():
    """With jaxlib 0.10.2 this hung every time (both pool threads blocked in batched Cholesky
    kernels); it must run to the end with the jaxlib that hcmoe requires."""
    try:
        result = subprocess.run(
            [sys.executable, str(WORKER)], capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"a vmapped solve over 64 samples did not finish in {TIMEOUT_S} s: "
            "the jaxlib CPU LAPACK hang (see hcmoe._jaxlib_check)"
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("done")


@pytest.mark.parametrize("version", ["0.10.0", "0.10.2", "0.11.0"])
def test_hang_prone_releases_are_named(version):
    message = _jaxlib_check.hang_message(version, "cpu")
    assert message is not None and version in message and "0.9.2" in message


@pytest.mark.parametrize(
    "version, backend",
    [
        ("0.9.2", "cpu"),
        ("0.11.1", "cpu"),
        ("0.12.0", "cpu"),
        ("0.6.0", "cpu"),
        ("0.10.2", "gpu"),
        ("0.10.2.dev20260101", "tpu"),
        ("unknown", "cpu"),
    ],
)
def test_other_releases_and_backends_are_not(version, backend):
    assert _jaxlib_check.hang_message(version, backend) is None


def test_solve_warns_once_with_a_hang_prone_jaxlib(monkeypatch, getkey):
    monkeypatch.setattr(_jaxlib_check.importlib.metadata, "version", lambda name: "0.10.2")
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    _jaxlib_check.warn_if_hang_prone.cache_clear()
    grid = hcmoe.problems.diffusion_sorption.make_grid(nt=6, nx=16)
    pde = hcmoe.problems.diffusion_sorption.DiffusionSorption()
    basis = jax.random.normal(getkey(), (*grid.shape, 4))
    data = {"u0": jax.numpy.full((16,), 0.1)}
    try:
        with pytest.warns(hcmoe.JaxlibHangWarning, match="0.10.2"):
            hcmoe.solve(basis, pde, None, grid, data)
        # Once per process: a second call (not only a jit-cache hit, which would not trace
        # `solve` again) stays silent.
        with warnings.catch_warnings():
            warnings.simplefilter("error", hcmoe.JaxlibHangWarning)
            _jaxlib_check.warn_if_hang_prone()
    finally:
        _jaxlib_check.warn_if_hang_prone.cache_clear()
