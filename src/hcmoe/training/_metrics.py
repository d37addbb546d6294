"""Metrics: solver summaries for a loss' `aux`, the JSON-lines / CSV files `fit` writes, and
the logger that fills them and the progress bar."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._files import atomic_write
from ._optimizer import current_learning_rate


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
    """The records of a JSON-lines metrics file written by `fit` (`[]` if it is missing).

    A last line cut short by a crash is skipped; a damaged line elsewhere is an error naming
    the file and the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break  # a record being appended when the run stopped
            raise ValueError(
                f"{path}, line {number}: not a JSON metrics record ({error}); delete the line "
                "or the file (it is rewritten from the checkpoint on resume)."
            ) from error
    return records


def write_metrics_csv(records: list[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write records as CSV (columns: the union of their keys, in first-seen order)."""
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), restval="")
    writer.writeheader()
    writer.writerows(records)
    atomic_write(Path(path), text.getvalue().encode())


def write_csv_beside(metrics_path, history) -> None:
    """The CSV twin of a JSON-lines metrics file (same stem), if there is one."""
    if metrics_path is not None:
        write_metrics_csv(history, Path(metrics_path).with_suffix(".csv"))


def _to_float(value) -> float:
    return float(np.asarray(value))


def _format(value: float) -> str:
    return f"{value:.4g}"


class Logger:
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
