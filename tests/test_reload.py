"""Reloading a trained method and evaluating it with other solve options (issue 34 item 8)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import hcmoe
from hcmoe import methods, training
from hcmoe.problems import heat


GRID = heat.make_grid(nt=9, nx=12)
PDE = hcmoe.problems.Heat(kappa=0.1)
PARTITION = hcmoe.Partition(t=1, x=2)
OPTIMIZER = optax.adam(1e-2)


class PointwiseBasis(eqx.Module):
    """The same small MLP at every grid point, `(*grid, channels) -> (*grid, N)`."""

    mlp: eqx.nn.MLP

    def __init__(self, *, key):
        self.mlp = eqx.nn.MLP(3, 4, width_size=8, depth=1, key=key)

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1])
        return jax.vmap(self.mlp)(flat).reshape(x.shape[:-1] + (-1,))


def _data(n=6, seed=0):
    return {"u0": np.asarray(heat.sample_initial_conditions(jr.key(seed), n, GRID), np.float32)}


def _method(seed):
    return methods.make_method(
        "moe",
        PointwiseBasis(key=jr.key(seed)),
        PDE,
        GRID,
        PARTITION,
        rows=hcmoe.Rows(points_per_expert=20),
    )


def test_load_returns_the_trained_method(tmp_path):
    data = _data()
    result = methods.train(
        _method(0),
        data,
        steps=3,
        batch_size=2,
        key=jr.key(1),
        optimizer=OPTIMIZER,
        run_dir=tmp_path,
        progress=False,
    )
    loaded = methods.load(_method(7), tmp_path)  # fresh parameters, same architecture
    trained = methods.predict(result.model, data)
    again = methods.predict(loaded, data)
    assert bool(jnp.all(trained.u == again.u))
    fresh = methods.predict(_method(7), data)
    assert not bool(jnp.all(fresh.u == again.u))
    checkpoint = training.load_checkpoint(tmp_path / "checkpoints", _method(7))
    assert checkpoint is not None and checkpoint.step == 3 and checkpoint.opt_state is None


def test_load_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_dir: no checkpoint in"):
        methods.load(_method(0), tmp_path)


def test_evaluation_takes_solve_options_and_prints_briefly():
    method = _method(0)
    data = _data(4)
    references = np.asarray(
        jax.vmap(lambda u0: heat.reference_solution(u0, GRID))(jnp.asarray(data["u0"], jnp.float64))
    )
    sampled = methods.evaluate(method, data, references)
    everything = methods.evaluate(method, data, references, rows=hcmoe.Rows())
    assert sampled.errors.shape == everything.errors.shape == (4,)
    assert not np.array_equal(sampled.errors, everything.errors)  # other rows, other fit
    by_call = method(jax.tree.map(lambda x: x[0], data), rows=hcmoe.Rows())
    assert bool(jnp.all(by_call.stats.points[0] >= 0))  # every point, no padding
    text = repr(everything)
    assert text.startswith("Evaluation(n=4, mean=") and "predictions=(1, 9, 12)" in text
    assert len(text) < 200
    with pytest.raises(ValueError, match="PI-SC .* solves nothing"):
        methods.make_method("sc", PointwiseBasis(key=jr.key(0)), PDE, GRID)(
            jax.tree.map(lambda x: x[0], data), rows=hcmoe.Rows()
        )
