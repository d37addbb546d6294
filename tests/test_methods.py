import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import hcmoe
from hcmoe import methods
from hcmoe.problems import heat


GRID = heat.make_grid(nt=9, nx=12)
PDE = hcmoe.problems.Heat(kappa=0.1)
PARTITION = hcmoe.Partition(t=1, x=2)
# Shared: a new optax object is a new static argument of the jitted step, hence a recompile.
OPTIMIZER = optax.adam(1e-2)


class PointwiseBasis(eqx.Module):
    """A tiny backbone: the same MLP at every grid point, `(*grid, channels) -> (*grid, N)`."""

    mlp: eqx.nn.MLP

    def __init__(self, channels=3, n_basis=4, *, key):
        self.mlp = eqx.nn.MLP(channels, n_basis, width_size=16, depth=2, key=key)

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1])
        return jax.vmap(self.mlp)(flat).reshape(x.shape[:-1] + (-1,))


class ScaledInitialCondition(eqx.Module):
    """One basis function: `scale * u0(x)` at every time (the last input channel)."""

    scale: jax.Array

    def __call__(self, x):
        return self.scale * x[..., -1:]


def _data(n=8, seed=0):
    u0 = heat.sample_initial_conditions(jr.key(seed), n, GRID)
    return {"u0": np.asarray(u0, np.float32)}


@pytest.mark.parametrize("kind", methods.KINDS)
def test_loss_falls(kind):
    method = methods.make_method(kind, PointwiseBasis(key=jr.key(0)), PDE, GRID, PARTITION)
    result = methods.train(
        method,
        _data(),
        steps=12,
        batch_size=4,
        key=jr.key(1),
        optimizer=OPTIMIZER,
        log_every=3,
        progress=False,
    )
    records = [r for r in result.history if r["kind"] == "train"]
    assert records[-1]["loss"] < records[0]["loss"]
    expected = {"loss", "residual_loss", "condition_loss", "grad_norm"}
    if kind != "sc":
        expected |= {"solver_steps", "non_converged"}
    assert expected <= set(records[-1])
    assert isinstance(result.model, methods.Method) and result.model.kind == kind


def test_methods_share_the_backbone_and_start_equal():
    """With weights fixed at the solver's initial guess (ones), PI-SC is the backbone's sum."""
    backbone = PointwiseBasis(key=jr.key(0))
    data = jax.tree.map(lambda a: a[0], _data())
    sc = methods.make_method("sc", backbone, PDE, GRID)
    x = hcmoe.models.fno_input(GRID, data["u0"])
    np.testing.assert_allclose(sc(data).u, jnp.sum(backbone(x), axis=-1), rtol=1e-6)
    hc = methods.make_method("hc", backbone, PDE, GRID)
    moe = methods.make_method("moe", backbone, PDE, GRID, PARTITION)
    assert hc.partition.num_experts(GRID) == 1 and moe.partition.num_experts(GRID) == 2
    assert hc.backbone is backbone and moe.backbone is backbone and sc.backbone is backbone
    assert sc.labels() is None and np.unique(moe.labels()).tolist() == [0, 1]
    assert [m.name for m in (sc, hc, moe)] == ["PI-SC", "PI-HC", "PI-HC-MoE"]
    joint = methods.make_method("moe", backbone, PDE, GRID, PARTITION, coupling="joint")
    assert joint.name == "PI-HC-MoE (joint)"


def test_hard_methods_are_constrain():
    """'hc' and 'moe' are hcmoe.constrain of the backbone, with the solve options passed on."""
    backbone = PointwiseBasis(key=jr.key(3))
    data = jax.tree.map(lambda a: a[0], _data())
    x = hcmoe.models.fno_input(GRID, data["u0"])
    for kind, partition in (("hc", None), ("moe", PARTITION)):
        rows = hcmoe.Rows(ridge=1e-3)
        method = methods.make_method(kind, backbone, PDE, GRID, PARTITION, rows=rows)
        direct = hcmoe.constrain(backbone, PDE, partition, grid=GRID, rows=rows)(x, data)
        np.testing.assert_allclose(method(data).u, direct.u, rtol=1e-6)
        assert method.model.options == {"rows": hcmoe.Rows(ridge=1e-3)}


def test_evaluate_matches_hand_computation():
    data = _data(n=5, seed=1)
    references = np.asarray(jr.normal(jr.key(2), (5, *GRID.shape)))
    method = methods.make_method("sc", ScaledInitialCondition(jnp.asarray(1.5)), PDE, GRID)
    prediction = 1.5 * np.broadcast_to(data["u0"][:, None, :], (5, *GRID.shape))
    errors = [np.linalg.norm(p - r) / np.linalg.norm(r) for p, r in zip(prediction, references)]
    mean = sum(errors) / 5
    std = (sum((e - mean) ** 2 for e in errors) / 5) ** 0.5
    for batch_size in (2, 5, 16):  # padded last batch, one batch, batch larger than the set
        result = methods.evaluate(
            method, data, references, batch_size=batch_size, num_predictions=3
        )
        np.testing.assert_allclose(result.errors, errors, rtol=1e-5)
        np.testing.assert_allclose([result.mean, result.std], [mean, std], rtol=1e-5)
        np.testing.assert_allclose(result.predictions, prediction[:3], rtol=1e-6)
        assert result.solver_steps == 0 and result.non_converged == 0
    summary = result.summary()
    assert summary["rel_l2"] == result.mean and summary["rel_l2_std"] == result.std


def test_evaluate_reports_solver_statistics_and_other_grids():
    method = methods.make_method("moe", PointwiseBasis(key=jr.key(0)), PDE, GRID, PARTITION)
    fine = heat.make_grid(nt=9, nx=23)  # a coordinate partition applies at any resolution
    data = {"u0": heat.sample_initial_conditions(jr.key(4), 3, fine)}
    references = np.ones((3, *fine.shape))
    result = methods.evaluate(method, data, references, grid=fine, num_predictions=0)
    assert result.errors.shape == (3,) and np.all(np.isfinite(result.errors))
    assert result.solver_steps == 0  # linear PDE: one direct solve per expert
    assert result.non_converged == 0 and result.predictions.shape == (0, *fine.shape)


def test_train_writes_run_directory_and_resumes(tmp_path):
    method = methods.make_method("sc", PointwiseBasis(key=jr.key(0)), PDE, GRID)
    options = dict(
        batch_size=4,
        key=jr.key(1),
        optimizer=OPTIMIZER,
        log_every=2,
        progress=False,
        run_dir=tmp_path,
        eval_data=(_data(3, seed=5), np.ones((3, *GRID.shape))),
    )
    first = methods.train(method, _data(), steps=4, **options)
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.csv").exists()
    assert (tmp_path / "checkpoints" / "checkpoint.json").exists()
    assert any(r["kind"] == "eval" and "rel_l2" in r for r in first.history)
    resumed = methods.train(method, _data(), steps=6, **options)
    assert resumed.step == 6
    straight = methods.train(method, _data(), steps=6, **(options | {"run_dir": None}))
    for a, b in zip(jax.tree.leaves(resumed.model), jax.tree.leaves(straight.model)):
        np.testing.assert_array_equal(a, b)


def test_train_refuses_to_resume_another_configuration(tmp_path):
    # A run directory reused with other points per expert (or another method, or other
    # caller settings) must not silently continue or re-evaluate the old run.
    options = dict(
        steps=2, batch_size=4, key=jr.key(1), optimizer=OPTIMIZER, progress=False, run_dir=tmp_path
    )
    backbone = PointwiseBasis(key=jr.key(0))

    def hc(points):
        return methods.make_method(
            "hc", backbone, PDE, GRID, rows=hcmoe.Rows(points_per_expert=points)
        )

    methods.train(hc(20), _data(), settings={"seed": 0}, **options)
    with pytest.raises(ValueError, match="settings: .*points_per_expert"):
        methods.train(hc(30), _data(), settings={"seed": 0}, **options)
    with pytest.raises(ValueError, match="settings: .*method='PI-HC'.*method='PI-SC'"):
        methods.train(
            methods.make_method("sc", backbone, PDE, GRID), _data(), settings={"seed": 0}, **options
        )
    with pytest.raises(ValueError, match="settings: .*seed=0; got .*seed=1"):
        methods.train(hc(20), _data(), settings={"seed": 1}, **options)
    resumed = methods.train(hc(20), _data(), settings={"seed": 0}, **(options | {"steps": 3}))
    assert resumed.step == 3


def test_results_table_and_seconds_per_step():
    rows = [
        {
            "method": "PI-SC",
            "kind": "sc",
            "rel_l2_mean": 0.5,
            "rel_l2_std": 0.25,
            "seconds_per_step": 0.012,
            "solver_steps": 0.0,
            "non_converged": 0,
        },
        {
            "method": "PI-HC-MoE",
            "kind": "moe",
            "rel_l2_mean": 0.036,
            "rel_l2_std": 0.0293,
            "seconds_per_step": 0.5,
            "solver_steps": 7.25,
            "non_converged": 1,
        },
    ]
    table = methods.results_table(rows).splitlines()
    assert table[2] == "| PI-SC | 50.00% ± 25.00% | 12 ms | – (no solve) | 0 |"
    assert table[3] == "| PI-HC-MoE | 3.60% ± 2.93% | 500 ms | 7.2 | 1 |"
    history = [
        {"kind": "train", "steps_per_second": 0.1},  # compilation: left out
        {"kind": "eval", "rel_l2": 0.3},
        {"kind": "train", "steps_per_second": 4.0},
        {"kind": "train", "steps_per_second": 5.0},
        {"kind": "train", "steps_per_second": 2.0},
    ]
    assert methods.seconds_per_step(history) == 0.25
    assert np.isnan(methods.seconds_per_step([]))


def test_bad_configurations():
    backbone = PointwiseBasis(key=jr.key(0))
    with pytest.raises(ValueError, match="kind: expected one of"):
        methods.make_method("soft", backbone, PDE, GRID)
    with pytest.raises(ValueError, match="'moe' needs the experts' partition"):
        methods.make_method("moe", backbone, PDE, GRID)
    with pytest.raises(ValueError, match="backbone: expected an Equinox module"):
        methods.make_method("hc", lambda p, x: x, PDE, GRID)
    with pytest.raises(ValueError, match="unknown option"):
        methods.make_method("hc", backbone, PDE, GRID, point_per_expert=3)
    with pytest.raises(
        ValueError,
        match=r"the option 'ridge' moved in hcmoe 0\.2: pass "
        r"rows=hcmoe\.Rows\(ridge=\.\.\.\)",
    ):
        methods.make_method("moe", backbone, PDE, GRID, PARTITION, ridge=1e-3)
    method = methods.make_method("sc", backbone, PDE, GRID)
    with pytest.raises(ValueError, match="references: expected shape"):
        methods.evaluate(method, _data(2), np.ones((2, 3)))
    with pytest.raises(ValueError, match="data has no entry 'w0'"):
        methods.InitialConditionInput("w0")(GRID, _data(1))
    with pytest.raises(ValueError, match="single entry"):
        methods.InitialConditionInput()(GRID, {"u0": 1.0, "c": 2.0})


def test_residual_weight_scales_the_residual_only():
    backbone = ScaledInitialCondition(jnp.asarray(0.5))
    data = jax.tree.map(lambda a: a[0], _data())
    plain = methods.make_method("sc", backbone, PDE, GRID)
    weighted = methods.make_method("sc", backbone, PDE, GRID, residual_weight=3.0)
    assert isinstance(weighted.pde, methods.WeightedResidual) and weighted.pde.linear
    u = plain(data).u
    np.testing.assert_allclose(
        hcmoe.losses.residual_loss(u, weighted.pde, GRID, data),
        9.0 * hcmoe.losses.residual_loss(u, PDE, GRID, data),
        rtol=1e-10,
    )
    np.testing.assert_allclose(
        hcmoe.losses.condition_loss(u, weighted.pde, GRID, data),
        hcmoe.losses.condition_loss(u, PDE, GRID, data),
        rtol=1e-10,
    )
    hard = methods.make_method("hc", backbone, PDE, GRID, residual_weight=3.0)
    assert hard.model.pde == weighted.pde


def test_result_row():
    method = methods.make_method("sc", ScaledInitialCondition(jnp.asarray(1.0)), PDE, GRID)
    evaluation = methods.Evaluation(np.array([0.1, 0.3]), 0.2, 0.1, 0.0, 0, np.zeros((0,)))
    history = [
        {"kind": "train", "step": 10, "steps_per_second": 1.0},
        {"kind": "train", "step": 20, "steps_per_second": 4.0},
    ]
    row = methods.result_row(method, evaluation, history)
    assert row == {
        "method": "PI-SC",
        "kind": "sc",
        "rel_l2_mean": 0.2,
        "rel_l2_std": 0.1,
        "rel_l2": [0.1, 0.3],
        "solver_steps": 0.0,
        "non_converged": 0,
        "seconds_per_step": 0.25,
        "steps": 20,
    }
