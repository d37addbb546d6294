r"""PI-SC, PI-HC and PI-HC-MoE from one code path: the model, the physics loss, evaluation.

The three methods of the paper share the backbone `B` (basis functions on the grid), the
ansatz `u = u_p + T(B) w` of the PDE and the training loss; they differ only in how the
weights `w` are obtained:

| kind | name | weights |
|---|---|---|
| `"sc"` | PI-SC (soft constraint) | fixed at ones: `u = u_p + T(B) 1`, no solve |
| `"hc"` | PI-HC (hard constraint) | one least-squares solve on the whole grid |
| `"moe"` | PI-HC-MoE | one solve per expert of a `Partition` |

PI-SC is therefore the backbone's output used directly as the prediction (the sum of its
output channels; with `n_basis=1`, that channel): the physics only enters through the loss.
`w = 1` is also the initial guess of the hard-constraint solves, so the three models coincide
before any solver iteration.

```python
method = hcmoe.methods.make_method(
    "moe", backbone, pde, grid, hcmoe.Partition(t=1, x=4), points_per_expert=500
)
result = hcmoe.methods.train(
    method, {"u0": train["u0"]}, steps=400, batch_size=8, key=jr.key(0),
    eval_data=({"u0": test["u0"]}, test["u"]), run_dir="runs/moe",
)
print(hcmoe.methods.evaluate(result.model, {"u0": test["u0"]}, test["u"]).summary())
```

The loss is the same for every method (the paper's): the mean squared PDE residual of the
assembled prediction over the whole grid plus the mean squared IC/BC residuals
(`hcmoe.losses.residual_loss + hcmoe.losses.condition_loss`), no solution data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray

from . import losses
from ._constrain import constrain
from ._grid import Grid
from ._partition import AbstractPartition, as_partition
from ._pde import AbstractPDE, ansatz
from ._solve import Solution
from .models.fno import fno_input
from .training import FitResult, fit, paper_optimizer, solver_metrics


__all__ = [
    "KINDS",
    "NAMES",
    "Evaluation",
    "InitialConditionInput",
    "Method",
    "WeightedResidual",
    "evaluate",
    "loss_fn",
    "make_method",
    "predict",
    "result_row",
    "results_table",
    "seconds_per_step",
    "train",
]

KINDS = ("sc", "hc", "moe")
NAMES = {"sc": "PI-SC", "hc": "PI-HC", "moe": "PI-HC-MoE"}


class InitialConditionInput(eqx.Module):
    """The paper's backbone input: `hcmoe.models.fno_input(grid, data[name])`, i.e. the grid
    coordinates (normalised to `[0, 1]`) and the initial condition broadcast over time.

    **Arguments:**

    - `name`: the entry of the PDE data holding the initial condition (e.g. `"u0"`, `"w0"`).
      None: the data's only entry.
    - `extents`: fixed `(low, high)` per axis name for the normalisation, e.g.
      `{"t": (0.0, 500.0)}`, so that grids covering different spans (train on `t <= 400`,
      predict up to 500) see the same coordinates for the same physical point. Axes not named
      are normalised over the grid's own extent.
    """

    name: str | None = eqx.field(static=True, default=None)
    extents: tuple[tuple[str, tuple[float, float]], ...] = eqx.field(static=True, default=())

    def __init__(self, name: str | None = None, extents=None):
        self.name = name
        self.extents = tuple((str(k), (float(lo), float(hi)))
                             for k, (lo, hi) in dict(extents or {}).items())

    def __call__(self, grid: Grid, data: Mapping[str, Array]) -> Array:
        name = self.name
        if name is None:
            if not isinstance(data, Mapping) or len(data) != 1:
                got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
                raise ValueError(
                    "inputs: InitialConditionInput() takes the initial condition from data "
                    f"with a single entry; got {got}. Pass InitialConditionInput('u0') to name it."
                )
            (name,) = data
        if name not in data:
            raise ValueError(f"inputs: data has no entry {name!r}; got {sorted(data)}.")
        x = fno_input(grid, data[name])
        for axis_name, (low, high) in self.extents:
            axis = grid.axis(axis_name)
            own_low, own_high = grid.extent(axis_name)
            physical = x[..., axis] * (own_high - own_low) + own_low
            x = x.at[..., axis].set((physical - low) / (high - low))
        return x


class WeightedResidual(AbstractPDE):
    """`pde` with its residual multiplied by `weight`; operators, conditions and ansatz unchanged.

    The weight balances the PDE rows against the condition rows in the constraint solve and
    the residual term against the condition term in the loss. E.g. diffusion–sorption on
    `t in [0, 500]` has residuals of order 1e-3 next to IC/BC residuals of order 1;
    `weight=500` measures time in units of the horizon instead.
    """

    pde: AbstractPDE
    weight: float

    @property
    def linear(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.pde.linear

    def operators(self):
        return self.pde.operators()

    def residual(self, values, coords, data):
        return self.weight * self.pde.residual(values, coords, data)

    def conditions(self, grid, data):
        return self.pde.conditions(grid, data)

    def particular(self, grid, data):
        return self.pde.particular(grid, data)

    def transform_basis(self, basis, grid, data):
        return self.pde.transform_basis(basis, grid, data)

    def residual_mask(self, grid):
        return self.pde.residual_mask(grid)


class Method(eqx.Module):
    """A backbone turned into a PDE solver by PI-SC, PI-HC or PI-HC-MoE (see the module
    docstring). Build it with `make_method`; it is an `eqx.Module` whose only trainable arrays
    are the backbone's.

    `method(data, key=key)` maps one sample's PDE data (e.g. `{"u0": (nx,)}`) to a `Solution`
    on `method.grid`; `grid=` evaluates on another grid (the backbone input is rebuilt there and
    a coordinate `Partition` applies at any resolution). For `"sc"`, `Solution.stats` is None
    and `weights` are the fixed ones.
    """

    kind: str = eqx.field(static=True)
    model: Any
    pde: AbstractPDE
    grid: Grid
    inputs: Callable[[Grid, Any], Array]

    def __call__(
        self, data: Any, *, key: PRNGKeyArray | None = None, grid: Grid | None = None
    ) -> Solution:
        grid = self.grid if grid is None else grid
        x = self.inputs(grid, data)
        if self.kind == "sc":
            return self._soft(self.model(x), grid, data)
        return self.model(x, data, key=key, grid=grid)

    def _soft(self, basis: Array, grid: Grid, data: Any) -> Solution:
        grid.check_field(basis, "backbone output", trailing=1)
        transformed, particular, _ = ansatz(self.pde, basis, grid, data)  # exact conditions too
        u = jnp.sum(transformed, axis=-1)
        if particular is not None:
            u = u + jnp.asarray(particular, u.dtype)
        weights = jnp.ones((1, basis.shape[-1]), basis.dtype)
        return Solution(u, weights, None)  # pyright: ignore[reportArgumentType]

    @property
    def name(self) -> str:
        """The paper's name of the method: PI-SC, PI-HC or PI-HC-MoE."""
        return NAMES[self.kind]

    @property
    def backbone(self):
        """The network that outputs the basis functions."""
        return self.model if self.kind == "sc" else self.model.model

    @property
    def partition(self) -> AbstractPartition | None:
        """The experts' partition (None for PI-SC, which solves nothing)."""
        return None if self.kind == "sc" else self.model.partition

    def labels(self, grid: Grid | None = None) -> np.ndarray | None:
        """The expert label of every grid point (None for PI-SC), e.g. for plotting."""
        partition = self.partition
        return None if partition is None else partition.labels(self.grid if grid is None else grid)


def make_method(
    kind: str,
    backbone,
    pde: AbstractPDE,
    grid: Grid,
    partition: AbstractPartition | np.ndarray | None = None,
    *,
    inputs: Callable[[Grid, Any], Array] | None = None,
    residual_weight: float = 1.0,
    **solve_options,
) -> Method:
    """Build PI-SC (`"sc"`), PI-HC (`"hc"`) or PI-HC-MoE (`"moe"`) around a backbone.

    `"hc"` is `hcmoe.constrain(backbone, pde, None)` (one expert) and `"moe"` is
    `hcmoe.constrain(backbone, pde, partition)`; `"sc"` uses the backbone's output directly
    (`u = u_p + T(B) 1`). `partition` and `solve_options` are used only where they apply, so
    one call site can build all three methods with the same arguments.

    **Arguments:**

    - `kind`: `"sc"`, `"hc"` or `"moe"`.
    - `backbone`: an Equinox module mapping `inputs(grid, data)` to basis functions of shape
      `(*grid.shape, n_basis)` (e.g. `hcmoe.models.FNO`).
    - `pde`: an `hcmoe.AbstractPDE`.
    - `grid`: the training grid.
    - `partition`: the experts of `"moe"` (required there; e.g. `hcmoe.Partition(t=1, x=4)`).
      Ignored by `"sc"` and `"hc"`.
    - `inputs`: `inputs(grid, data) -> x`, the backbone input of one sample; default
      `InitialConditionInput()` (the paper's: coordinates and the initial condition).
    - `residual_weight`: multiplies the PDE residual, in the solve and in the loss (see
      `WeightedResidual`); 1 keeps the PDE as it is.
    - `**solve_options`: options of `hcmoe.solve` (`points_per_expert`, `max_steps`, `rtol`,
      `atol`, `ridge`, ...) for `"hc"` and `"moe"`; ignored by `"sc"`.

    **Raises:** `ValueError` for an unknown `kind`, a backbone that is not an Equinox module,
    `"moe"` without a partition, or an unknown solve option.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}; got {kind!r}.")
    if not isinstance(backbone, eqx.Module):
        raise ValueError(
            f"backbone: expected an Equinox module; got {type(backbone).__name__}. For Flax "
            "backbones use hcmoe.constrain directly (see examples/flax_nnx_backbone.py)."
        )
    if not isinstance(grid, Grid):
        raise ValueError(f"grid: expected an hcmoe.Grid; got {type(grid).__name__}.")
    if not isinstance(pde, AbstractPDE):
        raise ValueError(f"pde: expected an hcmoe.AbstractPDE; got {type(pde).__name__}.")
    inputs = InitialConditionInput() if inputs is None else inputs
    if residual_weight != 1.0:
        pde = WeightedResidual(pde, float(residual_weight))
    if kind == "sc":
        return Method(kind, backbone, pde, grid, inputs)
    if kind == "moe" and partition is None:
        raise ValueError(
            "partition: 'moe' needs the experts' partition, e.g. hcmoe.Partition(t=1, x=4); "
            "got None (a single expert is 'hc')."
        )
    experts = None if kind == "hc" else as_partition(partition)
    model = constrain(backbone, pde, experts, grid=grid, **solve_options)
    return Method(kind, model, pde, grid, inputs)


# -- training ----------------------------------------------------------------------------------
def _batch_size(data) -> int:
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jtu.tree_leaves(data)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "data: expected PDE data whose arrays share a leading batch axis; got leading "
            f"sizes {sorted(map(str, sizes))}."
        )
    return sizes.pop()


def predict(
    method: Method, data: Any, *, key: PRNGKeyArray | None = None, grid: Grid | None = None
) -> Solution:
    """`method` on a batch of PDE data (leading batch axis); the key is split per sample."""
    keys = jr.split(jr.key(0) if key is None else key, _batch_size(data))
    return jax.vmap(lambda d, k: method(d, key=k, grid=grid))(data, keys)


def loss_fn(method: Method, data: Any, key: PRNGKeyArray) -> tuple[Array, dict[str, Array]]:
    """The physics loss of every method on a batch of PDE data (a `training.fit` loss).

    `loss = mean over samples of residual_loss(u) + condition_loss(u)`, both on the whole
    training grid. `aux`: the two terms and, for PI-HC(-MoE), `training.solver_metrics`
    (mean solver steps, number of non-converged expert solves, largest residual norm).
    """
    solution = predict(method, data, key=key)
    grid, pde = method.grid, method.pde

    def terms(u, d):
        return losses.residual_loss(u, pde, grid, d), losses.condition_loss(u, pde, grid, d)

    residual, conditions = jax.vmap(terms)(solution.u, data)
    residual, conditions = jnp.mean(residual), jnp.mean(conditions)
    aux = {"residual_loss": residual, "condition_loss": conditions}
    if solution.stats is not None:
        aux.update(solver_metrics(solution.stats))
    if method.kind == "moe":
        labels = method.labels()
        aux["seam_jump"] = jnp.max(jax.vmap(lambda u: losses.seam_jump(u, labels))(solution.u))
    return residual + conditions, aux


# -- evaluation --------------------------------------------------------------------------------
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

    def summary(self, prefix: str = "rel_l2") -> dict[str, float]:
        """Scalars for logs: `{prefix: mean, prefix_std: std, solver_steps, non_converged}`."""
        return {
            prefix: self.mean,
            f"{prefix}_std": self.std,
            "solver_steps": self.solver_steps,
            "non_converged": float(self.non_converged),
        }


@eqx.filter_jit
def _evaluate_batch(method, data, references, key, grid, num_predictions):
    solution = predict(method, data, key=key, grid=grid)
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
            method, batch, jnp.asarray(references[index]), jr.fold_in(key, start), grid, keep
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


def train(
    method: Method,
    train_data: Any,
    *,
    steps: int,
    batch_size: int,
    key: PRNGKeyArray,
    optimizer: optax.GradientTransformation | None = None,
    eval_data: tuple[Any, Any] | None = None,
    eval_every: int | None = None,
    eval_batch_size: int = 16,
    run_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    log_every: int = 10,
    progress: bool = True,
) -> FitResult:
    """Train a method with `loss_fn` through `hcmoe.training.fit`.

    The progress bar shows the loss, its residual and condition terms, the mean solver
    steps and the number of non-converged expert solves, and the latest held-out error.

    **Arguments:**

    - `method`: a `Method`.
    - `train_data`: PDE data of the training samples (leading sample axis), e.g.
      `{"u0": (n, nx)}`: the loss needs no solutions.
    - `steps`, `batch_size`, `key`: see `fit`.
    - `optimizer`: default `training.paper_optimizer()` (Adam, clipping at global norm 1,
      1e-3 halved every 800 steps down to 1e-4).
    - `eval_data`: `(data, references)` of a held-out split: evaluated every `eval_every` steps
      and at the end (`rel_l2`, `rel_l2_std` in the metrics).
    - `eval_batch_size`: see `evaluate`.
    - `run_dir`: directory for `checkpoints/`, `metrics.jsonl` and `metrics.csv`; a run
      resumes from its checkpoints (`resume=True`) without losing a step.
    - `checkpoint_every`, `log_every`, `progress`: see `fit`.

    **Returns:** `fit`'s `FitResult` (the trained method in `.model`).
    """
    eval_fn = None
    if eval_data is not None:
        test_data, references = eval_data

        def eval_fn(model):
            result = evaluate(model, test_data, references, batch_size=eval_batch_size)
            return {"rel_l2": result.mean, "rel_l2_std": result.std}

    run_dir = None if run_dir is None else Path(run_dir)
    return fit(
        method,
        loss_fn,
        train_data,
        optimizer=paper_optimizer() if optimizer is None else optimizer,
        steps=steps,
        batch_size=batch_size,
        key=key,
        eval_fn=eval_fn,
        eval_every=eval_every,
        checkpoint_dir=None if run_dir is None else run_dir / "checkpoints",
        checkpoint_every=checkpoint_every,
        resume=resume,
        metrics_path=None if run_dir is None else run_dir / "metrics.jsonl",
        log_every=log_every,
        progress=progress,
    )


def seconds_per_step(history) -> float:
    """Median wall time per training step from `fit`'s records, leaving out the first record
    (it includes compilation); `nan` without records."""
    rates = [r["steps_per_second"] for r in history if r.get("kind") == "train"]
    rates = rates[1:] if len(rates) > 1 else rates
    return float(np.median(1.0 / np.asarray(rates))) if rates else float("nan")


def result_row(method: Method, evaluation: Evaluation, history=()) -> dict[str, Any]:
    """A JSON-serialisable summary of a trained method (the rows of `results_table`):
    `method`, `kind`, `rel_l2_mean`, `rel_l2_std`, per-sample `rel_l2`, `solver_steps`,
    `non_converged` and, from `fit`'s history, `seconds_per_step` and `steps`."""
    steps = [r["step"] for r in history if r.get("kind") == "train"]
    return {
        "method": method.name,
        "kind": method.kind,
        "rel_l2_mean": evaluation.mean,
        "rel_l2_std": evaluation.std,
        "rel_l2": [float(e) for e in evaluation.errors],
        "solver_steps": evaluation.solver_steps,
        "non_converged": evaluation.non_converged,
        "seconds_per_step": seconds_per_step(history),
        "steps": max(steps, default=0),
    }


def results_table(rows) -> str:
    """A Markdown comparison table from result rows.

    Each row is a mapping with `method`, `rel_l2_mean`, `rel_l2_std` (fractions) and
    optionally `seconds_per_step`, `solver_steps` and `non_converged` (as written by the
    examples).
    """
    lines = [
        "| method | rel. L2 error (mean ± std) | time / step | solver iterations "
        "| non-converged solves |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        error = f"{100 * row['rel_l2_mean']:.2f}% ± {100 * row['rel_l2_std']:.2f}%"
        seconds = row.get("seconds_per_step", float("nan"))
        time = f"{1e3 * seconds:.0f} ms" if np.isfinite(seconds) else "–"
        iterations = f"{row['solver_steps']:.1f}" if "solver_steps" in row else "–"
        if row.get("kind") == "sc":
            iterations = "– (no solve)"
        failed = str(row.get("non_converged", "–"))
        lines.append(f"| {row['method']} | {error} | {time} | {iterations} | {failed} |")
    return "\n".join(lines)
