"""The default solver: normal-equation Levenberg–Marquardt and the Jacobian from the stacks."""

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import hcmoe
from hcmoe._experts import build_problems
from hcmoe._levenberg_marquardt import LevenbergMarquardt
from hcmoe._solve import jacobian, residual

from .helpers import ForcedBurgers, ForcedHeat, basis_with_exact, data_for, small_grid


@pytest.mark.parametrize("pde", [ForcedBurgers(), ForcedHeat()], ids=["nonlinear", "linear"])
def test_stack_jacobian_matches_jacfwd(getkey, pde):
    grid = small_grid(nt=6, nx=9)
    basis = jr.normal(getkey(), grid.shape + (4,))
    partition = hcmoe.Partition(x=2)
    problems, _, _ = build_problems(basis, pde, grid, data_for(grid), partition, 20, getkey())
    w = jr.normal(getkey(), (4,))
    for k in range(2):
        problem = jax.tree_util.tree_map(lambda a: a[k], problems)
        expected = jax.jacfwd(residual)(w, problem, pde, data_for(grid), 1e-3)
        got = jacobian(w, problem, pde, data_for(grid), 1e-3)
        assert got.shape == expected.shape
        assert jnp.max(jnp.abs(got - expected)) < 1e-12


def test_default_solver_matches_optimistix_qr(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    options = dict(rtol=1e-10, atol=1e-10, max_steps=100)
    default = hcmoe.solve(basis, ForcedBurgers(), hcmoe.Partition(x=2), grid, data_for(grid),
                          **options)
    qr = hcmoe.solve(basis, ForcedBurgers(), hcmoe.Partition(x=2), grid, data_for(grid),
                     solver=optx.LevenbergMarquardt(rtol=1e-10, atol=1e-10), **options)
    assert bool(jnp.all(default.stats.converged))
    assert jnp.max(jnp.abs(default.weights - qr.weights)) < 1e-7
    assert jnp.max(jnp.abs(default.stats.residual_norm - qr.stats.residual_norm)) < 1e-10


def test_generic_descent_without_stack_jacobian():
    # Used on its own (no hcmoe Jacobian), the solver materialises optimistix's operator.
    def fn(y, _):
        return jnp.stack([y[0] - 1.0, 10.0 * (y[1] - y[0] ** 2), 0.1 * y[0]])

    ours = optx.least_squares(fn, LevenbergMarquardt(1e-12, 1e-12), jnp.zeros(2))
    theirs = optx.least_squares(fn, optx.LevenbergMarquardt(1e-12, 1e-12), jnp.zeros(2))
    assert np.allclose(ours.value, theirs.value, rtol=0, atol=1e-9)


def test_linear_solver_option_reaches_the_linear_path(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    qr = hcmoe.solve(basis, ForcedHeat(), hcmoe.Partition(x=2), grid, data_for(grid))
    normal = hcmoe.solve(basis, ForcedHeat(), hcmoe.Partition(x=2), grid, data_for(grid),
                         linear_solver=lx.Normal(lx.Cholesky()))
    assert jnp.max(jnp.abs(normal.weights - qr.weights)) < 1e-9


def test_search_option_is_kept_and_used(getkey):
    # The trust region given to the solver survives `with_jacobian` (what `hcmoe.solve` calls)
    # and changes the iterates' path, not the solution.
    search = optx.ClassicalTrustRegion(high_constant=50.0)
    solver = LevenbergMarquardt(1e-10, 1e-10, search=search)
    assert solver.with_jacobian(lambda y: y).search is search
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    options = dict(rtol=1e-10, atol=1e-10, max_steps=200)
    default = hcmoe.solve(basis, ForcedBurgers(), hcmoe.Partition(x=2), grid, data_for(grid),
                          **options)
    fast = hcmoe.solve(basis, ForcedBurgers(), hcmoe.Partition(x=2), grid, data_for(grid),
                       solver=solver, **options)
    assert bool(jnp.all(default.stats.converged)) and bool(jnp.all(fast.stats.converged))
    assert not np.array_equal(default.stats.num_steps, fast.stats.num_steps)
    assert jnp.max(jnp.abs(default.stats.residual_norm - fast.stats.residual_norm)) < 1e-9
