"""`fit`: one training loop for soft-constrained, hard-constrained and mixture-of-experts models.

Ctrl-C is handled by the loop itself: the first SIGINT only raises a flag, the step in flight
finishes, its metrics are logged, a checkpoint is written and `KeyboardInterrupt` is raised, so
no interrupt is lost (an interrupt delivered while Python runs a garbage-collection callback
would otherwise be printed as "Exception ignored" and swallowed) and no step is half done. A
second Ctrl-C stops at once, abandoning the step in flight (the last checkpoint is kept).

On a device mesh (`mesh=`, see `_distributed.py`) the same loop is data parallel: the state is
replicated, each step's batch split over the mesh's `"batch"` axis, and under
`jax.distributed` every process runs the loop, loads its own rows, and stops at the same step
on a signal that any of them received; process 0 alone writes files and shows progress.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray
from tqdm.auto import tqdm

from .._files import atomic_write
from .._interrupt import InterruptGuard, Terminated
from ..data import normalise_params
from ._batches import Batches
from ._checkpoints import RECORD, _read_record, key_record, load_checkpoint, save_checkpoint
from ._distributed import (
    agreed_signal,
    check_fit_mesh,
    constrain_replicated,
    global_batch,
    is_main_process,
    local_rows,
    replicate,
)
from ._metrics import Logger, read_metrics, write_csv_beside


LossFn = Callable[[Any, Any, PRNGKeyArray], tuple[Array, Mapping[str, Array]]]


def _loss_and_aux(model, batch, key, loss_fn):
    out = loss_fn(model, batch, key)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
        raise TypeError(
            "loss_fn: expected to return `(loss, aux)` with `aux` a dict of scalar metrics "
            f"(possibly empty); got {type(out).__name__}."
        )
    loss, aux = out
    for name, value in [("loss", loss), *aux.items()]:
        if jnp.shape(value) != ():
            raise ValueError(
                f"loss_fn: {name!r} must be a scalar (reduce over the batch); got shape "
                f"{jnp.shape(value)}."
            )
    return loss, dict(aux)


@eqx.filter_jit
def _train_step(model, opt_state, batch, loss_key, step, loss_fn, optimizer, trainable, mesh):
    params, frozen = eqx.partition(model, trainable)
    key = jr.fold_in(loss_key, step)

    def loss_of_params(params):
        return _loss_and_aux(eqx.combine(params, frozen), batch, key, loss_fn)

    (loss, aux), grads = eqx.filter_value_and_grad(loss_of_params, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads)}
    if mesh is not None:  # the state stays replicated over the mesh, as it came in
        return constrain_replicated((model, opt_state, metrics), mesh)
    return model, opt_state, metrics


class FitResult(NamedTuple):
    """What `fit` returns: the trained model, the optimizer state, the number of completed
    steps and the metric records (those kept from a resumed run included)."""

    model: Any
    opt_state: Any
    step: int
    history: list[dict[str, Any]]


def _check_every(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"{name}: expected a positive integer or None; got {value!r}.")


def _settings_record(settings) -> dict[str, Any] | None:
    """`settings` as a checkpoint record reads it back (the dataset cache's normalisation)."""
    if settings is None:
        return None
    try:
        return normalise_params(settings, name="settings")
    except TypeError as error:
        raise ValueError(f"settings: expected JSON-serialisable values ({error}).") from None


class RunMismatchError(ValueError):
    """The checkpoint directory holds another run's checkpoint (another key or other
    `settings`): resuming it would continue, or re-evaluate, that run as if it were this one."""


def _check_run(checkpoint_dir, record, key, settings) -> None:
    """A checkpoint record of this run: the same key and, when both are known, settings."""
    saved_key = record.get("key")
    if saved_key != key_record(key):
        raise RunMismatchError(
            f"key: the checkpoint in {checkpoint_dir} was written by a run with key "
            f"{saved_key}; got {key_record(key)}. Resume with the same key (a different key "
            "would not reproduce the run), pass resume=False, or use a new checkpoint_dir."
        )
    saved = record.get("settings")
    if settings is not None and saved is not None and saved != settings:
        names = sorted(n for n in saved.keys() | settings.keys() if saved.get(n) != settings.get(n))
        raise RunMismatchError(
            f"settings: the checkpoint in {checkpoint_dir} was written with "
            + ", ".join(f"{n}={saved.get(n)!r}" for n in names)
            + "; got "
            + ", ".join(f"{n}={settings.get(n)!r}" for n in names)
            + ". Resume with the same "
            "settings (another run's checkpoint would be continued, or re-evaluated, as if it "
            "were this one), pass resume=False, or use a new checkpoint_dir."
        )


def _resume(checkpoint_dir, model, opt_state, key, metrics_path, settings, mesh):
    try:  # before loading: another run's model may not even fit this one's template
        committed = _read_record(Path(checkpoint_dir) / RECORD)
    except (OSError, ValueError):
        committed = None  # absent or damaged: load_checkpoint decides
    if committed is not None:
        _check_run(checkpoint_dir, committed, key, settings)
    checkpoint = load_checkpoint(checkpoint_dir, model, opt_state, mesh=mesh)
    if checkpoint is None:
        return 0, model, opt_state, []
    if checkpoint.record != committed:  # an older or rebuilt record was loaded instead
        _check_run(checkpoint_dir, checkpoint.record, key, settings)
    history = []
    if metrics_path is not None:
        history = [r for r in read_metrics(metrics_path) if r["step"] <= checkpoint.step]
    return checkpoint.step, checkpoint.model, checkpoint.opt_state, history


def fit(
    model,
    loss_fn: LossFn,
    train_data,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    batch_size: int,
    key: PRNGKeyArray,
    eval_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    eval_every: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    resume: bool = True,
    metrics_path: str | os.PathLike | None = None,
    log_every: int = 10,
    progress: bool = True,
    trainable=eqx.is_inexact_array,
    settings: Mapping[str, Any] | None = None,
    mesh=None,
) -> FitResult:
    """Train `model` for `steps` optimizer steps of `loss_fn` on batches of `train_data`.

    Each step is `(loss, aux), g = ∇ loss_fn(model, batch, key_s)`; `model ← model +
    optimizer.update(g)`, jitted with `eqx.filter_jit`; the gradient and the optimizer see the
    leaves selected by `trainable` (default: every floating-point array of `model`).

    The progress bar shows the loss, every `aux` metric (e.g. `solver_steps` and
    `non_converged` from `solver_metrics`) and the latest evaluation. Every `log_every` steps
    a record with the window means of the loss, the aux metrics, the gradient norm, the
    learning rate (when the optimizer injects it, as `paper_optimizer` does) and the speed is
    appended to `metrics_path` (JSON lines, `"kind": "train"`); evaluations are records with
    `"kind": "eval"`. At the end (and at every checkpoint) a CSV with the same stem is
    written beside it. A non-finite loss raises `FloatingPointError` at the next log.

    With `checkpoint_dir`, a checkpoint is written every `checkpoint_every` steps, at the
    end, and on an interrupt (so an interrupted run loses no step). Ctrl-C (SIGINT) and
    SIGTERM (what SLURM and other schedulers send before killing a job) are handled by `fit`
    itself while it runs in the main thread: the step in flight finishes, is logged and
    checkpointed, then `KeyboardInterrupt` (SIGINT) or `hcmoe.training.Terminated` (SIGTERM;
    a `SystemExit` with status 143, so an uncaught one ends the process as terminated) is
    raised; a second signal stops at once. (A job started with `cmd &` from a
    non-interactive shell ignores SIGINT altogether: stop such a job with SIGTERM.) A resumed
    run says so on stderr ("fit: resumed from step N of M, <dir>"), whatever `progress` is.
    A truncated or corrupt newest checkpoint is skipped with a `CheckpointWarning` and the
    newest intact one is resumed. With `resume=True`
    a run starts from the directory's latest checkpoint and continues to `steps`; metric
    records after that checkpoint are dropped, and the result is identical to an
    uninterrupted run. Checkpoints are Orbax directories (see `save_checkpoint`); a resumed
    run may use another mesh, device count or number of processes than the one that wrote
    them.

    With `mesh` (a `jax.sharding.Mesh` with a `"batch"` axis, e.g. `hcmoe.expert_mesh(batch=
    2)`), each step's batch is split over `"batch"` and the model and optimizer state are
    replicated over the mesh; the step is the same program, partitioned by XLA, so the result
    equals the one-device run's to rounding. Under `jax.distributed` (several processes, one
    global mesh) every process calls `fit` with the same arguments: each loads only the rows
    of the batch its devices hold, a signal received by any process stops all of them after
    the same step, and only process 0 writes the metrics and checkpoint records and shows
    the progress bar (every process writes its part of a checkpoint through Orbax, in the
    shared `checkpoint_dir`). `eval_fn` runs in every process on the replicated model, and
    the returned model is replicated too (`jax.device_get` gives a host copy). See the
    scaling guide.

    **Arguments:**

    - `model`: an Equinox module (or any pytree; floating-point arrays are trained).
    - `loss_fn`: `loss_fn(model, batch, key) -> (loss, aux)`, `loss` a scalar and `aux` a
        dict of scalar metrics (may be empty). It handles the batch axis itself (`jax.vmap`).
    - `train_data`: a pytree of arrays with a shared leading sample axis (NumPy arrays stay
        on the host until batched), or a pure function `(step, key) -> batch`. On a mesh,
        such a function returns this process's part of the batch: its rows in order, every
        process as many (with one process: the whole batch).
    - `optimizer`: an optax transformation, e.g. `paper_optimizer()`.
    - `steps`: total optimizer steps (a resumed run counts the steps it already has).
    - `batch_size`: samples per step (ignored when `train_data` is a function).
    - `key`: PRNG key for batch order and the per-step loss keys.
    - `eval_fn`: `eval_fn(model) -> dict` of scalar metrics, run every `eval_every` steps and
        after the last step.
    - `eval_every`: steps between evaluations (`None`: only at the end).
    - `checkpoint_dir`: directory for checkpoints (`None`: no checkpoints, no resume).
    - `checkpoint_every`: steps between checkpoints (`None`: only at the end).
    - `keep_checkpoints`: number of checkpoint files kept.
    - `resume`: continue from `checkpoint_dir`'s latest checkpoint if there is one.
    - `metrics_path`: JSON-lines metrics file (`None`: keep records in memory only).
    - `log_every`: steps per metrics record and progress-bar update.
    - `progress`: show a tqdm progress bar.
    - `trainable`: an `eqx.partition` filter spec choosing the trained leaves (a function of
        a leaf, or a pytree of bools shaped like `model`), e.g. to freeze a backbone part or
        arrays held by a wrapper (such as solver options).
    - `settings`: JSON-serialisable description of the run (points, experts, a formulation:
        what the model and loss do not show), stored in every checkpoint; resuming a
        checkpoint written with other settings is refused. `steps` is not a setting: a resumed
        run may be extended.
    - `mesh`: a device mesh to train on, data parallel (see above); `None`: the default
        device. Required when several processes run (`jax.distributed`).

    **Returns:** a `FitResult(model, opt_state, step, history)`.

    **Raises:** `ValueError` for invalid options, a checkpoint of another run
    (`RunMismatchError`, a `ValueError`: other key or `settings`) or
    a checkpoint that does not fit the model; `TypeError` if `loss_fn` does not return
    `(loss, aux)`; `FloatingPointError` for a non-finite loss.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer; got {steps!r}.")
    for name, value in [
        ("eval_every", eval_every),
        ("checkpoint_every", checkpoint_every),
        ("log_every", log_every),
    ]:
        _check_every(name, value)
    if log_every is None:
        raise ValueError("log_every: expected a positive integer; got None.")
    if eval_every is not None and eval_fn is None:
        raise ValueError("eval_every: given without an eval_fn.")
    settings = _settings_record(settings)
    mesh = check_fit_mesh(mesh, batch_size, callable(train_data))
    main = is_main_process()
    data_key, loss_key = jr.split(key)
    batches = Batches(train_data, batch_size, data_key)
    opt_state = optimizer.init(eqx.filter(model, trainable))

    rows = None if mesh is None or callable(train_data) else local_rows(mesh, batch_size)

    def batch_at(step):
        if mesh is None:
            return batches(step)
        if rows is None:  # a function returns this process's rows itself
            return global_batch(batches(step), mesh, None)
        return global_batch(batches(step, rows), mesh, batch_size)

    step, history = 0, []
    if checkpoint_dir is not None and resume:
        step, model, opt_state, history = _resume(
            checkpoint_dir, model, opt_state, key, metrics_path, settings, mesh
        )
        if step and main:
            done = " (nothing left to train)" if step >= steps else ""
            print(
                f"fit: resumed from step {step} of {steps}, {checkpoint_dir}{done}",
                file=sys.stderr,
                flush=True,
            )
    if metrics_path is not None and main:
        atomic_write(Path(metrics_path), "".join(json.dumps(r) + "\n" for r in history).encode())
    model, opt_state, loss_key = replicate((model, opt_state, loss_key), mesh)

    def checkpoint():
        if checkpoint_dir is not None:
            save_checkpoint(
                checkpoint_dir,
                step,
                model,
                opt_state,
                key=key,
                keep=keep_checkpoints,
                extra=None if settings is None else {"settings": settings},
            )
            if main:
                write_csv_beside(metrics_path, history)

    start_time = time.perf_counter()
    last_checkpoint = last_eval = step
    with (
        InterruptGuard(
            "fit: interrupted; finishing the current step and writing a checkpoint (the same "
            "signal again stops at once)."
        ) as interrupt,
        tqdm(
            total=steps, initial=min(step, steps), disable=not (progress and main), unit="step"
        ) as bar,
    ):
        logger = Logger(metrics_path if main else None, history, bar, start_time)

        def check_interrupt():  # every process stops after the same step
            received, interrupt.received = interrupt.received, agreed_signal(interrupt.received)
            if received is None and interrupt.received is not None and main:
                print(
                    f"fit: another process received {signal.Signals(interrupt.received).name}; "
                    "finishing this step and writing a checkpoint.",
                    file=sys.stderr,
                    flush=True,
                )
            interrupt.check()

        try:
            while step < steps:
                model, opt_state, metrics = _train_step(
                    model,
                    opt_state,
                    batch_at(step),
                    loss_key,
                    replicate(np.asarray(step, np.int32), mesh),
                    loss_fn,
                    optimizer,
                    trainable,
                    mesh,
                )
                step += 1
                bar.update()
                logger.append(metrics)
                do_eval = eval_every is not None and step % eval_every == 0
                do_checkpoint = checkpoint_every is not None and step % checkpoint_every == 0
                if step % log_every == 0 or step == steps or do_eval or do_checkpoint:
                    logger.flush(step, opt_state)
                if do_eval:
                    assert eval_fn is not None  # do_eval needs eval_every, which needs eval_fn
                    logger.evaluation(step, eval_fn(model))
                    last_eval = step
                if do_checkpoint:
                    checkpoint()
                    last_checkpoint = step
                check_interrupt()  # a Ctrl-C during this step stops here, the step complete
        except (KeyboardInterrupt, Terminated):
            logger.flush(step, opt_state)
            if step != last_checkpoint:
                checkpoint()
            raise
        if eval_fn is not None and (last_eval != step or step == 0):
            logger.evaluation(step, eval_fn(model))
        if step != last_checkpoint:
            checkpoint()
        check_interrupt()
    if main:
        write_csv_beside(metrics_path, history)
    return FitResult(model, opt_state, step, history)
