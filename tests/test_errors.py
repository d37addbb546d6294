import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hcmoe

from .helpers import ForcedBurgers, ForcedHeat, basis_with_exact, data_for, small_grid


GRID = small_grid(nt=6, nx=7)


def _basis(key):
    return basis_with_exact(GRID, key, n_basis=3)


@pytest.mark.ill_typed  # an int32 basis: hcmoe's own ValueError
def test_basis_shape_must_match_grid(getkey):
    wrong = jnp.zeros((7, 6, 3))
    with pytest.raises(ValueError, match=r"basis: expected shape \(6, 7\) plus 1 trailing axis"):
        hcmoe.solve(wrong, ForcedHeat(), None, GRID, data_for(GRID))
    with pytest.raises(ValueError, match=r"got \(6, 7\)"):
        hcmoe.solve(jnp.zeros(GRID.shape), ForcedHeat(), None, GRID, data_for(GRID))
    with pytest.raises(ValueError, match="floating-point"):
        hcmoe.solve(
            jnp.zeros(GRID.shape + (2,), jnp.int32), ForcedHeat(), None, GRID, data_for(GRID)
        )


def test_errors_raise_under_jit_and_vmap(getkey):
    wrong = jnp.zeros((2, 7, 6, 3))
    fn = jax.jit(jax.vmap(lambda b: hcmoe.solve(b, ForcedHeat(), None, GRID, data_for(GRID)).u))
    with pytest.raises(ValueError, match="basis: expected shape"):
        fn(wrong)


def test_unknown_partition_axis(getkey):
    with pytest.raises(ValueError, match=r"unknown axis 'y'; the grid has axes \('t', 'x'\)"):
        hcmoe.solve(_basis(getkey()), ForcedHeat(), hcmoe.Partition(y=2), GRID, data_for(GRID))


def test_more_experts_than_points(getkey):
    with pytest.raises(ValueError, match="8 blocks along 'x' but the grid has only 7 points"):
        hcmoe.solve(_basis(getkey()), ForcedHeat(), hcmoe.Partition(x=8), GRID, data_for(GRID))
    with pytest.raises(ValueError, match="num_experts: expected 1..42"):
        hcmoe.random_labels(GRID, 43)
    with pytest.raises(ValueError, match="positive int"):
        hcmoe.Partition(x=0)


def test_bad_label_arrays(getkey):
    with pytest.raises(ValueError, match="does not match the grid shape"):
        hcmoe.solve(
            _basis(getkey()), ForcedHeat(), np.zeros((3, 3), np.int32), GRID, data_for(GRID)
        )
    with pytest.raises(ValueError, match=r"experts \[0, 1\] own no point"):
        hcmoe.solve(_basis(getkey()), ForcedHeat(), np.full(GRID.shape, 2), GRID, data_for(GRID))
    with pytest.raises(ValueError, match="must hold integers"):
        hcmoe.LabelPartition(np.zeros(GRID.shape))


def test_missing_condition_data(getkey):
    with pytest.raises(ValueError, match=r"ForcedHeat needs data\['u0'\]; got \['w0'\]"):
        hcmoe.solve(_basis(getkey()), ForcedHeat(), None, GRID, {"w0": jnp.zeros(7)})
    # no data at all reads as an empty mapping: the same message, no bare TypeError
    with pytest.raises(ValueError, match=r"ForcedHeat needs data\['u0'\]; got \[\]"):
        hcmoe.solve(_basis(getkey()), ForcedHeat(), None, GRID)


def test_condition_target_of_wrong_shape(getkey):
    with pytest.raises(ValueError, match=r"initial condition on axis 't': target must broadcast"):
        hcmoe.solve(_basis(getkey()), ForcedHeat(), None, GRID, {"u0": jnp.zeros(5)})


def test_sampling_needs_a_key_and_positive_points(getkey):
    with pytest.raises(ValueError, match="key: points_per_expert=5 samples points"):
        hcmoe.solve(
            _basis(getkey()),
            ForcedHeat(),
            None,
            GRID,
            data_for(GRID),
            rows=hcmoe.Rows(points_per_expert=5),
        )
    with pytest.raises(ValueError, match="points_per_expert: expected a positive int"):
        hcmoe.solve(
            _basis(getkey()),
            ForcedHeat(),
            None,
            GRID,
            data_for(GRID),
            rows=hcmoe.Rows(points_per_expert=0),
        )


def test_init_shape(getkey):
    with pytest.raises(ValueError, match=r"init: expected shape \(3,\) or \(2, 3\)"):
        hcmoe.solve(
            _basis(getkey()),
            ForcedHeat(),
            hcmoe.Partition(x=2),
            GRID,
            data_for(GRID),
            init=jnp.ones(4),
        )


def test_float64_requested_with_x64_off(getkey, monkeypatch):
    from hcmoe import _solve

    monkeypatch.setattr(_solve, "_WARNED_FLOAT32", [])  # its warning is shown once a process
    basis = np.asarray(_basis(getkey()), np.float32)
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            hcmoe.solve(
                jnp.asarray(basis), ForcedHeat(), None, GRID, data_for(GRID), precision="float64"
            )
        # the default falls back to float32 (and says so, hcmoe 0.2) and still solves
        data = {"u0": jnp.asarray(np.asarray(data_for(GRID)["u0"]), jnp.float32)}
        with pytest.warns(hcmoe.PrecisionWarning, match="64-bit JAX is off"):
            sol = hcmoe.solve(jnp.asarray(basis), ForcedHeat(), None, GRID, data)
        assert sol.u.dtype == jnp.float32 and bool(jnp.all(sol.stats.converged))
    finally:
        jax.config.update("jax_enable_x64", True)
    with pytest.raises(ValueError, match="precision: expected one of"):
        hcmoe.solve(_basis(getkey()), ForcedHeat(), None, GRID, data_for(GRID), precision="bf16")


def test_non_finite_basis_is_an_error_not_a_silent_nan(getkey):
    basis = _basis(getkey()).at[2, 3, 1].set(jnp.nan)
    with pytest.raises(Exception, match="basis contains NaN or inf"):
        jax.block_until_ready(hcmoe.solve(basis, ForcedHeat(), None, GRID, data_for(GRID)).u)
    fn = eqx.filter_jit(lambda b: hcmoe.solve(b, ForcedBurgers(), None, GRID, data_for(GRID)).u)
    with pytest.raises(Exception, match="basis contains NaN or inf"):
        jax.block_until_ready(fn(basis))
    # Also when only the weights are used (the check sits on them, not on `u` alone).
    fn = eqx.filter_jit(
        lambda b: (
            hcmoe.solve(b, ForcedBurgers(), hcmoe.Partition(x=2), GRID, data_for(GRID)).weights
        )
    )
    with pytest.raises(Exception, match="basis contains NaN or inf"):
        jax.block_until_ready(fn(basis))


def test_pde_without_operators(getkey):
    class Empty(ForcedHeat):
        def operators(self):
            return {}

    with pytest.raises(ValueError, match="Empty.operators\\(\\) returned no operators"):
        hcmoe.solve(_basis(getkey()), Empty(), None, GRID, data_for(GRID))


def test_operator_validation():
    with pytest.raises(ValueError, match="order must be an int >= 1"):
        hcmoe.ops.FiniteDifference("x", order=0)
    with pytest.raises(ValueError, match="accuracy must be an even int"):
        hcmoe.ops.FiniteDifference("x", accuracy=3)
    with pytest.raises(ValueError, match="needs 7 points along the axis; the grid has 4"):
        hcmoe.ops.FiniteDifference("x", order=2, accuracy=6)(
            jnp.zeros(4), hcmoe.uniform_grid(x=(0, 1, 4))
        )
    with pytest.raises(TypeError, match="expected an hcmoe operator"):
        hcmoe.ops.Identity() + 1.0
