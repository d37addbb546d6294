"""Losses on predictions: PDE residual (soft constraint), conditions, relative L2 error."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._grid import Grid
from ._pde import AbstractPDE, residual_mask
from ._pdedata import wrap_data


def _check_prediction(u, grid: Grid, name: str = "u"):
    grid.check_field(u, name, trailing=0)


def pointwise_residual(u: Float[Array, "*grid"], pde: AbstractPDE, grid: Grid, data: Any = None):
    """`F(L_1 u, ..., L_J u)` at every grid point, with the PDE's own operators (also where
    `pde.residual_mask` leaves the PDE out)."""
    _check_prediction(u, grid)
    data = wrap_data(data, pde)
    values = {name: op(u, grid) for name, op in pde.operators().items()}
    coords = {name: jnp.asarray(c, u.dtype) for name, c in grid.mesh().items()}
    return pde.residual(values, coords, data)


def residual_loss(
    u: Float[Array, "*grid"], pde: AbstractPDE, grid: Grid, data: Any = None
) -> Float[Array, ""]:
    """Mean squared PDE residual of `u` over the whole grid (the PI-SC physics loss).

    Uses the same operators as the hard constraint, so a hard-constrained prediction has a
    small residual at its constrained points and this measures it everywhere the PDE is
    imposed (`pde.residual_mask(grid)`; the whole grid by default).
    """
    squared = pointwise_residual(u, pde, grid, data) ** 2
    mask = residual_mask(pde, grid)
    if mask is None:
        return jnp.mean(squared)
    mask = jnp.asarray(mask).reshape(mask.shape + (1,) * (squared.ndim - mask.ndim))
    count = jnp.sum(jnp.broadcast_to(mask, squared.shape))
    return jnp.sum(jnp.where(mask, squared, 0.0)) / count


def condition_loss(
    u: Float[Array, "*grid"], pde: AbstractPDE, grid: Grid, data: Any = None
) -> Float[Array, ""]:
    """`sum_c mean_face_c((weight_c (L_c u - g_c))^2)` over the PDE's conditions (exact ones
    included: they are ~0 by construction). The weight enters squared, as in the solve."""
    _check_prediction(u, grid)
    data = wrap_data(data, pde)
    total = jnp.zeros((), u.dtype)
    for cond in pde.conditions(grid, data):
        face = jnp.take(cond.operator(u, grid), cond.face_index(grid), axis=grid.axis(cond.axis))
        error = cond.weight_on_face(grid) * (face - cond.target_on_face(grid))
        total = total + jnp.mean(error**2)
    return total


def seam_jump(u: Float[Array, "*grid"], labels) -> Float[Array, ""]:
    """Largest change of `u` between neighbouring grid points of different experts (along any
    axis): the size of the seams of a piecewise prediction. Compare with the same number for
    the reference solution, whose cell-to-cell change there is the physics."""
    jumps = interface_jumps(u, labels)
    return jnp.max(jnp.stack(list(jumps.values()))) if jumps else jnp.zeros((), u.dtype)


def interface_jumps(u: Float[Array, "*grid"], labels) -> dict[tuple[int, int], Array]:
    """Per interface `(a, b)` (expert labels, `a < b`), the largest `|u(p) - u(q)|` over
    neighbouring grid points `p`, `q` with labels `a` and `b` (non-periodic neighbours)."""
    labels = np.asarray(labels)
    if labels.shape != tuple(u.shape):
        raise ValueError(
            f"labels: expected shape {tuple(u.shape)} (the prediction's); got {labels.shape}."
        )
    out: dict[tuple[int, int], Array] = {}
    for axis in range(labels.ndim):
        a = np.take(labels, np.arange(labels.shape[axis] - 1), axis=axis)
        b = np.take(labels, np.arange(1, labels.shape[axis]), axis=axis)
        diff = jnp.abs(jnp.diff(u, axis=axis))
        for pair in {tuple(sorted(p)) for p in zip(a[a != b].tolist(), b[a != b].tolist())}:
            where = ((a == pair[0]) & (b == pair[1])) | ((a == pair[1]) & (b == pair[0]))
            value = jnp.max(jnp.where(jnp.asarray(where), diff, 0.0))
            out[pair] = jnp.maximum(out[pair], value) if pair in out else value
    return out


def relative_l2(
    prediction: Array, reference: Array, *, batch_ndim: int = 0, eps: float = 1e-12
) -> Array:
    """`||prediction - reference||_2 / ||reference||_2` per sample.

    **Arguments:**

    - `prediction`, `reference`: arrays of the same shape.
    - `batch_ndim`: number of leading batch axes kept in the result (the norm runs over the
      others). `relative_l2(u, ref, batch_ndim=1)` gives one error per sample.
    """
    if prediction.shape != reference.shape:
        raise ValueError(
            f"relative_l2: prediction shape {prediction.shape} differs from reference shape "
            f"{reference.shape}."
        )
    axes = tuple(range(batch_ndim, prediction.ndim))
    error = jnp.sqrt(jnp.sum((prediction - reference) ** 2, axis=axes))
    return error / jnp.maximum(jnp.sqrt(jnp.sum(reference**2, axis=axes)), eps)
