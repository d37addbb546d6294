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

from ._grid import Grid
from ._partition import as_partition
from ._pde import AbstractPDE
from ._results import Solution
from ._solve import call_options, check_options, constrained_solve


class Constrained(eqx.Module):
    """An Equinox backbone wrapped by the hard-constraint layer (see `hcmoe.constrain`).

    `constrained(x, data, key=key, **options)` runs `model(x)` and the solve (compiled together,
    once per configuration) and returns the `Solution`; solve options given at call time
    override the wrap-time ones. It is an `eqx.Module`, so `eqx.filter_grad` /
    `eqx.filter_jit` / optax training work unchanged; only `model` holds trainable arrays.
    """

    model: Any
    pde: AbstractPDE
    partition: Any
    grid: Grid | None
    options: dict

    def __call__(self, x, data=None, *, key=None, grid: Grid | None = None, **options) -> Solution:
        grid = self.grid if grid is None else grid
        return _call_equinox(self, x, data, key, grid, call_options(self.options, options))


@eqx.filter_jit
def _call_equinox(constrained: Constrained, x, data, key, grid, options) -> Solution:
    """Backbone and solve in one jit: an eager call runs compiled code, not op by op."""
    basis = constrained.model(x)
    return constrained_solve(
        basis, constrained.pde, constrained.partition, grid, data, key, options
    )


def _constrain_function(fn: Callable, pde, partition, grid, options) -> Callable:
    def constrained(
        params, x, data=None, *, key=None, grid: Grid | None = None, **call_time
    ) -> Solution:
        used = grid if grid is not None else default_grid
        used_options = call_options(options, call_time)
        return _call_function(fn, params, x, pde, partition, used, data, key, used_options)

    default_grid = grid
    constrained.__doc__ = (
        f"`{getattr(fn, '__name__', 'backbone')}(params, x)` followed by the hard-constraint "
        "solve; returns an hcmoe.Solution."
    )
    constrained.backbone = fn  # type: ignore[attr-defined]
    return constrained


@eqx.filter_jit
def _call_function(fn, params, x, pde, partition, grid, data, key, options) -> Solution:
    return constrained_solve(fn(params, x), pde, partition, grid, data, key, options)


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
    (e.g. to evaluate at a finer resolution: a coordinate `Partition` applies to any grid),
    and solve options given at call time override the wrap-time ones for that call only, e.g.
    `m(x, data, rows=hcmoe.Rows())` to evaluate with every point.

    The solve is jitted inside the wrapper (`equinox.filter_jit`) and compiles once per
    configuration, so eager calls do not retrace; for training, jit the whole step
    (`eqx.filter_jit`, `nnx.jit`, `jax.jit`) as usual: the inner jit is inlined.

    **Arguments:**

    - `model`: the backbone.
    - `pde`: an `hcmoe.AbstractPDE`.
    - `partition`: `hcmoe.Partition(...)`, a label array, or None (one expert, PI-HC).
    - `grid`: the default `hcmoe.Grid`.
    - `**options`: passed to `hcmoe.solve` (`init`, `solver`, `rows`, `coupling`, `adjoint`,
      `max_steps`, `precision`, `throw`; a coupling's `mesh` also splits a batch over the
      mesh's `"batch"` axis). An hcmoe 0.1 option name raises an error naming its new home.
    """
    if not isinstance(pde, AbstractPDE):
        raise ValueError(f"pde: expected an hcmoe.AbstractPDE; got {type(pde).__name__}.")
    if grid is not None and not isinstance(grid, Grid):
        raise ValueError(f"grid: expected an hcmoe.Grid or None; got {type(grid).__name__}.")
    partition = as_partition(partition)
    if grid is not None:
        partition.labels(grid)  # configuration errors surface now, not at the first call
    options = check_options(options, "constrain")
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
