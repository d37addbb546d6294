"""The physics loss shared by the three methods and the training driver."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray

from .. import losses
from ..training import FitResult, fit, load_checkpoint, paper_optimizer, solver_metrics
from ._evaluate import evaluate
from ._method import Method, predict


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


def _describe(value):
    """A JSON-able record of a solve option: scalars as they are, option objects
    (`hcmoe.Rows`, couplings, solvers) as their type and scalar fields; arrays: None."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
        record = {
            name: v
            for name, v in fields.items()
            if v is None or isinstance(v, (bool, int, float, str))
        }
        return {"type": type(value).__name__, **record}
    return None


def _run_settings(method: Method, settings: dict[str, Any] | None) -> dict[str, Any]:
    """What identifies a run besides its key: the method, its grid, its solve's scalar options
    (points per expert, ridge, coupling, ...) and the caller's `settings`."""
    options = getattr(method.model, "options", None) or {}
    described = {k: _describe(v) for k, v in sorted(options.items())}
    solve = {k: v for k, v in described.items() if v is not None}
    record: dict[str, Any] = {"method": method.name, "grid": list(method.grid.shape)}
    if method.kind != "sc":
        record["solve"] = solve
        partition = method.partition
        assert partition is not None  # None only for "sc"
        record["experts"] = int(partition.num_experts(method.grid))
    return {**record, **dict(settings or {})}


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
    settings: dict[str, Any] | None = None,
    mesh=None,
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
    - `settings`: see `fit`: a resume under other settings is refused. The method's name, its
      grid and, for PI-HC(-MoE), its number of experts and scalar solve options (points per
      expert, ridge, coupling, ...) are always part of them.
    - `mesh`: train data parallel on a `("batch", "experts")` mesh, e.g.
      `hcmoe.expert_mesh(batch=jax.process_count())`, on one or several processes (see
      `fit` and the scaling guide). The held-out evaluation then runs in every process on a
      host copy of the model (`jax.device_get`), on that process's default device.

    **Returns:** `fit`'s `FitResult` (the trained method in `.model`).
    """
    eval_fn: Callable[[Any], dict[str, float]] | None = None
    if eval_data is not None:
        test_data, references = eval_data

        def held_out(model) -> dict[str, float]:
            if mesh is not None:  # the state spans processes; each evaluates its own copy
                model = jax.device_get(model)
            result = evaluate(model, test_data, references, batch_size=eval_batch_size)
            return {"rel_l2": result.mean, "rel_l2_std": result.std}

        eval_fn = held_out

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
        settings=_run_settings(method, settings),
        mesh=mesh,
    )


def load(method: Method, run_dir: str | os.PathLike, *, mesh=None) -> Method:
    """The method trained in `run_dir`, ready to evaluate or predict.

    `method` is built as it was for training (`make_method` with the same kind, backbone
    architecture, PDE, grid and options; its parameters may be fresh); the result is that
    method with the parameters of the newest intact checkpoint in `run_dir/checkpoints`
    (written by `train(..., run_dir=run_dir)`; the optimizer's state is not needed), on the
    default device or, with `mesh`, replicated over it (whatever mesh trained it).

    ```python
    method = hcmoe.methods.make_method("moe", backbone, pde, grid, partition, ...)
    trained = hcmoe.methods.load(method, "runs/moe")
    print(hcmoe.methods.evaluate(trained, test_data, references, rows=hcmoe.Rows()))
    ```

    **Raises:** `FileNotFoundError` when `run_dir` holds no checkpoint; `ValueError` when the
    checkpoint does not fit `method` (another architecture), naming the file.
    """
    directory = Path(run_dir) / "checkpoints"
    checkpoint = load_checkpoint(directory, method, mesh=mesh)
    if checkpoint is None:
        raise FileNotFoundError(
            f"run_dir: no checkpoint in {directory}; hcmoe.methods.train(..., run_dir=...) "
            "writes them."
        )
    return checkpoint.model
