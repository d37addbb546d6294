"""Finite differences: central of any order and accuracy (one-sided at non-periodic edges)
and backward (BDF) differences, with their point stencils."""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._base import AbstractOperator, _stencil_at_points


def fd_weights(offsets: np.ndarray, order: int) -> np.ndarray:
    """Weights `c` with `sum_k c_k f(x + offsets_k h) ~= h^order f^(order)(x)`.

    Solves the moment (Vandermonde) conditions exactly; accuracy is `len(offsets) - order`.
    """
    offsets = np.asarray(offsets, dtype=np.float64)
    n = offsets.size
    powers = np.arange(n)
    vandermonde = offsets[None, :] ** powers[:, None]
    rhs = np.zeros(n)
    rhs[order] = math.factorial(order)
    return np.linalg.solve(vandermonde, rhs)


def _fd_stencils(n: int, order: int, accuracy: int, periodic: bool):
    """Per-point neighbour indices and weights (unit spacing), shapes `(n, width)`.

    Interior points use the central stencil of the requested accuracy (width
    `2*floor((order+1)/2) - 1 + accuracy`); on a non-periodic axis the points too close to an
    edge use one-sided stencils of the same width, as close to centred as fits.
    """
    half = (order + 1) // 2 - 1 + accuracy // 2
    width = 2 * half + 1
    if not periodic and width > n:
        raise ValueError(
            f"FiniteDifference: a derivative of order {order} with accuracy {accuracy} needs "
            f"{width} points along the axis; the grid has {n}."
        )
    central = fd_weights(np.arange(-half, half + 1), order)
    index = np.empty((n, width), dtype=np.int32)
    weight = np.empty((n, width), dtype=np.float64)
    for i in range(n):
        if periodic:
            index[i] = (i + np.arange(-half, half + 1)) % n
            weight[i] = central
        else:
            start = min(max(i - half, 0), n - width)
            index[i] = np.arange(start, start + width)
            weight[i] = central if start == i - half else fd_weights(index[i] - i, order)
    return index, weight


class FiniteDifference(AbstractOperator):
    """The `order`-th derivative along one axis by finite differences.

    Central differences of the given `accuracy` (even, default 2) inside; on a non-periodic
    axis, one-sided stencils of the same width near the edges (formal accuracy
    `width - order`: the same as inside for odd orders, one less for even orders);
    wrap-around on a periodic axis. Assumes uniform spacing along the axis.

    **Arguments:**

    - `axis`: the grid axis name, e.g. `"x"`.
    - `order`: derivative order (1, 2, ...).
    - `accuracy`: even formal order of accuracy of the interior stencil.
    """

    axis: str = eqx.field(static=True)
    order: int = eqx.field(static=True, default=1)
    accuracy: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"FiniteDifference: order must be an int >= 1; got {self.order!r}.")
        if not isinstance(self.accuracy, int) or self.accuracy < 2 or self.accuracy % 2:
            raise ValueError(
                f"FiniteDifference: accuracy must be an even int >= 2; got {self.accuracy!r}."
            )

    def _stencils(self, grid):
        n = grid.shape[grid.axis(self.axis)]
        index, weight = _fd_stencils(n, self.order, self.accuracy, grid.is_periodic(self.axis))
        return index, weight / grid.spacing(self.axis) ** self.order

    def __call__(self, field, grid):
        return _apply_stencils(field, grid.axis(self.axis), *self._stencils(grid))

    def point_stencil(self, grid, points):
        return _stencil_at_points(grid, self.axis, *self._stencils(grid), points)


def _static_take(x: Array, index: np.ndarray) -> Array:
    """`x[index]` along axis 0 for a concrete `index`, as a concatenation of slices (runs of
    consecutive indices): no gather, so the transpose is cheap padding, not a scatter."""
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [index.size]])
    pieces = [x[index[a] : index[a] + (b - a)] for a, b in zip(starts, stops)]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)


def _apply_stencils(field, axis: int, index: np.ndarray, weight: np.ndarray):
    """`out[i] = sum_j weight[i, j] * field[index[i, j]]` along `axis` (per-point stencils)."""
    n = index.shape[0]
    moved = jnp.moveaxis(field, axis, 0)
    out = 0
    for j in range(index.shape[1]):
        w = jnp.asarray(weight[:, j], dtype=field.dtype).reshape((n,) + (1,) * (field.ndim - 1))
        out = out + w * _static_take(moved, index[:, j])
    return jnp.moveaxis(out, 0, axis)


def _backward_stencils(n: int, accuracy: int):
    """First derivative from the point and the `accuracy` points before it (BDF weights);
    the first points use as many earlier points as there are (point 0: a forward stencil)."""
    if accuracy + 1 > n:
        raise ValueError(
            f"BackwardDifference: accuracy {accuracy} needs {accuracy + 1} points along the "
            f"axis; the grid has {n}."
        )
    width = accuracy + 1
    index = np.empty((n, width), dtype=np.int32)
    weight = np.zeros((n, width), dtype=np.float64)
    for i in range(n):
        if i == 0:
            offsets = np.arange(width)
        else:
            offsets = -np.arange(min(i, accuracy) + 1)[::-1]
        points = i + offsets
        index[i] = np.concatenate([points, np.full(width - points.size, i)])
        weight[i, : points.size] = fd_weights(offsets, 1)
    return index, weight


class BackwardDifference(AbstractOperator):
    """The first derivative along an axis from the current and earlier points only (the BDF
    formulas: `accuracy=1` is backward Euler, `2` is BDF2; the first points use the lower
    orders that fit, point 0 a forward stencil). In time, a residual built on it is an
    implicit, A-stable time-stepping scheme: its discrete solution is determined level by
    level by the initial and boundary conditions, and a small residual means a small error,
    which central differences in time (leapfrog, unstable for diffusion) do not give.

    **Arguments:**

    - `axis`: the grid axis name, usually `"t"` (not periodic).
    - `accuracy`: 1 or more: the number of earlier points used.
    """

    axis: str = eqx.field(static=True)
    accuracy: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if not isinstance(self.accuracy, int) or self.accuracy < 1:
            raise ValueError(
                f"BackwardDifference: accuracy must be an int >= 1; got {self.accuracy!r}."
            )

    def _stencils(self, grid):
        if grid.is_periodic(self.axis):
            raise ValueError(
                f"BackwardDifference: axis {self.axis!r} is periodic; use FiniteDifference."
            )
        index, weight = _backward_stencils(grid.shape[grid.axis(self.axis)], self.accuracy)
        return index, weight / grid.spacing(self.axis)

    def __call__(self, field, grid):
        return _apply_stencils(field, grid.axis(self.axis), *self._stencils(grid))

    def point_stencil(self, grid, points):
        return _stencil_at_points(grid, self.axis, *self._stencils(grid), points)
