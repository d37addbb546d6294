"""Sharding: mesh construction and errors here; several devices and processes in subprocesses.

JAX fixes its device count when it starts, so this process stays on one CPU device (the other
test modules are unaffected) and the multi-device checks run in fresh interpreters:

- `tests/sharded_cases.py` under `python -m pytest` with 8 fake CPU devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=8`);
- `tests/multiprocess_worker.py` as 2 processes x 2 fake CPU devices joined by
  `jax.distributed.initialize` on 127.0.0.1 with gloo collectives.

Every subprocess runs under a wall-clock timeout and is killed past it, so nothing can hang.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import hcmoe
from hcmoe import _sharding

from . import multiprocess_worker
from .helpers import ForcedHeat, basis_with_exact, data_for, small_grid


ROOT = Path(__file__).resolve().parent.parent


def _env(num_devices: int) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"  # fake CPU devices, even on a machine with a GPU
    return env


def _report(name: str, proc: subprocess.CompletedProcess | subprocess.Popen, text: str) -> str:
    return f"{name} exited with {proc.returncode}:\n{text[-6000:]}"


def test_expert_mesh_shapes():
    mesh = hcmoe.expert_mesh()
    assert mesh.axis_names == ("batch", "experts")
    assert dict(mesh.shape) == {"batch": 1, "experts": jax.device_count()}
    devices = [jax.devices()[0]] * 4  # any device list works; repeats are only for the shape
    assert dict(hcmoe.expert_mesh(4, batch=2, devices=devices).shape) == {"batch": 2, "experts": 2}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_devices=0), "num_devices: expected a positive int; got 0"),
        (dict(num_devices=2.0), "num_devices: expected a positive int"),
        (dict(batch=0), "batch: expected a positive int"),
        (dict(num_devices=10**6), "asked for 1000000 devices but only"),
        (dict(num_devices=3, batch=2, devices="three"), "must divide"),
    ],
)
def test_expert_mesh_errors(kwargs, match):
    if kwargs.get("devices") == "three":
        kwargs = dict(kwargs, devices=[jax.devices()[0]] * 3)
    with pytest.raises(ValueError, match=match):
        hcmoe.expert_mesh(**kwargs)


def test_mesh_without_experts_axis_is_a_clear_error():
    grid = small_grid(nt=5, nx=6)
    basis = basis_with_exact(grid, jax.random.key(0))
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    match = r"needs an axis named 'experts'.*has axes \('data',\)"
    solve = jax.jit(
        lambda b: hcmoe.solve(
            b, ForcedHeat(), None, grid, data_for(grid), coupling=hcmoe.Independent(mesh=mesh)
        )
    )
    with pytest.raises(ValueError, match=match):
        solve(basis)
    with pytest.raises(ValueError, match=match):  # at construction, before any call
        hcmoe.constrain(
            lambda p, x: x, ForcedHeat(), grid=grid, coupling=hcmoe.Independent(mesh=mesh)
        )
    with pytest.raises(ValueError, match="expected a jax.sharding.Mesh"):
        hcmoe.constrain(
            lambda p, x: x, ForcedHeat(), grid=grid, coupling=hcmoe.Independent(mesh="experts")
        )
    # a Joint mesh splits only a batch: it needs a "batch" axis (an "experts" one is not enough)
    with pytest.raises(ValueError, match=r"needs an axis named 'batch'.*has axes \('data',\)"):
        hcmoe.Joint(mesh=mesh)
    with pytest.raises(ValueError, match=r"needs an axis named 'batch'.*has axes \('experts',\)"):
        hcmoe.Joint(mesh=Mesh(np.asarray(jax.devices()[:1]), ("experts",)))
    with pytest.raises(ValueError, match="expected a jax.sharding.Mesh"):
        hcmoe.Joint(mesh="batch")
    assert hcmoe.Joint(mesh=hcmoe.expert_mesh(1)).mesh is not None
    # hcmoe 0.1's mesh= option names its new home
    with pytest.raises(
        ValueError,
        match=r"the option 'mesh' moved in hcmoe 0\.2: pass "
        r"coupling=hcmoe\.Independent\(mesh=\.\.\.\)",
    ):
        hcmoe.constrain(lambda p, x: x, ForcedHeat(), grid=grid, mesh=hcmoe.expert_mesh(1))


def test_padding_helpers():
    tree = {"a": jnp.arange(3.0), "b": jnp.arange(6).reshape(3, 2)}
    padded = _sharding.pad_leading(tree, 4)
    assert np.array_equal(padded["a"], [0.0, 1.0, 2.0, 0.0])
    assert np.array_equal(padded["b"][3], [0, 1])
    assert _sharding.pad_leading(tree, 3) is tree
    assert np.array_equal(_sharding.take_leading(padded, 3)["b"], tree["b"])
    assert [_sharding.padded_size(k, 4) for k in (1, 4, 5, 8)] == [4, 4, 8, 8]
    with pytest.raises(ValueError, match="one shared leading axis size"):
        _sharding.leading_size((jnp.zeros(2), jnp.zeros(3)))


def test_one_device_mesh_equals_no_mesh(getkey):
    # The one-GPU case: a 1-device mesh is a plain vmap with trivial constraints.
    grid = small_grid(nt=6, nx=7)
    basis = basis_with_exact(grid, getkey())
    partition, data = hcmoe.Partition(x=3), data_for(grid)
    run = jax.jit(
        lambda b, mesh: hcmoe.solve(
            b, ForcedHeat(), partition, grid, data, coupling=hcmoe.Independent(mesh=mesh)
        ),
        static_argnums=1,
    )
    ref, sol = run(basis, None), run(basis, hcmoe.expert_mesh(1))
    assert np.allclose(sol.u, ref.u, rtol=1e-12, atol=1e-12)
    assert np.allclose(sol.weights, ref.weights, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "markers", ["not slow", pytest.param("slow", marks=pytest.mark.slow)], ids=["default", "slow"]
)
def test_sharded_cases_on_eight_devices(markers):
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-n",
        "0",
        "-m",
        markers,
        str(ROOT / "tests" / "sharded_cases.py"),
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=480
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"tests/sharded_cases.py timed out after {e.timeout} s:\n{e.stdout}")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, _report("tests/sharded_cases.py", proc, text)
    assert "skipped" not in text and " passed" in text, text[-6000:]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> list[str]:
    """Kill the processes still running; their output."""
    logs = []
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            logs.append(proc.communicate()[0][-3000:])
    return logs


@pytest.mark.multiprocess
def test_two_processes_equal_one(tmp_path):
    num_processes, out = 2, tmp_path / "results.npz"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.multiprocess_worker",
                str(i),
                str(num_processes),
                str(port),
                str(out),
            ],
            cwd=ROOT,
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    try:
        expected = multiprocess_worker.results(None, None)  # one process, while they run
        logs = [proc.communicate(timeout=240)[0] for proc in procs]
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the processes ran past {e.timeout} s:\n" + "\n".join(_stop(procs)))
    finally:
        _stop(procs)  # on any error too: never leave a process behind
    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, _report(f"process {i}", proc, log)

    got = dict(np.load(out))
    assert got.keys() == expected.keys()
    for name in expected:
        assert np.allclose(got[name], expected[name], rtol=1e-9, atol=1e-11), name
