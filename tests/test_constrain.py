import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest
from flax import nnx

import hcmoe

from .helpers import ForcedHeat, data_for, exact_field, small_grid


GRID = small_grid(nt=6, nx=7)
N_BASIS = 4
FEATURES = 3
PARTITION = hcmoe.Partition(x=2)


def _target():
    return exact_field(GRID)


def _loss_of(solution):
    return jnp.mean((solution.u - _target()) ** 2)


def _reshape(flat):
    return flat.reshape(flat.shape[:-1] + GRID.shape + (N_BASIS,))


class EqxBackbone(eqx.Module):
    mlp: eqx.nn.MLP

    def __init__(self, key):
        self.mlp = eqx.nn.MLP(FEATURES, GRID.size * N_BASIS, 16, 1, key=key)

    def __call__(self, x):
        return _reshape(self.mlp(x))


def _train(step, state, n=20):
    losses = []
    for _ in range(n):
        state, loss = step(state)
        losses.append(float(loss))
    return losses


def test_equinox_wrapper_trains(getkey):
    model = hcmoe.constrain(EqxBackbone(getkey()), ForcedHeat(), PARTITION, grid=GRID)
    assert isinstance(model, eqx.Module)
    x, data = jr.normal(getkey(), (FEATURES,)), data_for(GRID)
    optim = optax.adam(3e-2)

    @eqx.filter_jit
    def step(state):
        model, opt_state = state
        loss, grads = eqx.filter_value_and_grad(lambda m: _loss_of(m(x, data)))(model)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return (eqx.apply_updates(model, updates), opt_state), loss

    losses = _train(step, (model, optim.init(eqx.filter(model, eqx.is_array))))
    assert losses[-1] < 0.85 * losses[0]


def test_nnx_wrapper_trains(getkey):
    class Backbone(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(FEATURES, 16, rngs=rngs)
            self.out = nnx.Linear(16, GRID.size * N_BASIS, rngs=rngs)

        def __call__(self, x):
            return _reshape(self.out(jax.nn.tanh(self.hidden(x))))

    backbone = Backbone(nnx.Rngs(0))
    model = hcmoe.constrain(backbone, ForcedHeat(), PARTITION, grid=GRID)
    assert isinstance(model, nnx.Module)
    x, data = jr.normal(getkey(), (FEATURES,)), data_for(GRID)
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: _loss_of(m(x, data)))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(20)]
    assert losses[-1] < 0.85 * losses[0]


def test_linen_wrapper_trains(getkey):
    class Backbone(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = jax.nn.tanh(linen.Dense(16)(x))
            return _reshape(linen.Dense(GRID.size * N_BASIS)(h))

    model = hcmoe.constrain(Backbone(), ForcedHeat(), PARTITION, grid=GRID)
    assert isinstance(model, linen.Module)
    x, data = jr.normal(getkey(), (FEATURES,)), data_for(GRID)
    params = model.init(jr.key(0), x, data)
    optim = optax.adam(3e-2)

    @jax.jit
    def step(state):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: _loss_of(model.apply(p, x, data)))(params)
        updates, opt_state = optim.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    losses = _train(step, (params, optim.init(params)))
    assert losses[-1] < 0.85 * losses[0]


def test_function_wrapper_trains(getkey):
    def backbone(params, x):
        return _reshape(jnp.tanh(x @ params["w1"]) @ params["w2"])

    params = {
        "w1": jr.normal(getkey(), (FEATURES, 16)),
        "w2": 0.25 * jr.normal(getkey(), (16, GRID.size * N_BASIS)),
    }
    model = hcmoe.constrain(backbone, ForcedHeat(), PARTITION, grid=GRID)
    x, data = jr.normal(getkey(), (FEATURES,)), data_for(GRID)
    optim = optax.adam(3e-2)

    @jax.jit
    def step(state):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: _loss_of(model(p, x, data)))(params)
        updates, opt_state = optim.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    losses = _train(step, (params, optim.init(params)))
    assert losses[-1] < 0.85 * losses[0]


def test_batched_backbone_equals_per_sample_calls(getkey):
    backbone = EqxBackbone(getkey())
    batched = eqx.filter_vmap(backbone)  # a backbone that takes and returns a batch
    model = hcmoe.constrain(backbone, ForcedHeat(), PARTITION, grid=GRID)
    model_batched = hcmoe.constrain(batched, ForcedHeat(), PARTITION, grid=GRID)
    xs = jr.normal(getkey(), (3, FEATURES))
    u0 = data_for(GRID)["u0"]
    data = {"u0": jnp.stack([u0, 2 * u0, -u0])}
    together = model_batched(xs, data)
    assert together.u.shape == (3,) + GRID.shape and together.weights.shape == (3, 2, N_BASIS)
    for i in range(3):
        alone = model(xs[i], {"u0": data["u0"][i]})
        assert jnp.max(jnp.abs(alone.u - together.u[i])) < 1e-12
    with pytest.raises(ValueError, match="leading batch axis of 3"):
        model_batched(xs, {"u0": u0})


def test_call_time_grid_override(getkey):
    fine = small_grid(nt=11, nx=13)

    class AnyGrid(eqx.Module):
        def __call__(self, grid):
            mesh = grid.mesh()
            t, x = jnp.asarray(mesh["t"]), jnp.asarray(mesh["x"])
            return jnp.stack([exact_field(grid), jnp.sin(3 * x) * t, x * t**2], -1)

    model = hcmoe.constrain(
        AnyGrid(), ForcedHeat(), PARTITION, grid=GRID, rows=hcmoe.Rows(ridge=0.0)
    )
    coarse_sol = model(GRID, data_for(GRID))
    fine_sol = model(fine, data_for(fine), grid=fine)
    assert fine_sol.u.shape == fine.shape
    assert jnp.max(jnp.abs(coarse_sol.u - exact_field(GRID))) < 1e-8
    assert jnp.max(jnp.abs(fine_sol.u - exact_field(fine))) < 1e-8


@pytest.mark.ill_typed  # e.g. pde="heat": hcmoe's own ValueError
def test_constrain_rejects_bad_configuration(getkey):
    with pytest.raises(ValueError, match="unknown option"):
        hcmoe.constrain(EqxBackbone(getkey()), ForcedHeat(), PARTITION, grid=GRID, tol=1e-3)
    with pytest.raises(
        ValueError,
        match=r"constrain: the option 'ridge' moved in hcmoe 0\.2: "
        r"pass rows=hcmoe\.Rows\(ridge=\.\.\.\)",
    ):
        hcmoe.constrain(EqxBackbone(getkey()), ForcedHeat(), PARTITION, grid=GRID, ridge=0.0)
    with pytest.raises(
        ValueError,
        match=r"constrain: rows: expected an hcmoe\.Rows\(\.\.\.\); "
        "got dict",
    ):
        hcmoe.constrain(
            EqxBackbone(getkey()), ForcedHeat(), PARTITION, grid=GRID, rows={"ridge": 0.0}
        )
    with pytest.raises(ValueError, match="coupling: expected hcmoe.Independent"):
        hcmoe.constrain(
            EqxBackbone(getkey()), ForcedHeat(), PARTITION, grid=GRID, coupling="joints"
        )
    with pytest.raises(ValueError, match="pde: expected an hcmoe.AbstractPDE"):
        hcmoe.constrain(EqxBackbone(getkey()), "heat", PARTITION, grid=GRID)
    with pytest.raises(ValueError, match="unknown axis 'y'"):
        hcmoe.constrain(EqxBackbone(getkey()), ForcedHeat(), hcmoe.Partition(y=2), grid=GRID)
    with pytest.raises(ValueError, match="model: expected"):
        hcmoe.constrain(42, ForcedHeat(), PARTITION, grid=GRID)
