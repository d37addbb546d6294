"""`solve(..., rows=hcmoe.Rows(ridge_toward=...))`: the ridge rows pull the weights toward zero
or toward `init`."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import hcmoe

from .helpers import (
    ForcedBurgers,
    ForcedHeat,
    basis_with_exact,
    data_for,
    finite_difference_jvp,
    small_grid,
)


def _duplicated_basis(grid, key):
    """A basis whose columns 0 and 1 are equal: only `w_0 + w_1` is determined by the rows,
    the difference `w_0 - w_1` only by the ridge."""
    basis = basis_with_exact(grid, key, n_basis=4)
    return jnp.concatenate([basis[..., :1], basis], axis=-1)


@pytest.mark.parametrize("pde", [ForcedHeat(), ForcedBurgers()], ids=["linear", "nonlinear"])
@pytest.mark.parametrize("blocks", [dict(), dict(x=2)])
def test_undetermined_direction_goes_to_zero_or_keeps_init(getkey, pde, blocks):
    grid = small_grid()
    basis = _duplicated_basis(grid, getkey())
    init = jnp.array([1.0, 3.0, 1.0, 1.0, 1.0])
    options = dict(
        solver=hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12), max_steps=400, init=init
    )
    partition = hcmoe.Partition(**blocks)
    toward = {
        name: hcmoe.solve(
            basis,
            pde,
            partition,
            grid,
            data_for(grid),
            rows=hcmoe.Rows(ridge=1e-3, ridge_toward=name),
            **options,
        )
        for name in ("zero", "init")
    }
    # The determined part is the same: both recover the exact field to the ridge's bias.
    for sol in toward.values():
        np.testing.assert_allclose(sol.u, toward["zero"].u, atol=1e-5)
    difference = {name: sol.weights[:, 0] - sol.weights[:, 1] for name, sol in toward.items()}
    if pde.linear:  # a direct solve: the minimum-norm difference is exactly 0
        np.testing.assert_allclose(difference["zero"], 0.0, atol=1e-8)
    # toward init: the undetermined difference keeps init's, -2 (LM's steps have no
    # component along it when the ridge rows are centred on the start).
    np.testing.assert_allclose(difference["init"], -2.0, atol=1e-8)
    assert bool(jnp.all(toward["init"].stats.converged))


def test_large_ridge_toward_init_returns_init(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey(), n_basis=4) + 0.1 * jr.normal(
        getkey(), grid.shape + (4,)
    )
    init = jr.normal(getkey(), (4,))
    tight = hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12)
    sol = hcmoe.solve(
        basis,
        ForcedBurgers(),
        None,
        grid,
        data_for(grid),
        init=init,
        rows=hcmoe.Rows(ridge=1e6, ridge_toward="init"),
        solver=tight,
        max_steps=100,
    )
    np.testing.assert_allclose(sol.weights[0], init, atol=1e-6)
    far = hcmoe.solve(
        basis,
        ForcedBurgers(),
        None,
        grid,
        data_for(grid),
        init=init,
        rows=hcmoe.Rows(ridge=1e6),
        solver=tight,
        max_steps=100,
    )
    np.testing.assert_allclose(far.weights[0], 0.0, atol=1e-6)


@pytest.mark.parametrize("coupling", ["independent", "joint"])
def test_gradient_toward_init_matches_finite_differences(getkey, coupling):
    grid = small_grid(nt=7, nx=9)
    basis = basis_with_exact(grid, getkey(), n_basis=4) + 0.05 * jr.normal(
        getkey(), grid.shape + (4,)
    )
    readout = jr.normal(getkey(), grid.shape)
    init = 1.0 + 0.5 * jr.normal(getkey(), (4,))

    def loss(b):
        sol = hcmoe.solve(
            b,
            ForcedBurgers(),
            hcmoe.Partition(x=2, overlap=0.2),
            grid,
            data_for(grid),
            init=init,
            rows=hcmoe.Rows(ridge=1e-3, ridge_toward="init"),
            coupling=coupling,
            solver=hcmoe.LevenbergMarquardt(rtol=1e-13, atol=1e-13),
            max_steps=200,
        )
        return jnp.sum(sol.u * readout)

    direction = jr.normal(getkey(), basis.shape)
    analytic = jnp.sum(jax.grad(loss)(basis) * direction)
    numeric = finite_difference_jvp(loss, basis, direction, eps=1e-5)
    assert jnp.abs(analytic - numeric) <= 1e-5 * (1 + jnp.abs(numeric))


def test_unknown_ridge_toward_is_a_clear_error(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey(), n_basis=3)
    with pytest.raises(ValueError, match="ridge_toward: expected one of"):
        hcmoe.solve(
            basis, ForcedHeat(), None, grid, data_for(grid), rows=hcmoe.Rows(ridge_toward="ones")
        )
