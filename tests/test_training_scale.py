"""`fit` on a device mesh and across processes, with Orbax checkpoints (issue 33).

The multi-process tests launch `tests/training_worker.py` as 2 processes x 2 fake CPU devices
joined on 127.0.0.1 with gloo (a `("batch", "experts")` mesh of 2 x 2, the batch split over
the processes), or as 1 process x 2 devices, and compare with the same steps run here on one
device. Each launch is bounded by a timeout and every process is killed past it. Together they
take about 3 minutes on 2 cores, so they are opt-in (`slow`):

    pytest -m slow tests/test_training_scale.py
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

import hcmoe
from hcmoe import training

from . import training_worker as worker


ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 180  # a 2-process run takes ~15 s on 2 idle cores; a hang never ends


def _reference(steps):
    return worker.train(None, steps)


def _assert_matches(got, reference):
    params = worker.flat_params(reference.model)
    scale = np.max(np.abs(params))
    assert np.max(np.abs(got["params"] - params)) <= 1e-6 * scale
    np.testing.assert_allclose(got["losses"], worker.losses(reference.history), rtol=1e-9)


# -- one process ------------------------------------------------------------------------------
def test_a_one_device_mesh_gives_the_meshless_run(tmp_path):
    reference = _reference(4)
    result = worker.train(None, 4, hcmoe.expert_mesh(1))
    np.testing.assert_allclose(
        worker.flat_params(result.model), worker.flat_params(reference.model), rtol=1e-12
    )
    leaf = jax.tree.leaves(result.model)[0]
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.is_fully_replicated


def test_mesh_errors():
    no_batch = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "experts"))
    with pytest.raises(ValueError, match="mesh: needs an axis named 'batch'"):
        worker.train(None, 1, no_batch)
    with pytest.raises(ValueError, match="mesh: expected a jax.sharding.Mesh"):
        worker.train(None, 1, "batch")


def test_checkpoint_loads_onto_a_mesh(tmp_path):
    first = worker.train(tmp_path, 2)
    mesh = hcmoe.expert_mesh(1)
    model = first.model
    loaded = training.load_checkpoint(tmp_path / "checkpoints", model, first.opt_state, mesh=mesh)
    assert loaded.step == 2
    leaf = jax.tree.leaves(loaded.model)[0]
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, jax.sharding.PartitionSpec()), 2)
    np.testing.assert_array_equal(worker.flat_params(loaded.model), worker.flat_params(model))


@pytest.mark.parametrize("mesh", [None, "mesh"])
def test_the_step_is_traced_once(mesh):
    traces = []

    def counted(model, batch, key):
        traces.append(1)  # Python runs this only while tracing
        return worker._loss(model, batch, key)

    mesh = None if mesh is None else hcmoe.expert_mesh(1)
    model = worker.eqx.nn.MLP(2, 1, width_size=8, depth=1, key=jax.random.key(1))
    options = dict(optimizer=worker.OPTIMIZER, batch_size=8, key=jax.random.key(2))
    training.fit(model, counted, worker._data(), steps=5, progress=False, mesh=mesh, **options)
    assert len(traces) == 1


def test_a_batch_function_on_a_mesh_returns_this_process_rows():
    data = worker._data()

    def rows(step, key):  # one process: its rows are the whole batch
        index = jax.random.choice(key, 32, (8,), replace=False)
        return jax.tree.map(lambda leaf: leaf[np.asarray(index)], data)

    model = worker.eqx.nn.MLP(2, 1, width_size=8, depth=1, key=jax.random.key(1))
    options = dict(optimizer=worker.OPTIMIZER, steps=3, batch_size=8, key=jax.random.key(2))
    plain = training.fit(model, worker._loss, rows, progress=False, **options)
    meshed = training.fit(
        model, worker._loss, rows, progress=False, mesh=hcmoe.expert_mesh(1), **options
    )
    np.testing.assert_allclose(
        worker.flat_params(meshed.model), worker.flat_params(plain.model), rtol=1e-12
    )


# -- several processes ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _launch(run_dir, steps, num_processes=2, pace=0.0) -> list[subprocess.Popen]:
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tests.training_worker", str(i), str(num_processes)]
            + [str(port), str(run_dir), str(steps), str(pace)],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]


def _kill(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()


def _finish(procs) -> list[str]:
    """Every process's output, once all have exited with status 0 (killed past the timeout)."""
    try:
        logs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    except subprocess.TimeoutExpired as error:
        _kill(procs)
        pytest.fail(f"the processes ran past {error.timeout} s")
    finally:
        _kill(procs)  # on any error too: never leave a process behind
    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"process {i} exited with {proc.returncode}:\n{log[-3000:]}"
    return logs


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_device_and_resume_on_fewer(tmp_path):
    _finish(_launch(tmp_path, 6))
    got = dict(np.load(tmp_path / "result.npz"))
    assert got["devices"] == 4
    _assert_matches(got, _reference(6))
    assert json.loads((tmp_path / "checkpoints" / "checkpoint.json").read_text())["step"] == 6

    # The newest checkpoint damaged: 1 process x 2 devices resumes from step 4, with a warning.
    newest = tmp_path / "checkpoints" / "step_00000006"
    data = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:10])
    (log,) = _finish(_launch(tmp_path, 8, num_processes=1))
    assert f"{newest}: " in log and "CheckpointWarning" in log
    assert "fit: resumed from step 4 of 8" in log
    got = dict(np.load(tmp_path / "result.npz"))
    assert got["devices"] == 2
    _assert_matches(got, _reference(8))

    # And here, on one device, onward to 10.
    result = worker.train(tmp_path, 10)
    reference = _reference(10)
    _assert_matches(
        {"params": worker.flat_params(result.model), "losses": worker.losses(result.history)},
        reference,
    )


def _wait_for_step(proc, step: int) -> None:
    timer = threading.Timer(TIMEOUT_S, proc.kill)  # a hang ends the wait
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("step ") and int(line.split()[1]) >= step:
                return
    finally:
        timer.cancel()
    pytest.fail(f"the process ended (status {proc.wait()}) before step {step}")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_killed_process_is_resumed_by_restarting_both(tmp_path):
    procs = _launch(tmp_path, 8, pace=0.3)
    try:
        _wait_for_step(procs[1], 5)  # checkpointed after step 4, in step 5
        os.kill(procs[1].pid, signal.SIGKILL)
    finally:
        _kill(procs)
        for proc in procs:
            proc.communicate()
    assert json.loads((tmp_path / "checkpoints" / "checkpoint.json").read_text())["step"] < 8
    assert not (tmp_path / "result.npz").exists()

    logs = _finish(_launch(tmp_path, 8))
    assert "fit: resumed from step " in logs[0]
    _assert_matches(dict(np.load(tmp_path / "result.npz")), _reference(8))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
    procs = _launch(tmp_path, 8, pace=0.3)
    try:
        _wait_for_step(procs[1], 3)
        procs[1].send_signal(signal.SIGTERM)  # as a scheduler would, to one process only
        logs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    finally:
        _kill(procs)
    assert [proc.returncode for proc in procs] == [143, 143], logs[0][-3000:]
    assert "[SIGTERM]" in logs[1] and "another process received SIGTERM" in logs[0]
    stopped = json.loads((tmp_path / "checkpoints" / "checkpoint.json").read_text())["step"]
    assert 3 <= stopped < 8  # the step in flight was finished and checkpointed, by both

    logs = _finish(_launch(tmp_path, 8))
    assert f"fit: resumed from step {stopped} of 8" in logs[0]
    _assert_matches(dict(np.load(tmp_path / "result.npz")), _reference(8))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_documented_loopback_command_trains_the_quickstart(tmp_path):
    """docs/scaling.md's command, with --tiny (2 steps): 2 processes x 2 CPU devices."""
    port = _free_port()
    script = ROOT / "examples" / "quickstart_distributed.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "--tiny", "--steps", "2", "--out", str(tmp_path)]
            + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
            + ["--process-id", str(i)],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = _finish(procs)
    assert "PI-HC-MoE (joint) on 4 devices, 2 processes:" in logs[0]
    assert "Evaluation(n=4" in logs[0]
    record = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint.json").read_text())
    assert record["step"] == 2
