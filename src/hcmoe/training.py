"""One training loop for soft-constrained, hard-constrained and mixture-of-experts models.

`fit` takes any Equinox model and a loss `loss_fn(model, batch, key) -> (loss, aux)`, so PI-SC,
PI-HC and PI-HC-MoE differ only in the loss they pass:

```python
def loss_fn(model, batch, key):
    keys = jr.split(key, batch["u0"].shape[0])
    solution = jax.vmap(model)(batch["x"], batch["data"], key=keys)
    loss = jnp.mean(jax.vmap(residual)(solution.u, batch["data"]))
    return loss, hcmoe.training.solver_metrics(solution.stats)

result = hcmoe.training.fit(
    model, loss_fn, train_data, optimizer=hcmoe.training.paper_optimizer(), steps=4000,
    batch_size=6, key=jr.key(0), checkpoint_dir="runs/ds/checkpoints",
    metrics_path="runs/ds/metrics.jsonl",
)
```

Every random choice is a pure function of `(key, step)`: the batch of step `s` is slice `s` of
a per-epoch permutation, the loss key is `fold_in(key, s)`. A checkpoint therefore only needs
the model, the optimizer state and the step, and a resumed run reproduces an uninterrupted one
bit for bit.

Checkpoints are `eqx.tree_serialise_leaves` files (NumPy arrays, never pickle) plus a JSON
record `checkpoint.json` naming the latest one; each file is written to a temporary name and
moved into place with `os.replace`, and the record is written last, so a crash at any moment
leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray
from tqdm.auto import tqdm


_CHECKPOINT_RECORD = "checkpoint.json"
_CHECKPOINT_FORMAT = "hcmoe-checkpoint"
_CHECKPOINT_VERSION = 1

LossFn = Callable[[Any, Any, PRNGKeyArray], tuple[Array, Mapping[str, Array]]]


# -- optimiser ---------------------------------------------------------------------------------
def paper_schedule(
    learning_rate: float = 1e-3,
    *,
    decay_every: int = 800,
    decay_rate: float = 0.5,
    min_learning_rate: float = 1e-4,
) -> optax.Schedule:
    """The paper's step schedule: `learning_rate · decay_rate^⌊step / decay_every⌋`, floored.

    With the defaults: 1e-3, halved every 800 steps, never below 1e-4.
    """
    return optax.exponential_decay(
        learning_rate,
        transition_steps=decay_every,
        decay_rate=decay_rate,
        staircase=True,
        end_value=min_learning_rate,
    )


def paper_optimizer(
    learning_rate: float = 1e-3,
    *,
    decay_every: int = 800,
    decay_rate: float = 0.5,
    min_learning_rate: float = 1e-4,
    clip_norm: float = 1.0,
) -> optax.GradientTransformation:
    """The paper's optimiser: gradients clipped to global norm `clip_norm`, then Adam with
    `paper_schedule`. The learning rate is an injected hyperparameter, so `fit` logs it."""
    schedule = paper_schedule(
        learning_rate,
        decay_every=decay_every,
        decay_rate=decay_rate,
        min_learning_rate=min_learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.inject_hyperparams(optax.adam)(learning_rate=schedule),
    )


def current_learning_rate(opt_state) -> float | None:
    """The learning rate held by an `optax.inject_hyperparams` state, or `None` if there is
    no unique one."""
    try:
        value = optax.tree_utils.tree_get(
            opt_state, "learning_rate", filtering=lambda _, value: eqx.is_array(value)
        )
    except KeyError:
        return None
    return None if value is None else float(value)


# -- metrics -----------------------------------------------------------------------------------
def solver_metrics(stats) -> dict[str, Array]:
    """Scalar summaries of a (batched) `Solution.stats` for a loss' `aux` dictionary.

    `solver_steps`: mean iterations over samples and experts; `non_converged`: number of
    expert solves that did not converge in the batch; `residual_norm`: largest final residual.
    """
    return {
        "solver_steps": jnp.mean(stats.num_steps.astype(jnp.float32)),
        "non_converged": jnp.sum(~jnp.asarray(stats.converged)),
        "residual_norm": jnp.max(stats.residual_norm),
    }


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines metrics file written by `fit` (`[]` if it is missing)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics_csv(records: list[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write records as CSV (columns: the union of their keys, in first-seen order)."""
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), restval="")
    writer.writeheader()
    writer.writerows(records)
    _atomic_write(Path(path), text.getvalue().encode())


# -- files -------------------------------------------------------------------------------------
def _atomic_write(path: Path, payload: bytes | Callable[[Any], None]) -> None:
    """Write `path` so that readers see the old file or the complete new one, never a part.

    `payload` is bytes, or a function that writes to a binary file object.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            if callable(payload):
                payload(file)
            else:
                file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_record(key: PRNGKeyArray) -> dict[str, Any]:
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return {
        "data": np.asarray(jr.key_data(key)).tolist(),
        "impl": str(jr.key_impl(key)) if typed else None,
    }


# -- checkpoints -------------------------------------------------------------------------------
class Checkpoint(NamedTuple):
    """A loaded checkpoint: the step it was taken after, the model, the optimizer state and
    the JSON record."""

    step: int
    model: Any
    opt_state: Any
    record: dict[str, Any]


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model,
    opt_state,
    *,
    key: PRNGKeyArray,
    keep: int = 2,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save `(model, opt_state)` after `step` optimizer steps, atomically.

    Writes `step_<step>.eqx` (via `eqx.tree_serialise_leaves`), then `checkpoint.json` naming
    it together with the step, the run's key and `extra`, then deletes all but the `keep`
    newest `.eqx` files.

    **Arguments:**

    - `directory`: the checkpoint directory (created if needed).
    - `step`: completed optimizer steps.
    - `model`, `opt_state`: the pytrees to save (array leaves are stored, static fields are
        not: loading needs a template of the same structure).
    - `key`: the run's PRNG key, recorded so that a resume with another key is refused.
    - `keep`: how many checkpoint files to keep (at least 1).
    - `extra`: JSON-serialisable metadata added to the record.

    **Returns:** the path of the checkpoint file.
    """
    if keep < 1:
        raise ValueError(f"keep: expected at least 1 checkpoint to keep; got {keep}.")
    directory = Path(directory)
    name = f"step_{step:08d}.eqx"
    _atomic_write(directory / name, lambda f: eqx.tree_serialise_leaves(f, (model, opt_state)))
    record = {
        "format": _CHECKPOINT_FORMAT,
        "version": _CHECKPOINT_VERSION,
        "step": int(step),
        "file": name,
        "key": _key_record(key),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "hcmoe_version": importlib.metadata.version("hcmoe"),
        **dict(extra or {}),
    }
    _atomic_write(directory / _CHECKPOINT_RECORD, json.dumps(record, indent=2).encode())
    for old in sorted(directory.glob("step_*.eqx"))[:-keep]:
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory / name


def load_checkpoint(directory: str | os.PathLike, model, opt_state) -> Checkpoint | None:
    """Load the latest checkpoint of `directory`, or `None` if it holds none.

    **Arguments:**

    - `directory`: the checkpoint directory.
    - `model`, `opt_state`: templates with the saved structure (e.g. the freshly
        initialised model and `optimizer.init(...)`); their array values are replaced.

    **Raises:** `ValueError` if the record is not an hcmoe checkpoint or the file does not fit
    the templates.
    """
    directory = Path(directory)
    record_path = directory / _CHECKPOINT_RECORD
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    if record.get("format") != _CHECKPOINT_FORMAT or record.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(
            f"{record_path}: expected an {_CHECKPOINT_FORMAT} record of version "
            f"{_CHECKPOINT_VERSION}; got format {record.get('format')!r}, version "
            f"{record.get('version')!r}."
        )
    path = directory / record["file"]
    try:
        model, opt_state = eqx.tree_deserialise_leaves(path, (model, opt_state))
    except (RuntimeError, ValueError, TypeError, OSError) as error:
        raise ValueError(
            f"{path}: the checkpoint does not fit the given model and optimizer state (was it "
            f"written by a different architecture or optimizer?): {error}"
        ) from error
    return Checkpoint(int(record["step"]), model, opt_state, record)


# -- batches -----------------------------------------------------------------------------------
def _dataset_size(train_data) -> int:
    sizes = {leaf.shape[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(train_data)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "train_data: expected a pytree of arrays sharing one leading (sample) axis, or a "
            f"callable `(step, key) -> batch`; got leading sizes {sorted(map(str, sizes))}."
        )
    return sizes.pop()


class _Batches:
    """Batch `s` of a dataset: slice `s mod E` of the permutation of epoch `s // E` (no
    sample repeats within an epoch; the remainder of an epoch is dropped)."""

    def __init__(self, train_data, batch_size: int, key: PRNGKeyArray):
        self.data = train_data
        self.key = key
        if callable(train_data):
            return
        size = _dataset_size(train_data)
        if not 1 <= batch_size <= size:
            raise ValueError(
                f"batch_size: expected between 1 and the dataset size {size}; got {batch_size}."
            )
        self.size, self.batch_size = size, batch_size
        self.steps_per_epoch = size // batch_size
        self._epoch, self._permutation = None, None

    def __call__(self, step: int):
        if callable(self.data):
            return self.data(step, jr.fold_in(self.key, step))
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            key = jr.fold_in(self.key, epoch)
            self._epoch, self._permutation = epoch, np.asarray(jr.permutation(key, self.size))
        start = position * self.batch_size
        indices = self._permutation[start : start + self.batch_size]
        return jax.tree.map(lambda leaf: leaf[indices], self.data)


# -- the step ----------------------------------------------------------------------------------
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
def _train_step(model, opt_state, batch, key, loss_fn, optimizer, trainable):
    params, frozen = eqx.partition(model, trainable)

    def loss_of_params(params):
        return _loss_and_aux(eqx.combine(params, frozen), batch, key, loss_fn)

    (loss, aux), grads = eqx.filter_value_and_grad(loss_of_params, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads)}
    return model, opt_state, metrics


# -- the loop ----------------------------------------------------------------------------------
class FitResult(NamedTuple):
    """What `fit` returns: the trained model, the optimizer state, the number of completed
    steps and the metric records (those kept from a resumed run included)."""

    model: Any
    opt_state: Any
    step: int
    history: list[dict[str, Any]]


def _to_float(value) -> float:
    return float(np.asarray(value))


def _format(value: float) -> str:
    return f"{value:.4g}"


class _Logger:
    """Collects per-step device metrics and writes window means to JSON lines."""

    def __init__(self, metrics_path, history, bar, start_time):
        self.path = None if metrics_path is None else Path(metrics_path)
        self.history = history
        self.bar = bar
        self.start_time = start_time
        self.window: list[dict[str, Array]] = []
        self.window_start = time.perf_counter()
        self.postfix: dict[str, str] = {}

    def append(self, metrics):
        self.window.append(metrics)

    def write(self, record):
        self.history.append(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")

    def flush(self, step: int, opt_state):
        if not self.window:
            return
        window = jax.device_get(self.window)
        losses = np.array([_to_float(m["loss"]) for m in window])
        if not np.all(np.isfinite(losses)):
            bad = step - len(window) + 1 + int(np.argmin(np.isfinite(losses)))
            raise FloatingPointError(
                f"fit: the loss became {losses[~np.isfinite(losses)][0]} at step {bad}. The "
                "model was not checkpointed after it; lower the learning rate, check the "
                "data, or inspect the solver statistics in the metrics file."
            )
        elapsed = time.perf_counter() - self.window_start
        record = {"kind": "train", "step": step}
        for name in window[0]:
            record[name] = float(np.mean([_to_float(m[name]) for m in window]))
        learning_rate = current_learning_rate(opt_state)
        if learning_rate is not None:
            record["learning_rate"] = learning_rate
        record["steps_per_second"] = len(window) / max(elapsed, 1e-12)
        record["time"] = time.perf_counter() - self.start_time
        self.write(record)
        self.postfix.update({k: _format(v) for k, v in record.items() if k in window[0]})
        self.bar.set_postfix(self.postfix, refresh=False)
        self.window = []
        self.window_start = time.perf_counter()

    def evaluation(self, step: int, values: Mapping[str, Any]):
        record = {"kind": "eval", "step": step}
        for name, value in values.items():
            if np.ndim(value) != 0:
                raise ValueError(
                    f"eval_fn: {name!r} must be a scalar; got shape {np.shape(value)}."
                )
            record[name] = _to_float(value)
        record["time"] = time.perf_counter() - self.start_time
        self.write(record)
        self.postfix.update({f"eval_{k}": _format(v) for k, v in record.items() if k in values})
        self.bar.set_postfix(self.postfix, refresh=False)


def _check_every(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"{name}: expected a positive integer or None; got {value!r}.")


def _resume(checkpoint_dir, model, opt_state, key, metrics_path):
    checkpoint = load_checkpoint(checkpoint_dir, model, opt_state)
    if checkpoint is None:
        return 0, model, opt_state, []
    saved_key = checkpoint.record.get("key")
    if saved_key != _key_record(key):
        raise ValueError(
            f"key: the checkpoint in {checkpoint_dir} was written by a run with key "
            f"{saved_key}; got {_key_record(key)}. Resume with the same key (a different key "
            "would not reproduce the run), pass resume=False, or use a new checkpoint_dir."
        )
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
    end, and on `KeyboardInterrupt` (so an interrupted run loses no step). With `resume=True`
    a run starts from the directory's latest checkpoint and continues to `steps`; metric
    records after that checkpoint are dropped, and the result is identical to an
    uninterrupted run.

    **Arguments:**

    - `model`: an Equinox module (or any pytree; floating-point arrays are trained).
    - `loss_fn`: `loss_fn(model, batch, key) -> (loss, aux)`, `loss` a scalar and `aux` a
        dict of scalar metrics (may be empty). It handles the batch axis itself (`jax.vmap`).
    - `train_data`: a pytree of arrays with a shared leading sample axis (NumPy arrays stay
        on the host until batched), or a pure function `(step, key) -> batch`.
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

    **Returns:** a `FitResult(model, opt_state, step, history)`.

    **Raises:** `ValueError` for invalid options, a checkpoint of another run (other key) or
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
    data_key, loss_key = jr.split(key)
    batches = _Batches(train_data, batch_size, data_key)
    opt_state = optimizer.init(eqx.filter(model, trainable))

    step, history = 0, []
    if checkpoint_dir is not None and resume:
        step, model, opt_state, history = _resume(
            checkpoint_dir, model, opt_state, key, metrics_path
        )
    if metrics_path is not None:
        _atomic_write(Path(metrics_path), "".join(json.dumps(r) + "\n" for r in history).encode())

    def checkpoint():
        if checkpoint_dir is not None:
            save_checkpoint(
                checkpoint_dir, step, model, opt_state, key=key, keep=keep_checkpoints
            )
            _write_csv(metrics_path, history)

    start_time = time.perf_counter()
    last_checkpoint = last_eval = step
    with tqdm(total=steps, initial=min(step, steps), disable=not progress, unit="step") as bar:
        logger = _Logger(metrics_path, history, bar, start_time)
        try:
            while step < steps:
                batch = batches(step)
                model, opt_state, metrics = _train_step(
                    model,
                    opt_state,
                    batch,
                    jr.fold_in(loss_key, step),
                    loss_fn,
                    optimizer,
                    trainable,
                )
                step += 1
                bar.update()
                logger.append(metrics)
                do_eval = eval_every is not None and step % eval_every == 0
                do_checkpoint = checkpoint_every is not None and step % checkpoint_every == 0
                if step % log_every == 0 or step == steps or do_eval or do_checkpoint:
                    logger.flush(step, opt_state)
                if do_eval:
                    logger.evaluation(step, eval_fn(model))
                    last_eval = step
                if do_checkpoint:
                    checkpoint()
                    last_checkpoint = step
        except KeyboardInterrupt:
            logger.flush(step, opt_state)
            if step != last_checkpoint:
                checkpoint()
            raise
        if eval_fn is not None and (last_eval != step or step == 0):
            logger.evaluation(step, eval_fn(model))
        if step != last_checkpoint:
            checkpoint()
    _write_csv(metrics_path, history)
    return FitResult(model, opt_state, step, history)


def _write_csv(metrics_path, history) -> None:
    if metrics_path is not None:
        write_metrics_csv(history, Path(metrics_path).with_suffix(".csv"))
