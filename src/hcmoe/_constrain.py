"""`hcmoe.constrain`: wrap any backbone so its predictions satisfy the PDE.

The core only ever sees `basis = backbone(x)`; each adapter keeps the backbone in its own
framework (Equinox module, Flax NNX module, Flax Linen module, plain function), so the usual
training code of that framework works unchanged. Flax is imported only when a Flax model is
given.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._experts import solve
from ._grid import Grid
from ._partition import as_partition
from ._pde import AbstractPDE
from ._solve import Solution


_SOLVE_OPTIONS = frozenset(
    {
        "solver", "max_steps", "rtol", "atol", "points_per_expert", "ridge", "init", "adjoint",
        "linear_solver", "precision", "throw", "mesh",
    }
)


def _check_options(options: dict) -> dict:
    unknown = sorted(set(options) - _SOLVE_OPTIONS)
    if unknown:
        raise ValueError(
            f"constrain: unknown option(s) {unknown}; expected any of {sorted(_SOLVE_OPTIONS)}."
        )
    if options.get("mesh") is not None:
        from ._sharding import check_mesh

        check_mesh(options["mesh"])  # a mesh without an "experts" axis fails here, not later
    return dict(options)


def constrained_solve(basis, pde, partition, grid: Grid, data, key, options: dict) -> Solution:
    """Solve for one sample, or for a batch when `basis` has one extra leading axis.

    A batched basis `(batch, *grid.shape, N)` is vmapped over its leading axis; every array
    leaf of `data` must then carry the same leading batch axis, and `key` is split per sample.
    """
    if not isinstance(grid, Grid):
        raise ValueError(
            f"grid: expected an hcmoe.Grid (pass grid=... to constrain or to the call); "
            f"got {type(grid).__name__}."
        )
    if basis.ndim == grid.ndim + 1:
        return solve(basis, pde, partition, grid, data, key=key, **options)
    if basis.ndim != grid.ndim + 2:
        raise ValueError(
            f"backbone output: expected shape {grid.shape} + (n_basis,) or a batch of those "
            f"(batch, *{grid.shape}, n_basis); got {tuple(basis.shape)}."
        )
    batch = basis.shape[0]
    for leaf in jax.tree_util.tree_leaves(data):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
            raise ValueError(
                f"data: the backbone returned a batch of {batch} bases, so every data entry "
                f"needs a leading batch axis of {batch}; got an entry of shape {jnp.shape(leaf)}."
            )
    keys = None if key is None else jr.split(key, batch)

    def one(b, d, k):
        return solve(b, pde, partition, grid, d, key=k, **options)

    mesh = options.get("mesh")
    if mesh is None:
        return jax.vmap(one)(basis, data, keys)
    from ._sharding import batch_map

    return batch_map(one, mesh, basis, data, keys)


class Constrained(eqx.Module):
    """An Equinox backbone wrapped by the hard-constraint layer (see `hcmoe.constrain`).

    `constrained(x, data, key=key)` runs `model(x)` and returns the `Solution`. It is an
    `eqx.Module`, so `eqx.filter_grad` / `eqx.filter_jit` / optax training work unchanged; only
    `model` holds trainable arrays.
    """

    model: Any
    pde: AbstractPDE
    partition: Any
    grid: Grid
    options: dict

    def __call__(self, x, data=None, *, key=None, grid: Grid | None = None) -> Solution:
        basis = self.model(x)
        grid = self.grid if grid is None else grid
        return constrained_solve(basis, self.pde, self.partition, grid, data, key, self.options)


def _constrain_function(fn: Callable, pde, partition, grid, options) -> Callable:
    def constrained(params, x, data=None, *, key=None, grid: Grid | None = None) -> Solution:
        basis = fn(params, x)
        used = grid if grid is not None else default_grid
        return constrained_solve(basis, pde, partition, used, data, key, options)

    default_grid = grid
    constrained.__doc__ = (
        f"`{getattr(fn, '__name__', 'backbone')}(params, x)` followed by the hard-constraint "
        "solve; returns an hcmoe.Solution."
    )
    constrained.backbone = fn  # type: ignore[attr-defined]
    return constrained


def _is_nnx(model) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Module)


def _is_linen(model) -> bool:
    linen = sys.modules.get("flax.linen")
    return linen is not None and isinstance(model, linen.Module)


def constrain(
    model,
    pde: AbstractPDE,
    partition=None,
    *,
    grid: Grid | None = None,
    **options,
):
    """Wrap a backbone so that every prediction is the basis combination solving the PDE.

    The backbone maps an input `x` to basis functions of shape `(*grid.shape, n_basis)` (or a
    batch `(batch, *grid.shape, n_basis)`: then `data` leaves carry the batch axis and the
    solve is vmapped). The wrapper is of the backbone's own family:

    | backbone | returns | call |
    |---|---|---|
    | `eqx.Module` | `hcmoe.Constrained` (an `eqx.Module`) | `m(x, data, key=k)` |
    | `flax.nnx.Module` | an `nnx.Module` | `m(x, data, key=k)` |
    | `flax.linen.Module` | a Linen module | `m.apply(params, x, data, key=k)` |
    | function `f(params, x)` | a function | `g(params, x, data, key=k)` |

    Every call returns an `hcmoe.Solution`; `grid=` at call time overrides the default grid
    (e.g. to evaluate at a finer resolution: a coordinate `Partition` applies to any grid).

    **Arguments:**

    - `model`: the backbone.
    - `pde`: an `hcmoe.AbstractPDE`.
    - `partition`: `hcmoe.Partition(...)`, a label array, or None (one expert, PI-HC).
    - `grid`: the default `hcmoe.Grid`.
    - `**options`: passed to `hcmoe.solve` (`points_per_expert`, `max_steps`, `rtol`, `atol`,
      `ridge`, `solver`, `precision`, `throw`, `mesh`, ...).
    """
    if not isinstance(pde, AbstractPDE):
        raise ValueError(f"pde: expected an hcmoe.AbstractPDE; got {type(pde).__name__}.")
    if grid is not None and not isinstance(grid, Grid):
        raise ValueError(f"grid: expected an hcmoe.Grid or None; got {type(grid).__name__}.")
    partition = as_partition(partition)
    if grid is not None:
        partition.labels(grid)  # configuration errors surface now, not at the first call
    options = _check_options(options)
    if _is_nnx(model):
        from ._flax import ConstrainedNNX

        return ConstrainedNNX(model, pde, partition, grid, options)
    if _is_linen(model):
        from ._flax import ConstrainedLinen

        return ConstrainedLinen(model, pde, partition, grid, options)
    if isinstance(model, eqx.Module):
        return Constrained(model, pde, partition, grid, options)
    if callable(model):
        return _constrain_function(model, pde, partition, grid, options)
    raise ValueError(
        "model: expected an Equinox module, a Flax NNX or Linen module, or a function "
        f"f(params, x); got {type(model).__name__}."
    )
