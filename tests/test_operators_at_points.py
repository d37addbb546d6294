"""Operators evaluated at sampled points equal the whole-grid operators gathered there."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import hcmoe
from hcmoe import ops
from hcmoe._ops import flat_field, operators_at_points


def _close(a, b, tol=1e-12):
    # float64 rounding, relative to the size of the values (third derivatives reach 1e3)
    return bool(jnp.max(jnp.abs(a - b)) <= tol * (1.0 + jnp.max(jnp.abs(b))))


def _grid(periodic):
    axes = dict(t=(0.0, 1.0, 7), x=(0.0, 2.0, 10), y=(0.0, 1.0, 6))
    return hcmoe.uniform_grid(**axes, periodic=periodic)


LOCAL = {
    "identity": ops.Identity(),
    "d_t": ops.FiniteDifference("t"),
    "d_xx": ops.FiniteDifference("x", order=2),
    "d_y4": ops.FiniteDifference("y", order=1, accuracy=4),
    "d_xxx": ops.FiniteDifference("x", order=3),
    "backward_t": ops.BackwardDifference("t", accuracy=2),
    "backward_t3": ops.BackwardDifference("t", accuracy=3),
    "combination": 2.0 * ops.Identity() - 0.5 * ops.FiniteDifference("x")
    + ops.FiniteDifference("y", order=2),
    "laplacian_fd": ops.Laplacian(("x", "y"), method="fd"),
    "compose": ops.Compose(ops.FiniteDifference("t"), ops.FiniteDifference("x")),
    "user": ops.Linear(lambda f, g: jnp.cumsum(f, axis=g.axis("x"))),
}
SPECTRAL = {
    "spectral_x": ops.Spectral("x"),
    "spectral_yy": ops.Spectral("y", order=2),
    "spectral_x3": ops.Spectral("x", order=3),
    "laplacian": ops.Laplacian(("x", "y")),
    "inverse_laplacian": ops.InverseLaplacian(("x", "y")),
    "u": ops.VelocityFromVorticity("u"),
    "v": ops.VelocityFromVorticity("v"),
    "spectral_mix": ops.Spectral("x") - 0.1 * ops.Laplacian(("x", "y")),
    "mixed": ops.Identity() + ops.Spectral("y"),
}


def _points(grid, key, shape):
    # Random points, plus every edge and corner of the grid.
    edges = np.flatnonzero(
        np.any([np.isin(np.indices(grid.shape)[a], [0, 1, n - 2, n - 1])
                for a, n in enumerate(grid.shape)], axis=0))
    rand = jr.randint(key, shape, 0, grid.size)
    return rand, jnp.asarray(edges)


@pytest.mark.parametrize("periodic", [(), ("x",), ("x", "y")], ids=["none", "x", "xy"])
@pytest.mark.parametrize("trailing", [(), (3,)], ids=["field", "basis"])
def test_local_operators_at_points_equal_full_grid(getkey, periodic, trailing):
    grid = _grid(periodic)
    field = jr.normal(getkey(), grid.shape + trailing)
    for points in _points(grid, getkey(), (2, 25)):
        for name, op in LOCAL.items():
            expected = flat_field(op(field, grid), grid)[points]
            got = op.at_points(field, grid, points)
            assert got.shape == points.shape + trailing, name
            assert _close(got, expected), name


@pytest.mark.parametrize("trailing", [(), (3,)], ids=["field", "basis"])
def test_spectral_operators_share_one_fft(getkey, trailing):
    grid = _grid(("x", "y"))
    field = jr.normal(getkey(), grid.shape + trailing)
    points = jr.randint(getkey(), (3, 17), 0, grid.size)
    operators = LOCAL | SPECTRAL
    got = operators_at_points(operators, field, grid, points)
    for name, op in operators.items():
        expected = flat_field(op(field, grid), grid)[points]
        assert got[name].shape == points.shape + trailing
        assert _close(got[name], expected), name
        assert _close(op.at_points(field, grid, points), expected), name


def _complex_fft_reference(op, field, grid):
    # The spectral operators as complex FFTs (the definition), to check the real-FFT path.
    names, symbol = op.fourier_symbol(grid)
    axes = tuple(grid.axis(a) for a in names)
    symbol = symbol.reshape(symbol.shape + (1,) * (field.ndim - grid.ndim))
    return jnp.fft.ifftn(jnp.fft.fftn(field, axes=axes) * symbol, axes=axes).real


@pytest.mark.parametrize("sizes", [(10, 6), (9, 7)], ids=["even", "odd"])
def test_real_fft_equals_complex_fft(getkey, sizes):
    grid = hcmoe.uniform_grid(t=(0.0, 1.0, 3), x=(0.0, 1.0, sizes[0]), y=(0.0, 1.0, sizes[1]),
                              periodic=("x", "y"))
    field = jr.normal(getkey(), grid.shape + (2,))
    for name, op in SPECTRAL.items():
        if op.fourier_symbol(grid) is None:
            continue
        expected = _complex_fft_reference(op, field, grid)
        assert _close(op(field, grid), expected), name


def test_gradients_through_points_equal_full_grid(getkey):
    grid = _grid(("x",))
    field = jr.normal(getkey(), grid.shape + (3,))
    points = jr.randint(getkey(), (40,), 0, grid.size)
    cotangent = jr.normal(getkey(), (40, 3))
    for name, op in (LOCAL | {"spectral_x": ops.Spectral("x")}).items():
        def full(f, op=op):
            return jnp.sum(flat_field(op(f, grid), grid)[points] * cotangent)

        def sampled(f, op=op):
            return jnp.sum(op.at_points(f, grid, points) * cotangent)

        assert _close(jax.grad(sampled)(field), jax.grad(full)(field)), name


def test_custom_operator_falls_back_to_full_grid(getkey):
    class Shift(ops.AbstractOperator):
        def __call__(self, field, grid):
            return jnp.roll(field, 1, axis=grid.axis("x"))

    grid = _grid(())
    field = jr.normal(getkey(), grid.shape)
    points = jnp.arange(0, grid.size, 7)
    op = 3.0 * Shift() + ops.FiniteDifference("t")
    assert op.point_stencil(grid, points) is None
    expected = flat_field(op(field, grid), grid)[points]
    assert _close(op.at_points(field, grid, points), expected)
