r"""2-D incompressible Navier–Stokes in vorticity form on the periodic unit square.

$$w_t + \mathbf{u}\cdot\nabla w = \nu \Delta w,\qquad -\Delta\psi = w,\quad
\mathbf{u} = (\partial_y\psi, -\partial_x\psi),$$

with $\nu = 10^{-4}$, no forcing, $t \in [0, 5]$ (64 stored levels), and initial vorticities
drawn from a zero-mean periodic Gaussian random field of length scale 0.8. Training data live on
64 x 64, test data are solved on 256 x 256.

The initial condition is built into the ansatz (as in PI-HC-MoE):
$w = w_0 + s\,\frac{t - t_0}{T}\,(B - \bar B)\,\mathbf{w}$ with $\bar B$ the spatial mean of each
basis function and $s = 0.005$, so $w(t_0) = w_0$ exactly and the mean vorticity is conserved.
"""

from __future__ import annotations

import os
from typing import Any, cast

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .. import data as data_lib, ops
from .._grid import Grid, uniform_grid
from .._pde import AbstractPDE, Condition, require
from ._common import (
    cached_dataset,
    check_axes,
    check_choice,
    check_count,
    make_pde,
    num_substeps,
    pde_constants,
    split_key,
    uniform_step,
)


__all__ = [
    "SIZES",
    "NavierStokes",
    "grid",
    "make_dataset",
    "make_grid",
    "reference_solution",
    "sample_initial_conditions",
]

AXES = ("t", "x", "y")
T_FINAL = 5.0
SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "nt": 16,
        "t_final": 2.0,
        "n_xy": 32,
        "n_xy_test": 32,
        "n_train": 64,
        "n_test": 16,
        "max_dt": 1e-3,
    },
    "paper": {
        "nt": 64,
        "t_final": T_FINAL,
        "n_xy": 64,
        "n_xy_test": 256,
        "n_train": 4000,
        "n_test": 100,
        "max_dt": 1e-3,
    },
}


class NavierStokes(AbstractPDE):
    r"""`w_t + u w_x + v w_y - nu (w_xx + w_yy) = 0` with the velocity `(u, v)` from `w`.

    Derivatives in space are spectral (the grid must be periodic in `x` and `y`), the time
    derivative is a finite difference. Needs no conditions: periodicity is built into the
    operators and the initial condition into the ansatz (`particular`, `transform_basis`).

    **Fields:** `nu = 1e-4` (viscosity), `scale = 0.005` (`s` of the ansatz).

    **Data:** `{"w0": initial vorticity, shape (nx, ny)}` on the grid's `x`, `y`.
    """

    nu: float = 1e-4
    scale: float = 0.005

    def operators(self) -> dict[str, ops.AbstractOperator]:
        return {
            "w_t": ops.FiniteDifference("t"),
            "w_x": ops.Spectral("x"),
            "w_y": ops.Spectral("y"),
            "u": ops.VelocityFromVorticity("u", axes=("x", "y")),
            "v": ops.VelocityFromVorticity("v", axes=("x", "y")),
            "lap": ops.Laplacian(("x", "y")),
        }

    def residual(self, values: dict[str, Array], coords: dict[str, ArrayLike], data: Any) -> Array:
        advection = values["u"] * values["w_x"] + values["v"] * values["w_y"]
        return values["w_t"] + advection - self.nu * values["lap"]

    def conditions(self, grid: Grid, data: Any) -> tuple[Condition, ...]:
        return ()

    def particular(self, grid: Grid, data: Any) -> Array:
        """`w0` broadcast over time: shape `grid.shape`."""
        w0 = jnp.asarray(require(data, "w0", self))
        axis = grid.axis("t")
        face = grid.shape[:axis] + grid.shape[axis + 1 :]
        if w0.shape != face:
            raise ValueError(
                f"NavierStokes: data['w0']: expected shape {face} (the grid without 't'); "
                f"got {w0.shape}."
            )
        return jnp.broadcast_to(jnp.expand_dims(w0, axis), grid.shape)

    def transform_basis(self, basis: Array, grid: Grid, data: Any) -> Array:
        """`s (t - t0) / T (B - mean_xy B)`: zero at `t0`, zero spatial mean."""
        space = (grid.axis("x"), grid.axis("y"))
        centred = basis - jnp.mean(basis, axis=space, keepdims=True)
        t = grid.coords("t")
        shape = [1] * basis.ndim
        shape[grid.axis("t")] = t.size
        ramp = (self.scale * (t - t[0]) / (t[-1] - t[0])).reshape(shape)
        return jnp.asarray(ramp, dtype=basis.dtype) * centred


def make_grid(*, nt: int, n: int, t_final: float = T_FINAL) -> Grid:
    """`t = linspace(0, t_final, nt)`, `x`, `y`: `n` periodic points on [0, 1)."""
    nt, n = check_count("nt", nt), check_count("n", n)
    return uniform_grid(t=(0.0, t_final, nt), x=(0.0, 1.0, n), y=(0.0, 1.0, n), periodic=("x", "y"))


def grid(size: str = "small", split: str = "train", *, n_xy: int | None = None) -> Grid:
    """The grid of a dataset: small 16 t x 32 x 32 on t in [0, 2] (both splits); paper
    64 t x 64 x 64 for `"train"` and 64 t x 256 x 256 for `"test"`, on t in [0, 5]. `n_xy`
    replaces the split's spatial resolution (the size's time axis is kept).

    The small size's horizon is shorter than the paper's because its 32² grid does not
    resolve the flow's finer scales by t = 5: the reference's own residual with the PDE's
    operators is 19% of `w_t` (RMS) on [0, 5] against 2.8% on [0, 2]."""
    check_choice("size", size, SIZES)
    check_choice("split", split, ("train", "test"))
    n = SIZES[size]["n_xy" if split == "train" else "n_xy_test"] if n_xy is None else n_xy
    return make_grid(nt=SIZES[size]["nt"], n=n, t_final=SIZES[size]["t_final"])


def sample_initial_conditions(
    key: PRNGKeyArray,
    n: int,
    grid: Grid,
    *,
    length_scale: float = 0.8,
    amplitude: float = 1.0,
) -> Float[Array, "n nx ny"]:
    r"""Zero-mean periodic Gaussian random fields on the grid's `x`, `y`, shape `(n, nx, ny)`.

    Covariance: the periodic squared-exponential kernel
    `amplitude^2 exp(-2 sin^2(pi dx / Lx) / l^2) exp(-2 sin^2(pi dy / Ly) / l^2)` with
    `l = length_scale` (in periods), sampled exactly on the grid by circulant embedding
    (`w = F^{-1} sqrt(F k) F z`, `z` white noise); the mean mode is then removed. With
    `l = 0.8` the energy sits in the first few Fourier modes (|k| <= 4).
    """
    n = check_count("n", n)
    if not (length_scale > 0):
        raise ValueError(f"length_scale: expected a positive number; got {length_scale!r}.")
    nx, ny = (grid.shape[grid.axis(a)] for a in ("x", "y"))
    kernel = np.ones((nx, ny))
    for a, size in (("x", nx), ("y", ny)):
        offsets = np.sin(np.pi * np.arange(size) / size) ** 2
        shape = (size, 1) if a == "x" else (1, size)
        kernel = kernel * np.exp(-2.0 * offsets / length_scale**2).reshape(shape)
    spectrum = np.sqrt(np.clip(np.fft.fft2(kernel).real, 0.0, None))
    spectrum[0, 0] = 0.0  # zero mean
    noise = jr.normal(key, (n, nx, ny))
    fields = jnp.fft.ifft2(spectrum[None] * jnp.fft.fft2(noise), axes=(1, 2)).real
    return amplitude * fields


def _fourier_pad(field: Array, shape: tuple[int, int]) -> Array:
    """Trigonometric interpolation of a periodic field onto a finer grid (zero padding).

    An even grid's Nyquist coefficient is split evenly between `+N/2` and `-N/2`, so the result
    is real and equals `field` at the original points.
    """
    spectrum = jnp.fft.fft2(field)
    for axis, big in enumerate(shape):
        small = field.shape[axis]
        if big == small:
            continue
        head = jnp.take(spectrum, np.arange(0, (small + 1) // 2), axis=axis)
        tail = jnp.take(spectrum, np.arange(small // 2 + 1, small), axis=axis)
        parts = [head]
        if small % 2 == 0:
            nyquist = 0.5 * jnp.take(spectrum, np.array([small // 2]), axis=axis)
            parts = [head, nyquist]
            tail = jnp.concatenate([nyquist, tail], axis=axis)
        zeros_shape = list(spectrum.shape)
        zeros_shape[axis] = big - sum(p.shape[axis] for p in parts) - tail.shape[axis]
        zeros = jnp.zeros(zeros_shape, spectrum.dtype)
        spectrum = jnp.concatenate([*parts, zeros, tail], axis=axis)
    scale = (shape[0] * shape[1]) / (field.shape[0] * field.shape[1])
    return scale * jnp.fft.ifft2(spectrum).real


def reference_solution(
    initial_condition: ArrayLike,
    grid: Grid,
    *,
    max_dt: float = 1e-3,
    refine: int = 1,
    **constants,
) -> Float[Array, "nt nx ny"]:
    r"""Solve the vorticity equation pseudo-spectrally from `w0` on `grid`.

    Space: Fourier–Galerkin on a grid `refine` times finer than the stored one in each direction
    (the initial condition is trigonometrically interpolated onto it; stored values are the
    solution at the stored points). The advection term `u w_x + v w_y` is evaluated in physical
    space with the 2/3 rule: the vorticity is truncated to `|k_x| < Nx/3`, `|k_y| < Ny/3` before
    the products and the product is truncated again, so no aliasing reaches the kept modes;
    its mean mode is exactly zero, so the mean vorticity is conserved.

    Time: Crank–Nicolson for `nu Delta w` with Heun's method (explicit trapezoid) for the
    advection: second order; `ceil(level_dt / max_dt)` equal substeps between stored levels
    (`max_dt = 1e-3`, as in the literature).

    Jit- and vmap-able; `grid` is static.

    **Arguments:**

    - `initial_condition`: `w0`, shape `(nx, ny)`.
    - `grid`: `Grid(t=..., x=..., y=..., periodic=("x", "y"))`, uniform `t`.
    - `max_dt`: largest internal time step.
    - `refine`: solve on a `refine * nx` by `refine * ny` grid.
    - `**constants`: fields of `NavierStokes` (`nu`).

    **Returns:** `w`, shape `(nt, nx, ny)`, with `w[0] = w0`.
    """
    where = "navier_stokes.reference_solution"
    pde = make_pde(NavierStokes, constants, where)
    check_axes(grid, AXES, where)
    if grid.periodic != ("x", "y"):
        raise ValueError(f"{where}: grid: expected periodic x and y; got periodic={grid.periodic}.")
    refine = check_count("refine", refine)
    level_dt = uniform_step(grid, "t", where)
    substeps = num_substeps(level_dt, max_dt, where)
    nt, nx, ny = grid.shape
    w0 = jnp.asarray(initial_condition)
    if w0.shape != (nx, ny):
        raise ValueError(
            f"{where}: initial_condition: expected shape ({nx}, {ny}); got {w0.shape}."
        )
    w0 = w0.astype(jnp.result_type(float))
    lengths = tuple(grid.extent(a)[1] - grid.extent(a)[0] for a in ("x", "y"))
    fine = w0 if refine == 1 else _fourier_pad(w0, (refine * nx, refine * ny))
    steps = (jnp.asarray(pde.nu), jnp.asarray(level_dt / substeps), jnp.asarray(substeps))
    levels = _integrate(fine, *steps, nt - 1, lengths, refine)
    return jnp.concatenate([w0[None], levels])


@eqx.filter_jit
def _integrate(w0, nu, dt, substeps, num_levels, lengths, refine):
    """`num_levels` stored levels after `w0` (on the solver grid), `substeps` CN–Heun steps
    apart, subsampled by `refine`. `nu`, `dt`, `substeps` are traced: one compilation per grid
    shape serves every step size and viscosity."""
    mx, my = w0.shape
    kx = (2 * np.pi * np.fft.fftfreq(mx, d=lengths[0] / mx))[:, None]
    ky = (2 * np.pi * np.fft.rfftfreq(my, d=lengths[1] / my))[None, :]
    k2 = kx**2 + ky**2
    inverse_k2 = np.where(k2 == 0, 0.0, 1.0 / np.where(k2 == 0, 1.0, k2))
    modes_x = np.abs(np.fft.fftfreq(mx, d=1.0 / mx))[:, None]
    modes_y = np.abs(np.fft.rfftfreq(my, d=1.0 / my))[None, :]
    keep = (modes_x < mx / 3) & (modes_y < my / 3)
    explicit = 1.0 - 0.5 * dt * nu * k2
    implicit = 1.0 / (1.0 + 0.5 * dt * nu * k2)

    def advection(w_hat):
        """Fourier coefficients of `-(u w_x + v w_y)`, 2/3-dealiased, zero mean."""
        w_hat = w_hat * keep
        psi_hat = w_hat * inverse_k2
        u = jnp.fft.irfft2(1j * ky * psi_hat, s=(mx, my))
        v = jnp.fft.irfft2(-1j * kx * psi_hat, s=(mx, my))
        w_x = jnp.fft.irfft2(1j * kx * w_hat, s=(mx, my))
        w_y = jnp.fft.irfft2(1j * ky * w_hat, s=(mx, my))
        return -(jnp.fft.rfft2(u * w_x + v * w_y) * keep).at[0, 0].set(0.0)

    def step(_, w_hat):
        rate = advection(w_hat)
        predictor = (explicit * w_hat + dt * rate) * implicit
        rate = 0.5 * (rate + advection(predictor))
        return (explicit * w_hat + dt * rate) * implicit

    def level(w_hat, _):
        w_hat = lax.fori_loop(0, substeps, step, w_hat)
        return w_hat, jnp.fft.irfft2(w_hat, s=(mx, my))[::refine, ::refine]

    _, levels = lax.scan(level, jnp.fft.rfft2(w0), None, length=num_levels)
    return levels


def make_dataset(
    split: str = "train",
    n: int | None = None,
    size: str = "small",
    *,
    seed: int = 0,
    max_dt: float | None = None,
    refine: int = 1,
    length_scale: float = 0.8,
    amplitude: float = 1.0,
    n_xy: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    progress: bool = True,
    **constants,
) -> dict[str, np.ndarray]:
    """Navier–Stokes trajectories from random initial vorticities, cached on disk.

    **Arguments:**

    - `split`: `"train"` or `"test"` (independent random streams of one `seed`; the paper's
      test split lives on a 256 x 256 grid, see `grid(size, split)`).
    - `n`: number of trajectories (default: the size's `n_train` / `n_test`; paper 4000 / 100).
    - `size`: `"small"` or `"paper"`; see `SIZES`.
    - `max_dt`, `refine`: see `reference_solution` (default `max_dt`: the size's).
    - `length_scale`, `amplitude`: of the initial random fields.
    - `n_xy`: spatial resolution (default: the size's for the split, see `grid`); e.g. a
      small test split on a finer grid than training. Cached separately per resolution.
    - `batch_size`: trajectories solved together (vmapped).
    - `dtype`: storage dtype. `cache_dir`, `rebuild`: see `hcmoe.data.cached`.
    - `progress`: show a progress bar.
    - `**constants`: fields of `NavierStokes`.

    **Returns:** `{"w0": (n, nx, ny), "w": (n, nt, nx, ny)}`.
    """
    check_choice("split", split, ("train", "test"))
    check_choice("size", size, SIZES)
    n = check_count("n", SIZES[size][f"n_{split}"] if n is None else n)
    max_dt = cast(float, SIZES[size]["max_dt"]) if max_dt is None else max_dt
    pde = make_pde(NavierStokes, constants, "navier_stokes.make_dataset")
    the_grid, label = grid(size, split), size
    if n_xy is not None and n_xy != the_grid.shape[-1]:
        the_grid = grid(size, split, n_xy=check_count("n_xy", n_xy))
        label = f"{size}-{n_xy}"
    params = {
        "n": n,
        "seed": seed,
        "max_dt": max_dt,
        "refine": refine,
        "length_scale": length_scale,
        "amplitude": amplitude,
        "grid": the_grid.shape,
        "t_final": float(the_grid.extent("t")[1]),
        "dtype": dtype,
        **pde_constants(pde),
    }

    def generate():
        key = split_key(seed, split)
        w0 = sample_initial_conditions(
            key, n, the_grid, length_scale=length_scale, amplitude=amplitude
        )
        w = data_lib.map_batched(
            lambda v: reference_solution(v, the_grid, max_dt=max_dt, refine=refine, nu=pde.nu),
            w0,
            batch_size=batch_size,
            progress=progress,
            desc=f"navier-stokes {size} {split}",
        )
        return {"w0": np.asarray(w0, dtype=dtype), "w": np.asarray(w, dtype=dtype)}

    return cached_dataset(
        "navier_stokes", split, label, params, generate, cache_dir=cache_dir, rebuild=rebuild
    )
