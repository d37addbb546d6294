"""Losses on predictions: PDE residual (soft constraint), conditions, relative L2 error."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float

from ._grid import Grid
from ._pde import AbstractPDE


def _check_prediction(u, grid: Grid, name: str = "u"):
    grid.check_field(u, name, trailing=0)


def pointwise_residual(u: Float[Array, "*grid"], pde: AbstractPDE, grid: Grid, data: Any = None):
    """`F(L_1 u, ..., L_J u)` at every grid point, with the PDE's own operators."""
    _check_prediction(u, grid)
    values = {name: op(u, grid) for name, op in pde.operators().items()}
    coords = {name: jnp.asarray(c, u.dtype) for name, c in grid.mesh().items()}
    return pde.residual(values, coords, data)


def residual_loss(
    u: Float[Array, "*grid"], pde: AbstractPDE, grid: Grid, data: Any = None
) -> Float[Array, ""]:
    """Mean squared PDE residual of `u` over the whole grid (the PI-SC physics loss).

    Uses the same operators as the hard constraint, so a hard-constrained prediction has a
    small residual at its constrained points and this measures it everywhere.
    """
    return jnp.mean(pointwise_residual(u, pde, grid, data) ** 2)


def condition_loss(
    u: Float[Array, "*grid"], pde: AbstractPDE, grid: Grid, data: Any = None
) -> Float[Array, ""]:
    """Sum over the PDE's conditions of the weighted mean squared condition residual."""
    _check_prediction(u, grid)
    total = jnp.zeros((), u.dtype)
    for cond in pde.conditions(grid, data):
        face = jnp.take(cond.operator(u, grid), cond.face_index(grid), axis=grid.axis(cond.axis))
        total = total + cond.weight * jnp.mean((face - cond.target_on_face(grid)) ** 2)
    return total


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
