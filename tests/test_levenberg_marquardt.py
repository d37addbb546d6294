"""The default solver: normal-equation Levenberg–Marquardt and the Jacobian from the stacks."""

import functools

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


def test_initial_damping_changes_the_path_not_the_minimiser(getkey):
    # Gauss-Newton-like first steps (the default 1e-6) and optimistix's lambda = 1 reach the
    # same minimiser along other paths (here not in fewer steps for every expert).
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    options = dict(rtol=1e-10, atol=1e-10, max_steps=200)
    solve = functools.partial(hcmoe.solve, basis, ForcedBurgers(), hcmoe.Partition(x=2), grid,
                              data_for(grid), **options)
    small, one = solve(), solve(initial_damping=1.0)
    assert bool(jnp.all(small.stats.converged)) and bool(jnp.all(one.stats.converged))
    assert jnp.max(jnp.abs(small.weights - one.weights)) < 1e-7
    assert not np.array_equal(small.stats.num_steps, one.stats.num_steps)
    explicit = hcmoe.solve(basis, ForcedBurgers(), hcmoe.Partition(x=2), grid, data_for(grid),
                           solver=LevenbergMarquardt(1e-10, 1e-10, initial_damping=1.0),
                           **{k: v for k, v in options.items() if k not in ("rtol", "atol")})
    assert np.array_equal(explicit.stats.num_steps, one.stats.num_steps)


def test_trust_region_starts_at_the_initial_damping():
    state = hcmoe.TrustRegion(initial_damping=1e-3).init(jnp.zeros(2), None)
    assert float(state.step_size) == 1e3
    assert float(hcmoe.TrustRegion().init(jnp.zeros(2), None).step_size) == 1e6


def test_initial_damping_errors(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey())
    for bad in (0.0, -1.0, "small"):
        with pytest.raises(ValueError, match="initial_damping: expected a positive number"):
            hcmoe.solve(basis, ForcedBurgers(), None, grid, data_for(grid), initial_damping=bad)
    with pytest.raises(ValueError, match="initial_damping: 0.001 applies to the default solver"):
        hcmoe.solve(basis, ForcedBurgers(), None, grid, data_for(grid), initial_damping=1e-3,
                    solver=optx.LevenbergMarquardt(rtol=1e-6, atol=1e-6))
    with pytest.raises(ValueError, match="initial_damping: 0.001 applies to the default search"):
        LevenbergMarquardt(1e-6, 1e-6, initial_damping=1e-3,
                           search=optx.ClassicalTrustRegion())
    with pytest.raises(ValueError, match="initial_damping: expected a positive number"):
        hcmoe.TrustRegion(initial_damping=0.0)


def test_a_collapsed_trust_region_is_not_reported_converged(getkey):
    # A huge first damping makes the first steps tiny: the Cauchy test (step and residual
    # change within the tolerances) passes at once, at the starting weights, far from the
    # minimiser. optimistix reports success; hcmoe's stationarity check must not.
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    solve = functools.partial(hcmoe.solve, basis, ForcedBurgers(), hcmoe.Partition(x=2), grid,
                              data_for(grid), rtol=1e-4, atol=1e-4, max_steps=100)
    stalled = solve(initial_damping=1e12)
    assert bool(jnp.all(stalled.stats.result == optx.RESULTS.successful))
    assert not bool(jnp.any(stalled.stats.converged))
    assert jnp.max(jnp.abs(stalled.weights - 1.0)) < 1e-6  # it never left the start
    good = solve()
    assert bool(jnp.all(good.stats.converged))


def test_converged_experts_are_stationary(getkey):
    # The property the check enforces, recomputed from scratch: at every expert reported
    # converged, one Gauss-Newton step would lower the objective by at most rtol of it.
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    pde, data, partition = ForcedBurgers(), data_for(grid), hcmoe.Partition(x=2)
    ridge, tol = 1e-3, 1e-8
    key = getkey()
    sol = hcmoe.solve(basis, pde, partition, grid, data, key=key, points_per_expert=30,
                      rtol=tol, atol=tol, ridge=ridge, max_steps=200)
    assert bool(jnp.all(sol.stats.converged))
    problems, _, _ = build_problems(basis, pde, grid, data, partition, 30, key)
    for k in range(2):
        problem = jax.tree_util.tree_map(lambda a: a[k], problems)
        r = residual(sol.weights[k], problem, pde, data, ridge)
        jac = jax.jacfwd(residual)(sol.weights[k], problem, pde, data, ridge)
        g = r @ jac
        decrement = 0.5 * g @ jnp.linalg.solve(jac.T @ jac, g)
        assert float(decrement) <= tol * 0.5 * float(r @ r) + tol**2
