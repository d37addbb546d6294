import csv
import json
import os
import signal
from collections import namedtuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import hcmoe
from hcmoe import training
from hcmoe.models import FNO, fno_input
from hcmoe.training._batches import Batches


ocp = pytest.importorskip("orbax.checkpoint")


def _data(n=48):
    x = np.asarray(jr.normal(jr.key(0), (n, 2)))
    y = np.sin(x[:, :1]) + 0.5 * x[:, 1:]
    return {"x": x, "y": y}


def _model(key=jr.key(1)):
    return eqx.nn.MLP(2, 1, width_size=16, depth=1, key=key)


def _loss(model, batch, key):
    noise = 1e-3 * jr.normal(key, batch["y"].shape)
    error = jax.vmap(model)(batch["x"]) - batch["y"] + noise
    return jnp.mean(error**2), {"max_error": jnp.max(jnp.abs(error))}


# Shared optimizers: a new optax object is a new static argument, hence a new compilation.
_ADAM = optax.adam(1e-2)
_PAPER = training.paper_optimizer(decay_every=3)


def _fit(**kwargs):
    options = dict(optimizer=_ADAM, steps=12, batch_size=8, key=jr.key(2), progress=False)
    return training.fit(_model(), _loss, _data(), **(options | kwargs))


def _params(model):
    return jax.tree.leaves(eqx.filter(model, eqx.is_array))


def _assert_identical(a, b):
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_loss_falls():
    result = _fit(steps=150, log_every=10)
    train = [r for r in result.history if r["kind"] == "train"]
    assert len(train) == 15 and result.step == 150
    assert train[-1]["loss"] < 0.1 * train[0]["loss"]
    assert {"loss", "max_error", "grad_norm", "steps_per_second"} <= set(train[-1])


class _Stop(Exception):
    pass


def _stop_at(step, exception):
    def eval_fn(model):
        eval_fn.calls += 1
        if eval_fn.calls == step:
            raise exception
        return {}

    eval_fn.calls = 0
    return eval_fn


def test_resume_after_crash_is_identical(tmp_path):
    reference = _fit(steps=10)
    with pytest.raises(_Stop):
        _fit(
            steps=10,
            checkpoint_dir=tmp_path,
            checkpoint_every=4,
            eval_fn=_stop_at(7, _Stop()),
            eval_every=1,
        )
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 4
    resumed = _fit(steps=10, checkpoint_dir=tmp_path, checkpoint_every=4)
    assert resumed.step == 10
    _assert_identical(resumed.model, reference.model)
    assert eqx.tree_equal(resumed.opt_state, reference.opt_state)


def test_interrupt_saves_and_resume_is_identical(tmp_path):
    reference = _fit(steps=10, optimizer=_PAPER)
    metrics = tmp_path / "metrics.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _fit(
            steps=10,
            optimizer=_PAPER,
            checkpoint_dir=tmp_path / "ckpt",
            eval_fn=_stop_at(6, KeyboardInterrupt()),
            eval_every=1,
            metrics_path=metrics,
            log_every=1,
        )
    assert json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())["step"] == 6
    resumed = _fit(
        steps=10,
        optimizer=_PAPER,
        checkpoint_dir=tmp_path / "ckpt",
        metrics_path=metrics,
        log_every=1,
    )
    _assert_identical(resumed.model, reference.model)
    steps = [r["step"] for r in training.read_metrics(metrics) if r["kind"] == "train"]
    assert steps == list(range(1, 11))  # nothing lost, nothing duplicated


def test_resume_with_other_key_is_refused(tmp_path):
    _fit(steps=2, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="key: the checkpoint .* same key"):
        _fit(steps=4, checkpoint_dir=tmp_path, key=jr.key(3))
    assert _fit(steps=4, checkpoint_dir=tmp_path, key=jr.key(3), resume=False).step == 4


def test_resume_with_other_settings_is_refused(tmp_path):
    _fit(steps=2, checkpoint_dir=tmp_path, settings={"points": 100, "weight": 0.5})
    with pytest.raises(
        training.RunMismatchError, match=r"settings: .* written with points=100; got points=200"
    ):
        _fit(steps=4, checkpoint_dir=tmp_path, settings={"points": 200, "weight": 0.5})
    # Same settings (any order), more steps: resumed, not retrained.
    resumed = _fit(steps=4, checkpoint_dir=tmp_path, settings={"weight": 0.5, "points": 100})
    assert resumed.step == 4 and all(r["step"] > 2 for r in resumed.history)
    with pytest.raises(ValueError, match="settings: expected JSON-serialisable"):
        _fit(steps=4, checkpoint_dir=tmp_path, settings={"points": object()})
    with pytest.raises(ValueError, match="settings: expected a mapping"):
        _fit(steps=4, checkpoint_dir=tmp_path, settings=[1, 2])


def test_finished_run_resumes_without_training(tmp_path):
    first = _fit(steps=3, checkpoint_dir=tmp_path)
    again = _fit(steps=3, checkpoint_dir=tmp_path)
    assert again.step == 3
    _assert_identical(again.model, first.model)


def _checkpoint_files(directory):
    return sorted(p.name for p in directory.iterdir())


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    model = _model()
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    training.save_checkpoint(tmp_path, 1, model, opt_state, key=jr.key(0))
    before = _checkpoint_files(tmp_path)
    changed = jax.tree.map(lambda p: p + 1 if eqx.is_inexact_array(p) else p, model)
    handler = ocp.StandardCheckpointHandler
    real_save = handler.save

    def crash_after_writing(self, *args, **kwargs):
        real_save(self, *args, **kwargs)  # the arrays are on disk, not yet committed
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(handler, "save", crash_after_writing)
        with pytest.raises(OSError, match="disk full"):
            training.save_checkpoint(tmp_path, 2, changed, opt_state, key=jr.key(0))
    left = [name for name in _checkpoint_files(tmp_path) if name not in before]
    assert left and all(".orbax-checkpoint-tmp" in name for name in left)  # uncommitted
    assert training.load_checkpoint(tmp_path, model, opt_state).step == 1

    real_replace = os.replace

    def fail_on_record(src, dst):
        if str(dst).endswith("checkpoint.json"):
            raise OSError("crash while committing")
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", fail_on_record)
        with pytest.raises(OSError, match="committing"):
            training.save_checkpoint(tmp_path, 3, changed, opt_state, key=jr.key(0))
    loaded = training.load_checkpoint(tmp_path, model, opt_state)
    assert loaded.step == 1  # the record still names the last complete checkpoint
    _assert_identical(loaded.model, model)
    assert not [name for name in _checkpoint_files(tmp_path) if name.endswith(".tmp")]
    training.save_checkpoint(tmp_path, 4, changed, opt_state, key=jr.key(0), keep=1)
    assert _checkpoint_files(tmp_path) == [  # the next save clears what the crashes left
        "checkpoint.json",
        "step_00000004",
        "step_00000004.json",
    ]


def test_checkpoint_keeps_latest(tmp_path):
    model = _model()
    for step in range(1, 5):
        training.save_checkpoint(tmp_path, step, model, None, key=jr.key(0), keep=2)
    assert _checkpoint_files(tmp_path) == [
        "checkpoint.json",
        "step_00000003",
        "step_00000003.json",
        "step_00000004",
        "step_00000004.json",
    ]
    assert training.load_checkpoint(tmp_path / "missing", model, None) is None


def test_checkpoint_keeps_keys_and_host_arrays(tmp_path):
    tree = {"key": jr.key(3), "host": np.arange(3.0), "device": jnp.ones(2, jnp.float32)}
    training.save_checkpoint(tmp_path, 1, tree, None, key=jr.key(0))
    loaded = training.load_checkpoint(tmp_path, tree).model
    assert jnp.issubdtype(loaded["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jr.key_data(loaded["key"]), jr.key_data(tree["key"]))
    assert isinstance(loaded["host"], np.ndarray) and loaded["host"].dtype == np.float64
    np.testing.assert_array_equal(loaded["host"], tree["host"])
    assert isinstance(loaded["device"], jax.Array) and loaded["device"].dtype == jnp.float32


def test_checkpoint_of_other_model_is_a_clear_error(tmp_path):
    training.save_checkpoint(tmp_path, 1, _model(), None, key=jr.key(0))
    other = eqx.nn.MLP(2, 1, width_size=4, depth=1, key=jr.key(0))
    with pytest.raises(ValueError, match="does not fit the given model"):
        training.load_checkpoint(tmp_path, other, None)


def test_metrics_files(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    result = _fit(
        steps=6,
        log_every=2,
        metrics_path=path,
        eval_fn=lambda model: {"error": jnp.mean(_model()(jnp.ones(2)) - model(jnp.ones(2)))},
        eval_every=3,
        optimizer=_PAPER,
    )
    records = training.read_metrics(path)
    assert records == result.history
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 2),
        ("train", 3),
        ("eval", 3),
        ("train", 4),
        ("train", 6),
        ("eval", 6),
    ]
    assert records[0]["learning_rate"] == pytest.approx(1e-3)
    with path.with_suffix(".csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6
    assert {"kind", "step", "loss", "max_error", "learning_rate", "error"} <= set(rows[0])


def test_callable_train_data():
    data = _data()
    calls = []

    def batch(step, key):
        calls.append(step)
        index = jr.choice(key, 48, (4,), replace=False)
        return jax.tree.map(lambda leaf: leaf[np.asarray(index)], data)

    result = training.fit(
        _model(),
        _loss,
        batch,
        optimizer=optax.sgd(1e-2),
        steps=3,
        batch_size=4,
        key=jr.key(0),
        progress=False,
    )
    assert calls == [0, 1, 2] and result.step == 3


def test_batches_cover_each_epoch():
    data = {"i": np.arange(10)}
    batches = Batches(data, 3, jr.key(0))
    epoch = np.concatenate([batches(s)["i"] for s in range(3)])
    assert len(set(epoch.tolist())) == 9
    assert not np.array_equal(batches(3)["i"], batches(0)["i"])


def test_paper_optimizer():
    schedule = training.paper_schedule()
    expected = {0: 1e-3, 799: 1e-3, 800: 5e-4, 1600: 2.5e-4, 2400: 1.25e-4, 3200: 1e-4, 4000: 1e-4}
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6)
    optimizer = training.paper_optimizer()
    params = {"w": jnp.zeros(3)}
    state = optimizer.init(params)
    huge = {"w": jnp.array([3e6, -4e6, 0.0])}
    updates, state = optimizer.update(huge, state, params)
    assert training.current_learning_rate(state) == pytest.approx(1e-3)
    assert float(optax.tree.norm(updates)) == pytest.approx(1e-3 * np.sqrt(2), rel=1e-3)
    assert training.current_learning_rate(optax.adam(1e-3).init(params)) is None


def test_solver_metrics():
    Stats = namedtuple("Stats", "num_steps residual_norm converged")
    stats = Stats(
        jnp.array([[3, 5], [4, 50]]),
        jnp.array([[1e-6, 2e-6], [1e-6, 0.3]]),
        jnp.array([[True, True], [True, False]]),
    )
    metrics = training.solver_metrics(stats)
    assert float(metrics["solver_steps"]) == pytest.approx(15.5)
    assert int(metrics["non_converged"]) == 1
    assert float(metrics["residual_norm"]) == pytest.approx(0.3)


def test_errors():
    with pytest.raises(TypeError, match=r"loss_fn: expected to return `\(loss, aux\)`"):
        training.fit(
            _model(),
            lambda m, b, k: jnp.sum(m(b["x"][0])),
            _data(),
            optimizer=optax.sgd(1e-2),
            steps=1,
            batch_size=4,
            key=jr.key(0),
            progress=False,
        )
    with pytest.raises(ValueError, match="'loss' must be a scalar"):
        training.fit(
            _model(),
            lambda m, b, k: (jax.vmap(m)(b["x"]), {}),
            _data(),
            optimizer=optax.sgd(1e-2),
            steps=1,
            batch_size=4,
            key=jr.key(0),
            progress=False,
        )
    with pytest.raises(ValueError, match="batch_size: expected between 1 and the dataset size 48"):
        _fit(batch_size=49)
    with pytest.raises(ValueError, match="train_data: expected a pytree of arrays sharing"):
        training.fit(
            _model(),
            _loss,
            {"x": np.ones((4, 2)), "y": np.ones((5, 1))},
            optimizer=optax.sgd(1e-2),
            steps=1,
            batch_size=4,
            key=jr.key(0),
            progress=False,
        )
    with pytest.raises(ValueError, match="steps: expected a non-negative integer"):
        _fit(steps=-1)
    with pytest.raises(ValueError, match="checkpoint_every: expected a positive integer"):
        _fit(checkpoint_every=0)


def test_non_finite_loss_raises():
    with pytest.raises(FloatingPointError, match="loss became nan at step 2"):
        _fit(optimizer=optax.sgd(jnp.nan), steps=3, log_every=1)


class _ReactionDiffusion(hcmoe.AbstractPDE):
    """`u_t = nu u_xx - u^3` with the initial condition `data["u0"]` (nonlinear: LM iterates)."""

    nu: float = 0.02

    def operators(self):
        return {
            "u": hcmoe.ops.Identity(),
            "u_t": hcmoe.ops.FiniteDifference("t"),
            "u_xx": hcmoe.ops.FiniteDifference("x", order=2),
        }

    def residual(self, values, coords, data):
        return values["u_t"] - self.nu * values["u_xx"] + values["u"] ** 3

    def conditions(self, grid, data):
        return (hcmoe.initial(data["u0"]),)


# PI-HC is PI-HC-MoE with a one-block partition: the same path, so it is not repeated here.
@pytest.mark.parametrize("method", ["PI-SC", "PI-HC-MoE"])
def test_one_loop_for_soft_hard_and_moe(method, tmp_path):
    grid = hcmoe.uniform_grid(t=(0.0, 1.0, 6), x=(0.0, 1.0, 8))
    pde = _ReactionDiffusion()
    x = np.linspace(0, 1, 8)
    u0 = np.stack([np.sin(np.pi * x) * a for a in (0.5, 1.0, 1.5, 2.0)])
    backbone = FNO(3, 4, ndim=2, width=4, modes=3, n_layers=1, fc_width=8, key=jr.key(0))
    if method == "PI-SC":
        model = backbone

        def predict(model, u0, key):
            return model(fno_input(grid, u0))[..., 0], {}

    else:
        partition = hcmoe.Partition(t=1, x=2)
        model = hcmoe.constrain(backbone, pde, partition, grid=grid, max_steps=5)

        def predict(model, u0, key):
            solution = model(fno_input(grid, u0), {"u0": u0}, key=key)
            return solution.u, solution.stats

    def loss_fn(model, batch, key):
        keys = jr.split(key, batch["u0"].shape[0])
        u, stats = jax.vmap(lambda u0, k: predict(model, u0, k))(batch["u0"], keys)
        residual = jax.vmap(lambda u, u0: hcmoe.losses.residual_loss(u, pde, grid, {"u0": u0}))
        condition = jax.vmap(lambda u, u0: hcmoe.losses.condition_loss(u, pde, grid, {"u0": u0}))
        loss = jnp.mean(residual(u, batch["u0"]) + condition(u, batch["u0"]))
        return loss, (training.solver_metrics(stats) if method != "PI-SC" else {})

    result = training.fit(
        model,
        loss_fn,
        {"u0": u0},
        optimizer=training.paper_optimizer(),
        steps=2,
        batch_size=2,
        key=jr.key(1),
        metrics_path=tmp_path / "m.jsonl",
        log_every=1,
        progress=False,
    )
    records = training.read_metrics(tmp_path / "m.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)
    if method != "PI-SC":
        assert {"solver_steps", "non_converged", "residual_norm"} <= set(records[-1])
    assert type(result.model) is type(model)


def test_progress_bar_shows_metrics(capsys):
    _fit(steps=4, log_every=2, progress=True, eval_fn=lambda m: {"error": 0.5})
    err = capsys.readouterr().err
    assert "loss=" in err and "max_error=" in err and "eval_error=0.5" in err


def test_trainable_filter_freezes_leaves():
    model = _model()
    trainable = jax.tree.map(eqx.is_inexact_array, model)
    first_layer = lambda m: (m.layers[0].weight, m.layers[0].bias)
    trainable = eqx.tree_at(first_layer, trainable, (False, False))
    result = training.fit(
        model,
        _loss,
        _data(),
        optimizer=_ADAM,
        steps=3,
        batch_size=8,
        key=jr.key(0),
        progress=False,
        trainable=trainable,
    )
    np.testing.assert_array_equal(result.model.layers[0].weight, model.layers[0].weight)
    assert not np.array_equal(result.model.layers[1].weight, model.layers[1].weight)


# -- checkpoints that survive damage, and Ctrl-C (issue 9) -------------------------------------
def _two_checkpoints(tmp_path):
    """A run of 8 steps with checkpoints after 4 and 8; the uninterrupted reference of 12."""
    _fit(steps=8, checkpoint_dir=tmp_path, checkpoint_every=4)
    return _fit(steps=12)


def _largest_file(checkpoint):
    return max((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_truncated_newest_checkpoint_resumes_from_the_older_one(tmp_path):
    reference = _two_checkpoints(tmp_path)
    newest = tmp_path / "step_00000008"
    file = _largest_file(newest)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.warns(training.CheckpointWarning, match=r"step_00000008: .* the file is truncated"):
        loaded = training.load_checkpoint(tmp_path, _model(), _ADAM.init(_params_of(_model())))
    assert loaded.step == 4
    with pytest.warns(training.CheckpointWarning, match=str(newest)):
        resumed = _fit(steps=12, checkpoint_dir=tmp_path, checkpoint_every=4)
    assert resumed.step == 12
    _assert_identical(resumed.model, reference.model)  # steps 5-8 were redone, identically


def test_corrupt_newest_checkpoint_of_the_right_size_is_detected(tmp_path):
    _two_checkpoints(tmp_path)
    file = _largest_file(tmp_path / "step_00000008")
    payload = bytearray(file.read_bytes())
    payload[-8:] = b"\xff" * 8  # same size, other bytes: only the hash can tell
    file.write_bytes(bytes(payload))
    with pytest.warns(training.CheckpointWarning, match="SHA-256 does not match"):
        assert training.load_checkpoint(tmp_path, _model(), None).step == 4


# After Orbax's read error, tensorstore's other pending reads call back into the event loop
# Orbax has closed; Python reports those as unraisable when collected (noise, not a failure).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_orbax_cannot_read_is_skipped(tmp_path):
    """Damage the hashes cannot see (the record rewritten to match): Orbax's own error."""
    _two_checkpoints(tmp_path)
    newest = tmp_path / "step_00000008"
    for file in newest.rglob("*"):
        if file.is_file() and file.parent.name == "d":
            file.write_bytes(b"not an array")
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    record["files"] = training._orbax.digests(newest)
    (tmp_path / "checkpoint.json").write_text(json.dumps(record))
    with pytest.warns(training.CheckpointWarning, match=r"step_00000008: Orbax could not read"):
        assert training.load_checkpoint(tmp_path, _model(), None).step == 4


def test_damaged_record_is_rebuilt_from_the_step_records(tmp_path):
    reference = _two_checkpoints(tmp_path)
    record = tmp_path / "checkpoint.json"
    record.write_text(record.read_text()[:40])  # cut mid-way, as a full disk would
    with pytest.warns(training.CheckpointWarning, match=r"checkpoint\.json is damaged .* step 8"):
        resumed = _fit(steps=12, checkpoint_dir=tmp_path, checkpoint_every=4)
    _assert_identical(resumed.model, reference.model)
    assert json.loads(record.read_text())["step"] == 12  # the next save repaired it


def test_damaged_record_with_nothing_to_rebuild_from_is_a_clear_error(tmp_path):
    _fit(steps=4, checkpoint_dir=tmp_path)
    for path in tmp_path.glob("step_*.json"):
        path.unlink()
    (tmp_path / "checkpoint.json").write_text('{"format": "hcmoe-checkpoint", "ver')
    with pytest.raises(
        ValueError,
        match=r"checkpoint\.json: the checkpoint record is damaged "
        r"\(not valid JSON.*resume=False",
    ):
        _fit(steps=8, checkpoint_dir=tmp_path)


def test_no_intact_checkpoint_is_an_error_naming_each_file(tmp_path):
    _two_checkpoints(tmp_path)
    for path in tmp_path.glob("step_*/**/*"):
        if path.is_file():
            path.write_bytes(b"")
    with pytest.warns(training.CheckpointWarning):
        with pytest.raises(
            ValueError, match=r"no intact checkpoint .*step_00000008: .*step_00000004: "
        ):
            training.load_checkpoint(tmp_path, _model(), None)


def _write_v1_checkpoint(directory, step, model, opt_state, key):
    """A checkpoint as hcmoe 0.1 wrote it: one `.eqx` file and a version-1 record."""
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}.eqx"
    eqx.tree_serialise_leaves(directory / name, (model, opt_state))
    payload = (directory / name).read_bytes()
    record = {
        "format": "hcmoe-checkpoint",
        "version": 1,
        "step": step,
        "file": name,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "key": training._checkpoints.key_record(key),
    }
    for path in (directory / f"step_{step:08d}.json", directory / "checkpoint.json"):
        path.write_text(json.dumps(record))


def test_hcmoe_0_1_checkpoints_are_resumed(tmp_path):
    reference = _fit(steps=8)
    first = _fit(steps=4)
    _write_v1_checkpoint(tmp_path, 4, first.model, first.opt_state, jr.key(2))
    assert training.load_checkpoint(tmp_path, _model()).step == 4  # the model alone
    resumed = _fit(steps=8, checkpoint_dir=tmp_path)
    _assert_identical(resumed.model, reference.model)
    assert "step_00000008" in _checkpoint_files(tmp_path)  # new checkpoints: Orbax


def _params_of(model):
    return eqx.filter(model, eqx.is_inexact_array)


class _SignalsWhenCollected:
    """Sends SIGINT from `__del__`: where Python swallows exceptions ("Exception ignored"),
    as it does for an interrupt that lands in JAX's garbage-collection callback."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


def _interrupt_at(step, how):
    def eval_fn(model):
        eval_fn.calls += 1
        if eval_fn.calls == step:
            if how == "collected":
                _SignalsWhenCollected()  # collected at once: __del__ runs here
            else:
                signal.raise_signal(signal.SIGINT)
        return {}

    eval_fn.calls = 0
    return eval_fn


@pytest.mark.parametrize("how", ["collected", "direct"])
def test_sigint_is_never_lost_and_checkpoints_the_finished_step(tmp_path, how, default_sigint):
    reference = _fit(steps=10)
    with pytest.raises(KeyboardInterrupt):
        _fit(steps=10, checkpoint_dir=tmp_path, eval_fn=_interrupt_at(6, how), eval_every=1)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 6
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    resumed = _fit(steps=10, checkpoint_dir=tmp_path)
    _assert_identical(resumed.model, reference.model)


def test_checkpoints_and_metrics_have_normal_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        _fit(steps=2, checkpoint_dir=tmp_path / "ckpt", metrics_path=tmp_path / "m.jsonl")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()]
    written = [*files, tmp_path / "m.jsonl", tmp_path / "m.csv"]
    assert files and {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}
    folders = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_dir()]
    assert folders and {oct(p.stat().st_mode & 0o777) for p in folders} == {"0o755"}


def test_read_metrics_skips_a_last_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st')
    assert training.read_metrics(path) == [{"kind": "train", "step": 1}]
    path.write_text('{"kind": "tr\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 1: not a JSON metrics record"):
        training.read_metrics(path)
