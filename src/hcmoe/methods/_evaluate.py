"""Per-sample relative L2 errors of a method on a test set, and the physics loss of fields."""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PRNGKeyArray

from .. import losses
from .._grid import Grid
from ._method import Method, _batch_size, predict


class Evaluation(NamedTuple):
    """Per-sample relative L2 errors on a test set and their summary.

    `mean` and `std` are the mean and (population, `ddof=0`) standard deviation of `errors`;
    `solver_steps` the mean solver iterations per expert solve and `non_converged` the number
    of expert solves that did not converge (0 and 0 for PI-SC); `predictions` the predictions
    of the first samples (see `evaluate`'s `num_predictions`), e.g. for figures.
    """

    errors: np.ndarray
    mean: float
    std: float
    solver_steps: float
    non_converged: int
    predictions: np.ndarray

    def __repr__(self) -> str:
        return (
            f"Evaluation(n={self.errors.size}, mean={self.mean:.4g}, std={self.std:.4g}, "
            f"solver_steps={self.solver_steps:.3g}, non_converged={self.non_converged}, "
            f"predictions={tuple(np.shape(self.predictions))})"
        )

    def summary(self, prefix: str = "rel_l2") -> dict[str, float]:
        """Scalars for logs: `{prefix: mean, prefix_std: std, solver_steps, non_converged}`."""
        return {
            prefix: self.mean,
            f"{prefix}_std": self.std,
            "solver_steps": self.solver_steps,
            "non_converged": float(self.non_converged),
        }


@eqx.filter_jit
def _evaluate_batch(method, data, references, key, grid, num_predictions, options):
    solution = predict(method, data, key=key, grid=grid, **options)
    errors = losses.relative_l2(solution.u, references.astype(solution.u.dtype), batch_ndim=1)
    if solution.stats is None:
        steps = failed = jnp.zeros(errors.shape)
    else:
        steps = jnp.mean(solution.stats.num_steps.astype(errors.dtype), axis=-1)
        failed = jnp.sum(~solution.stats.converged, axis=-1).astype(errors.dtype)
    return errors, steps, failed, solution.u[:num_predictions]


def evaluate(
    method: Method,
    data: Any,
    references,
    *,
    grid: Grid | None = None,
    key: PRNGKeyArray | None = None,
    batch_size: int = 16,
    num_predictions: int = 1,
    **options,
) -> Evaluation:
    """Per-sample relative L2 error `||u - u_ref|| / ||u_ref||` of `method` on a test set.

    Runs in jitted batches of `batch_size` (the last one padded by repeating a sample, so one
    compilation serves all).

    **Arguments:**

    - `method`: a `Method`.
    - `data`: PDE data of the test samples, leading axis `n` (e.g. `{"u0": (n, nx)}`).
    - `references`: reference solutions, shape `(n, *grid.shape)`.
    - `grid`: the grid of the references (default: the training grid).
    - `key`: PRNG key for the solves' point sampling (default: a fixed key, so evaluation is
      deterministic).
    - `batch_size`: samples per jitted call.
    - `num_predictions`: how many predictions (of the first samples) to keep.
    - `**options`: solve options for the evaluation (`hcmoe.solve`'s), e.g.
      `rows=hcmoe.Rows()` to evaluate with every point where training sampled some.

    **Returns:** an `Evaluation` (errors, mean ± std, solver statistics, predictions).
    """
    grid = method.grid if grid is None else grid
    n = _batch_size(data)
    references = np.asarray(references)
    if references.shape != (n, *grid.shape):
        raise ValueError(
            f"references: expected shape {(n, *grid.shape)} (samples, *grid.shape); got "
            f"{references.shape}."
        )
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int; got {batch_size!r}.")
    if not isinstance(num_predictions, (int, np.integer)) or num_predictions < 0:
        raise ValueError(f"num_predictions: expected a non-negative int; got {num_predictions!r}.")
    key = jr.key(0) if key is None else key
    batch_size = min(int(batch_size), n)
    keep = min(int(num_predictions), batch_size)
    parts, predictions = [], []
    for start in range(0, n, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        batch = jtu.tree_map(lambda leaf: jnp.asarray(np.asarray(leaf)[index]), data)
        *out, u = _evaluate_batch(
            method,
            batch,
            jnp.asarray(references[index]),
            jr.fold_in(key, start),
            grid,
            keep,
            options,
        )
        count = min(batch_size, n - start)
        parts.append([np.asarray(a)[:count] for a in jax.device_get(out)])
        predictions.append(np.asarray(u)[: max(0, min(num_predictions - start, count))])
    errors, steps, failed = (np.concatenate(p) for p in zip(*parts))
    return Evaluation(
        errors=errors,
        mean=float(np.mean(errors)),
        std=float(np.std(errors)),
        solver_steps=float(np.mean(steps)),
        non_converged=int(np.sum(failed)),
        predictions=np.concatenate(predictions),
    )


def physics_loss(method: Method, data: Any, u, *, grid: Grid | None = None) -> float:
    """The mean physics loss (the training loss of every method: `residual_loss +
    condition_loss` of `method.pde`) of fields `u`, e.g. predictions or reference solutions.

    **Arguments:**

    - `method`: a `Method` (its PDE, with its residual weight).
    - `data`: PDE data of the samples, leading axis `n` (e.g. `{"u0": (n, nx)}`).
    - `u`: fields of shape `(n, *grid.shape)`; the loss is computed in the default float
      precision (float64 under `jax_enable_x64`) whatever their dtype.
    - `grid`: the grid of `u` (default: the training grid).

    **Returns:** the mean over the samples, a Python float.
    """
    grid = method.grid if grid is None else grid
    n = _batch_size(data)
    if np.shape(u) != (n, *grid.shape):
        raise ValueError(
            f"u: expected shape {(n, *grid.shape)} (samples, *grid.shape); got {np.shape(u)}."
        )
    pde = method.pde

    def one(d, v):  # closed over, so the PDE and grid are constants of the program
        v = jnp.asarray(v, float)
        return losses.residual_loss(v, pde, grid, d) + losses.condition_loss(v, pde, grid, d)

    return float(jnp.mean(jax.jit(jax.vmap(one))(data, u)))
