r"""The 1-D heat equation: a small linear problem with an exact solution.

$$u_t = \kappa u_{xx}, \quad x \in [x_0, x_0 + L],\quad u(t, x_0) = u(t, x_0 + L) = 0,$$

with an initial condition that is a sum of sine modes,
$u_0(x) = \sum_{k=1}^{K} a_k \sin(k \pi (x - x_0) / L)$, so that exactly

$$u(t, x) = \sum_{k=1}^{K} a_k e^{-\kappa (k \pi / L)^2 (t - t_0)} \sin(k \pi (x - x_0) / L).$$

Used by the tests and the quickstart: it is linear (one least-squares solve, no iterations) and
every quantity is known in closed form. Default domain: `t` in [0, 1], `x` in [0, 1].
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .. import data as data_lib, ops
from .._grid import Grid
from .._pde import AbstractPDE, Condition, dirichlet, initial, require
from ._common import (
    cached_dataset,
    check_axes,
    check_choice,
    check_count,
    make_pde,
    pde_constants,
    split_key,
    uniform_step,
)


__all__ = [
    "SIZES",
    "Heat",
    "grid",
    "initial_condition",
    "make_dataset",
    "make_grid",
    "reference_solution",
    "sample_coefficients",
    "sample_initial_conditions",
]

AXES = ("t", "x")
SIZES: dict[str, dict[str, int]] = {
    "small": {"nt": 33, "nx": 65, "n_train": 256, "n_test": 64},
    "paper": {"nt": 101, "nx": 257, "n_train": 2048, "n_test": 256},
}


class Heat(AbstractPDE):
    """`u_t = kappa u_xx` with zero Dirichlet ends and the initial condition `data["u0"]`.

    **Fields:**

    - `kappa`: diffusivity (default 0.05: the first mode keeps 61% of its amplitude at t = 1,
      the third about 1%).

    **Data:** `{"u0": array of shape (nx,)}`, the initial condition on the grid's `x`.
    """

    kappa: float = 0.05
    linear: ClassVar[bool] = True

    def operators(self) -> dict[str, ops.AbstractOperator]:
        return {"u_t": ops.FiniteDifference("t"), "u_xx": ops.FiniteDifference("x", order=2)}

    def residual(self, values: dict[str, Array], coords: dict[str, ArrayLike], data: Any) -> Array:
        return values["u_t"] - self.kappa * values["u_xx"]

    def conditions(self, grid: Grid, data: Any) -> tuple[Condition, ...]:
        u0 = require(data, "u0", self)
        return (initial(u0), dirichlet("x", "low", 0.0), dirichlet("x", "high", 0.0))

    def exact_solution(self, grid: Grid, coefficients: ArrayLike) -> Float[Array, "nt nx"]:
        """The solution for `u0 = sum_k coefficients[k-1] sin(k pi (x - x0) / L)`.

        **Returns:** an array of shape `grid.shape` = `(nt, nx)`.
        """
        check_axes(grid, AXES, "Heat.exact_solution")
        coefficients = jnp.asarray(coefficients)
        if coefficients.ndim != 1:
            raise ValueError(
                "Heat.exact_solution: coefficients: expected shape (n_modes,); got "
                f"{coefficients.shape} (vmap over a batch)."
            )
        t = grid.coords("t") - grid.coords("t")[0]
        rates = self.kappa * _wavenumbers(grid, coefficients.shape[0]) ** 2
        decay = jnp.exp(-np.outer(t, rates))
        return jnp.einsum("tk,xk,k->tx", decay, _sines(grid, coefficients.shape[0]), coefficients)


def _wavenumbers(grid: Grid, n_modes: int) -> np.ndarray:
    low, high = grid.extent("x")
    return np.pi * np.arange(1, n_modes + 1) / (high - low)


def _sines(grid: Grid, n_modes: int) -> np.ndarray:
    x = grid.coords("x") - grid.coords("x")[0]
    return np.sin(np.outer(x, _wavenumbers(grid, n_modes)))


def make_grid(*, nt: int, nx: int, t_final: float = 1.0, length: float = 1.0) -> Grid:
    """`Grid(t=linspace(0, t_final, nt), x=linspace(0, length, nx))`."""
    nt, nx = check_count("nt", nt), check_count("nx", nx)
    return Grid(t=np.linspace(0.0, t_final, nt), x=np.linspace(0.0, length, nx))


def grid(size: str = "small") -> Grid:
    """The grid of a dataset size (`"small"`: 33 t x 65 x; `"paper"`: 101 t x 257 x)."""
    check_choice("size", size, SIZES)
    return make_grid(nt=SIZES[size]["nt"], nx=SIZES[size]["nx"])


def sample_coefficients(
    key: PRNGKeyArray, n: int, n_modes: int = 4, *, decay: float = 1.0
) -> Float[Array, "n n_modes"]:
    """Random sine coefficients `a_k ~ N(0, 1) / k**decay`, shape `(n, n_modes)`."""
    n, n_modes = check_count("n", n), check_count("n_modes", n_modes)
    scale = 1.0 / np.arange(1, n_modes + 1) ** decay
    return jr.normal(key, (n, n_modes)) * scale[None, :]


def initial_condition(
    coefficients: Float[ArrayLike, "*batch n_modes"], grid: Grid
) -> Float[Array, "*batch nx"]:
    """`u0(x) = sum_k a_k sin(k pi (x - x0) / L)` on the grid's `x`."""
    coefficients = jnp.asarray(coefficients)
    return coefficients @ _sines(grid, coefficients.shape[-1]).T


def sample_initial_conditions(
    key: PRNGKeyArray, n: int, grid: Grid, *, n_modes: int = 4
) -> Float[Array, "n nx"]:
    """`n` random initial conditions (sums of `n_modes` sines) on `grid`, shape `(n, nx)`."""
    return initial_condition(sample_coefficients(key, n, n_modes), grid)


def reference_solution(
    initial_condition: ArrayLike, grid: Grid, **constants
) -> Float[Array, "nt nx"]:
    """The exact solution from initial values on a uniform `x` grid that includes both ends.

    The interior values are expanded in the `nx - 2` discrete sine modes (an exact discrete
    sine transform; the two end values are ignored as the boundary conditions fix them), each
    mode decays exactly. Exact whenever `u0` is a sum of fewer than `nx - 1` sine modes, in
    particular for `sample_initial_conditions`. Jit- and vmap-able.

    **Arguments:**

    - `initial_condition`: `u0` on the grid's `x`, shape `(nx,)`.
    - `grid`: a `Grid(t=..., x=...)` with uniform `x`.
    - `**constants`: fields of `Heat` (`kappa`).

    **Returns:** `u` of shape `(nt, nx)`.
    """
    where = "heat.reference_solution"
    pde = make_pde(Heat, constants, where)
    check_axes(grid, AXES, where)
    uniform_step(grid, "x", where)
    u0 = jnp.asarray(initial_condition)
    nt, nx = grid.shape
    if u0.shape != (nx,):
        raise ValueError(f"{where}: initial_condition: expected shape ({nx},); got {u0.shape}.")
    intervals = nx - 1
    modes = np.arange(1, intervals)
    sines = np.sin(np.pi * np.outer(modes, modes) / intervals)  # symmetric, S @ S = (M/2) I
    coefficients = (2.0 / intervals) * (sines @ u0[1:-1])
    t = grid.coords("t") - grid.coords("t")[0]
    rates = pde.kappa * _wavenumbers(grid, intervals - 1) ** 2
    interior = (jnp.exp(-np.outer(t, rates)) * coefficients[None, :]) @ sines
    return jnp.pad(interior, ((0, 0), (1, 1)))


def make_dataset(
    split: str = "train",
    n: int | None = None,
    size: str = "small",
    *,
    seed: int = 0,
    n_modes: int = 4,
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    progress: bool = True,
    **constants,
) -> dict[str, np.ndarray]:
    """Random heat trajectories, exact, cached on disk (see `hcmoe.data.cached`).

    **Arguments:**

    - `split`: `"train"` or `"test"` (independent random streams of one `seed`).
    - `n`: number of trajectories (default: the size's `n_train` / `n_test`).
    - `size`: `"small"` or `"paper"` (see `SIZES`, `grid(size)`).
    - `seed`, `n_modes`: random coefficients `a_k ~ N(0, 1) / k`, `k <= n_modes`.
    - `dtype`: storage dtype.
    - `cache_dir`: default `hcmoe.data.cache_dir()`; `rebuild`: ignore an existing cache.
    - `progress`: show a progress bar.
    - `**constants`: fields of `Heat`.

    **Returns:** `{"u0": (n, nx), "u": (n, nt, nx), "coefficients": (n, n_modes)}`.
    """
    check_choice("split", split, ("train", "test"))
    check_choice("size", size, SIZES)
    n = check_count("n", SIZES[size][f"n_{split}"] if n is None else n)
    pde = make_pde(Heat, constants, "heat.make_dataset")
    the_grid = grid(size)
    params = {"n": n, "seed": seed, "n_modes": n_modes, "dtype": dtype, **pde_constants(pde)}

    def generate():
        coefficients = sample_coefficients(split_key(seed, split), n, n_modes)
        u = data_lib.map_batched(
            lambda a: pde.exact_solution(the_grid, a),
            coefficients,
            batch_size=256,
            progress=progress,
            desc=f"heat {size} {split}",
        )
        u0 = initial_condition(coefficients, the_grid)
        arrays = {"u0": u0, "u": u, "coefficients": coefficients}
        return {name: np.asarray(a, dtype=dtype) for name, a in arrays.items()}

    return cached_dataset(
        "heat", split, size, params, generate, cache_dir=cache_dir, rebuild=rebuild
    )
