"""Expert schedules: batched (`vmap`) and sequential (`map`) solves agree."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import hcmoe
from hcmoe._execution import MAP_MIN_WORK, resolve_schedule
from hcmoe._solve import SOLVE_OPTIONS

from .helpers import ForcedBurgers, ForcedHeat, basis_with_exact, data_for, small_grid


pytestmark = pytest.mark.filterwarnings("ignore::hcmoe.ConditionWarning")
OPTIONS = dict(
    solver=hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12),
    max_steps=100,
    rows=hcmoe.Rows(ridge=1e-3),
)
# The same, with 15 sampled PDE points per expert.
SAMPLED = OPTIONS | {"rows": hcmoe.Rows(points_per_expert=15, ridge=1e-3)}


def _problem(getkey):
    grid = small_grid(nt=7, nx=12)
    basis = basis_with_exact(grid, getkey()) + 0.1 * jr.normal(getkey(), grid.shape + (5,))
    return grid, basis


@pytest.mark.parametrize("pde", [ForcedBurgers(), ForcedHeat()], ids=["nonlinear", "linear"])
def test_map_equals_vmap(getkey, pde):
    grid, basis = _problem(getkey)
    partition = hcmoe.Partition(t=2, x=2)
    key = getkey()
    sols = {
        s: hcmoe.solve(
            basis,
            pde,
            partition,
            grid,
            data_for(grid),
            key=key,
            coupling=hcmoe.Independent(schedule=s),
            **SAMPLED,
        )
        for s in ("vmap", "map")
    }
    vmapped, mapped = sols["vmap"], sols["map"]
    assert bool(jnp.all(vmapped.stats.converged)) and bool(jnp.all(mapped.stats.converged))
    # Batched and sequential programs round differently, and LM at rtol = atol = 1e-12 stops
    # wherever its last step falls below that: the iterates agree to ~1e-10 (1.1e-10 seen on
    # one machine), the residual norms (the objective) much closer.
    np.testing.assert_allclose(mapped.weights, vmapped.weights, rtol=0, atol=1e-8)
    np.testing.assert_allclose(mapped.u, vmapped.u, rtol=0, atol=1e-8)
    np.testing.assert_allclose(
        mapped.stats.residual_norm, vmapped.stats.residual_norm, rtol=1e-10, atol=1e-12
    )
    np.testing.assert_array_equal(mapped.stats.points, vmapped.stats.points)
    assert jnp.array_equal(mapped.stats.converged, vmapped.stats.converged)


def test_map_gradient_equals_vmap_gradient(getkey):
    grid, basis = _problem(getkey)
    partition = hcmoe.Partition(x=3)
    readout = jr.normal(getkey(), grid.shape)

    def loss(b, schedule):
        sol = hcmoe.solve(
            b,
            ForcedBurgers(),
            partition,
            grid,
            data_for(grid),
            **OPTIONS,
            coupling=hcmoe.Independent(schedule=schedule),
        )
        return jnp.sum(sol.u * readout) + jnp.sum(sol.weights**2)

    grads = {s: jax.jit(jax.grad(loss), static_argnums=1)(basis, s) for s in ("vmap", "map")}
    scale = float(jnp.max(jnp.abs(grads["vmap"])))
    # The two schedules stop at iterates that agree to ~1e-10 (test above), and the implicit
    # gradient at an iterate amplifies that: 4.6e-8 seen at scale 6.8 on one machine (AMD EPYC,
    # 2 cores), 1e-9 on others. A wrong adjoint on either path is off by O(scale).
    assert float(jnp.max(jnp.abs(grads["map"] - grads["vmap"]))) <= 1e-7 * (1 + scale)


def test_map_under_batch_vmap_and_wrappers(getkey):
    grid, basis = _problem(getkey)
    bases = jnp.stack([basis, basis + 0.05 * jr.normal(getkey(), basis.shape)])
    data = {"u0": jnp.stack([data_for(grid)["u0"]] * 2)}
    partition = hcmoe.Partition(x=2)

    def backbone(params, x):
        return x * params

    model = hcmoe.constrain(backbone, ForcedBurgers(), partition, grid=grid, **OPTIONS)
    vmapped = model(1.0, bases, data, coupling=hcmoe.Independent(schedule="vmap"))
    mapped = model(1.0, bases, data, coupling=hcmoe.Independent(schedule="map"))
    np.testing.assert_allclose(mapped.weights, vmapped.weights, rtol=0, atol=1e-8)
    assert mapped.weights.shape == (2, 2, 5)


def test_schedule_option_and_errors(getkey):
    assert "coupling" in SOLVE_OPTIONS and "schedule" not in SOLVE_OPTIONS
    assert hcmoe.Independent().schedule == "auto"
    large = "map" if jax.default_backend() == "cpu" else "vmap"
    assert resolve_schedule("auto") == large
    assert resolve_schedule("auto", work=MAP_MIN_WORK) == large
    assert resolve_schedule("auto", work=MAP_MIN_WORK - 1) == "vmap"  # small: batched
    assert resolve_schedule("auto", linear=True) == "vmap"  # no loop to wait on
    assert resolve_schedule("vmap") == "vmap" and resolve_schedule("map") == "map"
    grid, basis = _problem(getkey)
    with pytest.raises(
        ValueError,
        match=r"schedule: expected one of \('auto', 'vmap', 'map'\); "
        r"got 'serial'",
    ):
        hcmoe.solve(
            basis,
            ForcedBurgers(),
            None,
            grid,
            data_for(grid),
            coupling=hcmoe.Independent(schedule="serial"),
        )
    with pytest.raises(
        ValueError,
        match=r"the option 'schedule' moved in hcmoe 0\.2: pass "
        r"coupling=hcmoe\.Independent\(schedule=\.\.\.\)",
    ):
        hcmoe.constrain(lambda p, x: x, ForcedBurgers(), None, grid=grid, schedule="map")


def test_unknown_schedule_fails_at_wrap_time():
    grid = small_grid()
    with pytest.raises(ValueError, match="schedule: expected one of"):
        hcmoe.constrain(
            lambda p, x: x,
            ForcedBurgers(),
            None,
            grid=grid,
            coupling=hcmoe.Independent(schedule="loop"),
        )


def test_auto_batches_small_problems(getkey):
    # 15 rows x 5 basis functions per expert is far below MAP_MIN_WORK: "auto" traces the
    # batched program, not the sequential one (lax.map: one more scan).
    grid, basis = _problem(getkey)
    key = getkey()

    def program(schedule):
        return str(
            jax.make_jaxpr(
                lambda b: (
                    hcmoe.solve(
                        b,
                        ForcedBurgers(),
                        hcmoe.Partition(x=2),
                        grid,
                        data_for(grid),
                        key=key,
                        coupling=hcmoe.Independent(schedule=schedule),
                        **SAMPLED,
                    ).u
                )
            )(basis)
        )

    batched, sequential = program("vmap"), program("map")
    assert sequential.count(" scan[") == batched.count(" scan[") + 1
    assert program("auto") == batched
