"""SIGTERM (what schedulers send) is handled like the first Ctrl-C, and a resume says so."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent

# Trains a small MLP for 400 steps with checkpoints every 100; prints "step N" as it goes so
# the test can send its signal mid-run.
_TRAIN = textwrap.dedent("""
    import sys
    import equinox as eqx, jax, jax.numpy as jnp, jax.random as jr, numpy as np, optax
    from hcmoe import training

    x = np.asarray(jr.normal(jr.key(0), (48, 2)))
    data = {"x": x, "y": np.sin(x[:, :1]) + 0.5 * x[:, 1:]}

    def loss(model, batch, key):
        return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2), {}

    def progress(model):
        progress.calls += 1
        print(f"step {progress.calls}", flush=True)
        return {}
    progress.calls = 0

    result = training.fit(
        eqx.nn.MLP(2, 1, width_size=16, depth=1, key=jr.key(1)), loss, data,
        optimizer=optax.adam(1e-2), steps=400, batch_size=8, key=jr.key(2),
        checkpoint_dir=sys.argv[1], checkpoint_every=100, eval_fn=progress, eval_every=1,
        progress=False,
    )
    flat = jnp.concatenate([jnp.ravel(p) for p in jax.tree.leaves(eqx.filter(result.model,
                                                                            eqx.is_array))])
    np.save(sys.argv[2], np.asarray(flat))
""")


def _start(*args):
    return subprocess.Popen(
        [sys.executable, "-c", _TRAIN, *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(proc, at_least: int) -> None:
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= at_least:
            return
        assert time.monotonic() < deadline, "the run did not reach the step in time"
    raise AssertionError(f"the run ended first: {proc.stderr.read()[-3000:]}")


def test_sigterm_checkpoints_the_finished_step_and_resume_matches(tmp_path):
    import numpy as np

    reference = _start(tmp_path / "reference", tmp_path / "reference.npy")
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]

    run = _start(tmp_path / "run", tmp_path / "run.npy")
    _wait_for_step(run, 150)  # past the checkpoint at 100, before the one at 200
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 143, stderr[-3000:]  # 128 + SIGTERM: terminated
    assert "SIGTERM" in stderr
    step = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["step"]
    assert 150 <= step < 400 and step % 100 != 0  # the step in flight, not the last periodic

    resumed = _start(tmp_path / "run", tmp_path / "run.npy")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"fit: resumed from step {step} of 400, {tmp_path / 'run'}" in err
    assert np.array_equal(np.load(tmp_path / "run.npy"), np.load(tmp_path / "reference.npy"))


@pytest.mark.parametrize("progress", [False, True])
def test_resume_is_announced_whatever_progress_is(tmp_path, capsys, progress):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np
    import optax

    from hcmoe import training

    x = np.asarray(jr.normal(jr.key(0), (16, 2)))
    data = {"x": x, "y": x[:, :1]}

    def loss(model, batch, key):
        return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2), {}

    def run(steps):
        return training.fit(
            eqx.nn.MLP(2, 1, width_size=4, depth=1, key=jr.key(1)),
            loss,
            data,
            optimizer=optax.adam(1e-2),
            steps=steps,
            batch_size=4,
            key=jr.key(2),
            checkpoint_dir=tmp_path,
            progress=progress,
        )

    run(3)
    assert "resumed" not in capsys.readouterr().err
    run(3)
    assert f"fit: resumed from step 3 of 3, {tmp_path} (nothing left to train)" in (
        capsys.readouterr().err
    )
    assert run(5).step == 5
    assert f"fit: resumed from step 3 of 5, {tmp_path}" in capsys.readouterr().err


def test_guard_restores_the_default_handlers():
    from hcmoe._interrupt import InterruptGuard

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # whatever the runner installed
    try:
        with InterruptGuard("x") as guard:
            assert signal.getsignal(signal.SIGTERM) == guard._handle
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        custom = signal.signal(signal.SIGTERM, lambda *_: None)
        with InterruptGuard("x"):  # a handler of the user's own is left alone
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        del custom
    finally:
        signal.signal(signal.SIGTERM, previous)
