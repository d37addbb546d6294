"""Shared test problems with exact discrete solutions, and numerical helpers."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import hcmoe
from hcmoe import ops


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    return eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol) is True


def finite_difference_jvp(fn, x, direction, eps=1e-6):
    """Central finite-difference directional derivative of `fn` at `x`."""
    return (fn(x + eps * direction) - fn(x - eps * direction)) / (2 * eps)


# The exact solutions below are quadratic along x and linear along t, so second-order finite
# differences (central inside, one-sided at the edges) reproduce their derivatives exactly and
# the discrete PDE residual of the exact solution is zero to rounding.


def exact_u(t, x):
    return 1.0 + 0.5 * t + 0.3 * x + 0.2 * x**2 + 0.1 * t * x**2


def exact_u_t(t, x):
    return 0.5 + 0.1 * x**2


def exact_u_x(t, x):
    return 0.3 + 0.4 * x + 0.2 * t * x


def exact_u_xx(t, x):
    return 0.4 + 0.2 * t


class ForcedBurgers(hcmoe.AbstractPDE):
    """u_t + u u_x - nu u_xx = f(t, x), f chosen so that `exact_u` solves it (nonlinear)."""

    nu: float = 0.1
    boundary: str = "neumann"

    def operators(self):
        return {
            "u": ops.Identity(),
            "u_t": ops.FiniteDifference("t"),
            "u_x": ops.FiniteDifference("x"),
            "u_xx": ops.FiniteDifference("x", order=2),
        }

    def residual(self, v, coords, data):
        t, x = coords["t"], coords["x"]
        forcing = exact_u_t(t, x) + exact_u(t, x) * exact_u_x(t, x) - self.nu * exact_u_xx(t, x)
        return v["u_t"] + v["u"] * v["u_x"] - self.nu * v["u_xx"] - forcing

    def conditions(self, grid, data):
        t, x = grid.coords("t"), grid.coords("x")
        high = x[-1]
        if self.boundary == "neumann":
            right = hcmoe.neumann("x", "high", exact_u_x(t, high))
        else:
            a, b = 1.0, 0.5
            right = hcmoe.robin("x", "high", a, b, a * exact_u(t, high) + b * exact_u_x(t, high))
        return (
            hcmoe.initial(hcmoe._pde.require(data, "u0", self)),
            hcmoe.dirichlet("x", "low", exact_u(t, x[0])),
            right,
        )


class ForcedHeat(hcmoe.AbstractPDE):
    """u_t - k u_xx = f(t, x), linear; `exact_u` solves it."""

    kappa: float = 0.5
    linear = True

    def operators(self):
        return {"u_t": ops.FiniteDifference("t"), "u_xx": ops.FiniteDifference("x", order=2)}

    def residual(self, v, coords, data):
        t, x = coords["t"], coords["x"]
        forcing = exact_u_t(t, x) - self.kappa * exact_u_xx(t, x)
        return v["u_t"] - self.kappa * v["u_xx"] - forcing

    def conditions(self, grid, data):
        t, x = grid.coords("t"), grid.coords("x")
        a, b = 2.0, -0.3
        return (
            hcmoe.initial(hcmoe._pde.require(data, "u0", self)),
            hcmoe.dirichlet("x", "low", exact_u(t, x[0])),
            hcmoe.robin("x", "high", a, b, a * exact_u(t, x[-1]) + b * exact_u_x(t, x[-1])),
        )


def small_grid(nt=11, nx=13):
    return hcmoe.uniform_grid(t=(0.0, 1.0, nt), x=(0.0, 1.0, nx))


def exact_field(grid):
    mesh = grid.mesh()
    return jnp.asarray(exact_u(mesh["t"], mesh["x"]))


def basis_with_exact(grid, key, n_basis=5, scale=0.3):
    """A basis whose first function is the exact solution and the rest smooth random fields."""
    mesh = grid.mesh()
    t, x = jnp.asarray(mesh["t"]), jnp.asarray(mesh["x"])
    coeffs = scale * jr.normal(key, (n_basis - 1, 4))
    others = [
        c[0] * jnp.sin((1 + c[1]) * 3 * x) * jnp.cos(2 * t + c[2]) + c[3] * t**3 for c in coeffs
    ]
    return jnp.stack([exact_field(grid)] + others, axis=-1)


def data_for(grid):
    return {"u0": exact_field(grid)[0]}


def check_blended_solve(getkey, partition, *, n_basis=5, rows=hcmoe.Rows(), **options):
    """A blended solve on `ForcedBurgers` recovers the exact solution from a basis holding it,
    and its gradient matches finite differences (`rows`: the `hcmoe.Rows` options besides the
    ridge, which this sets; `options`: extra `hcmoe.solve` options)."""
    grid = small_grid()
    basis = basis_with_exact(grid, getkey(), n_basis=n_basis)
    tight = dict(
        solver=hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12),
        max_steps=100,
        rows=dataclasses.replace(rows, ridge=0.0),
    )
    sol = hcmoe.solve(basis, ForcedBurgers(), partition, grid, data_for(grid), **tight, **options)
    assert bool(jnp.all(sol.stats.converged))
    np.testing.assert_allclose(sol.u, exact_field(grid), atol=1e-8)

    noisy = basis + 0.05 * jr.normal(getkey(), basis.shape)
    readout = jr.normal(getkey(), grid.shape)
    # A ridge that pins the minimiser down: with 1e-3 this noisy basis leaves a valley so flat
    # that where LM stops in it (1e-8 in u, depending on the path: measured with
    # initial_damping 1e-6) spoils a 1e-5 finite difference; the gradient itself agreed.
    loose = dict(
        solver=hcmoe.LevenbergMarquardt(rtol=1e-13, atol=1e-13),
        max_steps=200,
        rows=dataclasses.replace(rows, ridge=1e-2),
    )

    def loss(b):
        return jnp.sum(
            hcmoe.solve(b, ForcedBurgers(), partition, grid, data_for(grid), **loose, **options).u
            * readout
        )

    direction = jr.normal(getkey(), basis.shape)
    grad = jax.grad(loss)(noisy)
    fd = finite_difference_jvp(loss, noisy, direction, eps=1e-5)
    assert float(jnp.sum(grad * direction)) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)


def smooth_basis(key, grid, n_basis, modes=4):
    """`n_basis` random smooth fields on a (t, x) grid: random combinations of products of
    `modes` cosines per axis with decaying amplitudes, `0.1 * fields + 0.05` (the benchmarks'
    stand-in for a backbone's output; their expert problems are ill-conditioned)."""
    fields = jr.normal(key, (modes, modes, n_basis))
    for name in grid.names:
        low, high = grid.extent(name)
        s = (np.asarray(grid.coords(name)) - low) / (high - low)
        waves = np.stack([np.cos(np.pi * k * s) for k in range(modes)], -1)
        waves = waves / (1.0 + np.arange(modes))
        fields = jnp.tensordot(fields, jnp.asarray(waves), axes=([0], [1]))
    return 0.1 * jnp.moveaxis(fields, 0, -1) + 0.05
