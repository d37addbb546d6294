"""The formulation of diffusion–sorption decides what training can reach: the exact minimiser
of its physics loss must be close to the reference solution."""

import jax.numpy as jnp
import numpy as np
import pytest

import hcmoe
from hcmoe import losses, methods, ops
from hcmoe.problems import diffusion_sorption as ds


TIGHT = dict(
    rows=hcmoe.Rows(ridge=1e-8),
    max_steps=100,
    solver=hcmoe.LevenbergMarquardt(rtol=1e-8, atol=1e-8),
)


def _discrete_solution(pde, grid, u0):
    """The exact minimiser of the physics loss: one weight per grid point (identity basis)."""
    n = grid.size
    basis = jnp.eye(n).reshape(grid.shape + (n,))
    weighted = methods.WeightedResidual(pde, 500.0)
    sol = hcmoe.solve(basis, weighted, None, grid, {"u0": u0}, **TIGHT, init=jnp.full((n,), 0.5))
    return sol.u


@pytest.mark.parametrize("level", [0.05, 0.15])
def test_default_formulation_minimiser_is_close_to_the_reference(level):
    grid = ds.make_grid(nt=7, nx=12)
    reference = ds.reference_solution(level, grid)
    u0 = reference[0]
    good = _discrete_solution(ds.formulation("hcmoe"), grid, u0)
    error = float(losses.relative_l2(good, reference))
    assert error < 0.06, error  # 3.0% and 5.2% measured (boundary weight 10)
    np.testing.assert_allclose(good[0], u0, atol=1e-12)  # the IC holds by construction
    # Leaving the first step's rows out frees that level: the minimiser drifts away.
    n = grid.size
    basis = jnp.eye(n).reshape(grid.shape + (n,))
    loose = hcmoe.solve(
        basis,
        methods.WeightedResidual(ds.formulation("hcmoe", initial_layer=90.0), 500.0),
        None,
        grid,
        {"u0": u0},
        **TIGHT,
        init=jnp.full((n,), 0.5),
    ).u
    assert float(losses.relative_l2(loose, reference)) > 2 * error


def test_reference_meets_the_ghost_cell_boundary_rows():
    grid = ds.make_grid(nt=11, nx=32)
    reference = ds.reference_solution(0.1, grid)
    data = {"u0": reference[0]}

    def inflow_error(pde):
        inflow = pde.conditions(grid, data)[1]
        face = inflow.operator(reference, grid)[:, 0]
        return float(jnp.max(jnp.abs(face - inflow.target_on_face(grid))[1:]))

    ghost, cell = inflow_error(ds.formulation("hcmoe")), inflow_error(ds.formulation("paper"))
    assert ghost < 1e-3 < 0.05 < cell, (ghost, cell)


def test_backward_difference_is_exact_for_low_degree_polynomials():
    grid = hcmoe.uniform_grid(t=(0.0, 2.0, 9), x=(0.0, 1.0, 3))
    t = jnp.asarray(grid.mesh()["t"])
    linear = ops.BackwardDifference("t", accuracy=1)(3.0 * t + 1.0, grid)
    np.testing.assert_allclose(linear, 3.0, atol=1e-12)
    quadratic = ops.BackwardDifference("t", accuracy=2)(t**2, grid)
    # BDF2 from the third point on; BDF1 on the second (error dt); forward at the first.
    np.testing.assert_allclose(quadratic[2:], 2.0 * t[2:], atol=1e-12)
    np.testing.assert_allclose(quadratic[1], (t[1] ** 2 - t[0] ** 2) / 0.25, atol=1e-12)
    np.testing.assert_allclose(quadratic[0], 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="periodic"):
        ops.BackwardDifference("x")(
            t, hcmoe.uniform_grid(t=(0, 1, 3), x=(0, 1, 4), periodic=("x",))
        )
