"""Matplotlib figures: predictions against references with expert boundaries, training curves,
method comparisons.

Figures are `matplotlib.figure.Figure` objects drawn on the Agg canvas directly: nothing goes
through `pyplot`, so plotting works headless, opens no window, and figures are freed like any
other object (no `plt.close`). Every function returns the figure and, given `path`, also
saves it there (the format follows the suffix).

Needs matplotlib: the `examples` extra (`pip install "hcmoe[examples]"`) or the `plotting`
extra (matplotlib alone); importing this module without it raises an `ImportError` that says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.patheffects import withStroke
except ImportError as error:
    raise ImportError(
        "hcmoe.plotting needs matplotlib, which is not installed (or failed to import: "
        f'{error}). Install it with the examples extra: pip install "hcmoe[examples]" '
        '(or matplotlib alone: pip install "hcmoe[plotting]").'
    ) from error

from ._grid import Grid
from .training import read_metrics


_BOOKKEEPING = {"kind", "step", "time", "steps_per_second"}


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _finish(figure: Figure, path) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=150)
    return figure


def _edges(coords: np.ndarray) -> np.ndarray:
    """Cell edges around points: midpoints inside, half a spacing beyond the ends."""
    middle = 0.5 * (coords[1:] + coords[:-1])
    return np.concatenate([[2 * coords[0] - middle[0]], middle, [2 * coords[-1] - middle[-1]]])


def _axis_coords(grid: Grid | None, shape: Sequence[int], names: Sequence[str]):
    if grid is None:
        return [np.arange(n, dtype=float) for n in shape], list(names)
    if grid.shape != tuple(shape):
        raise ValueError(f"grid: expected shape {tuple(shape)} (the fields'); got {grid.shape}.")
    return [grid.coords(name) for name in grid.names], list(grid.names)


def _check_fields(prediction, reference, labels, ndim: int):
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if prediction.ndim != ndim:
        raise ValueError(
            f"prediction: expected a field with {ndim} grid axes; got shape {prediction.shape}."
        )
    if reference.shape != prediction.shape:
        raise ValueError(
            f"reference: expected shape {prediction.shape} (the prediction's); "
            f"got {reference.shape}."
        )
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != prediction.shape:
            raise ValueError(
                f"labels: expected integer expert labels of shape {prediction.shape}; "
                f"got {labels.shape}."
            )
    return prediction, reference, labels


def expert_boundary_segments(
    labels: np.ndarray, vertical: np.ndarray, horizontal: np.ndarray
) -> np.ndarray:
    """Line segments separating cells of different expert labels in a 2-D label array.

    `labels[i, j]` is drawn at `(horizontal[j], vertical[i])`; the segments lie on the cell
    edges between neighbours with different labels, so any label array (blocks, random
    assignments, masks) gets exact outlines.

    **Returns:** an array of shape `(n_segments, 2, 2)` of `((x0, y0), (x1, y1))` pairs.
    """
    v_edges, h_edges = _edges(vertical), _edges(horizontal)
    i, j = np.nonzero(labels[:, 1:] != labels[:, :-1])  # between columns j and j + 1
    across = np.stack(
        [
            np.stack([h_edges[j + 1], v_edges[i]], axis=-1),
            np.stack([h_edges[j + 1], v_edges[i + 1]], axis=-1),
        ],
        axis=1,
    )
    i, j = np.nonzero(labels[1:, :] != labels[:-1, :])  # between rows i and i + 1
    along = np.stack(
        [
            np.stack([h_edges[j], v_edges[i + 1]], axis=-1),
            np.stack([h_edges[j + 1], v_edges[i + 1]], axis=-1),
        ],
        axis=1,
    )
    return np.concatenate([across, along]).reshape(-1, 2, 2)


def _field_panel(figure, ax, field, vertical, horizontal, labels, title, **style):
    mesh = ax.pcolormesh(
        _edges(horizontal), _edges(vertical), field, shading="flat", rasterized=True, **style
    )
    figure.colorbar(mesh, ax=ax)
    if labels is not None:
        segments = expert_boundary_segments(labels, vertical, horizontal)
        # White with a dark outline reads on light and dark colour maps alike.
        outline = [withStroke(linewidth=2.0, foreground="black")]
        # An (n, 2, 2) array is a documented `segments`; matplotlib's stub wants a Sequence.
        lines = LineCollection(
            segments,  # pyright: ignore[reportArgumentType]
            colors="white",
            linewidths=0.9,
            path_effects=outline,
        )
        ax.add_collection(lines)
    ax.set_title(title)


def _relative_l2(prediction: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(prediction - reference) / np.linalg.norm(reference))


def _triptych(figure, axes, prediction, reference, vertical, horizontal, labels, cmap):
    low = min(prediction.min(), reference.min())
    high = max(prediction.max(), reference.max())
    if low < 0 < high:  # signed fields (vorticity): centre the colour map on zero
        high = max(-low, high)
        low = -high
    shared = dict(cmap=cmap, vmin=low, vmax=high)
    _field_panel(figure, axes[0], prediction, vertical, horizontal, labels, "prediction", **shared)
    _field_panel(figure, axes[1], reference, vertical, horizontal, labels, "reference", **shared)
    error = np.abs(prediction - reference)
    # From zero up (an exact panel, e.g. an initial condition built in, reads as zero, not as
    # matplotlib's default -0.1 .. 0.1 for a constant field).
    top = float(error.max())
    top = top if top > 0 else 1.0
    _field_panel(
        figure,
        axes[2],
        error,
        vertical,
        horizontal,
        labels,
        "|error|",
        cmap="magma",
        vmin=0.0,
        vmax=top,
    )


def plot_prediction(
    prediction,
    reference,
    *,
    grid: Grid | None = None,
    labels=None,
    title: str | None = None,
    cmap: str = "viridis",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Prediction, reference and absolute error of a `(t, x)` field, side by side.

    Prediction and reference share one colour scale. The first grid axis is drawn vertically,
    the second horizontally. With `labels`, the boundaries between experts are drawn in white.
    The title reports the relative L2 error.

    **Arguments:**

    - `prediction`, `reference`: fields of shape `(n_t, n_x)`.
    - `grid`: the grid, for physical axes and names (default: indices, axes `t`, `x`).
    - `labels`: integer expert labels of the same shape (e.g. a partition's labels).
    - `title`: a title placed before the error summary.
    - `cmap`: colour map of the fields.
    - `path`: where to save the figure (optional).
    """
    prediction, reference, labels = _check_fields(prediction, reference, labels, 2)
    (vertical, horizontal), names = _axis_coords(grid, prediction.shape, ("t", "x"))
    figure = _new_figure(13.0, 3.6)
    axes = figure.subplots(1, 3, sharex=True, sharey=True)
    _triptych(figure, axes, prediction, reference, vertical, horizontal, labels, cmap)
    for ax in axes:
        ax.set_xlabel(names[1])
    axes[0].set_ylabel(names[0])
    summary = f"relative L2 error {100 * _relative_l2(prediction, reference):.2f}%"
    figure.suptitle(summary if title is None else f"{title} — {summary}")
    return _finish(figure, path)


def plot_snapshots(
    prediction,
    reference,
    *,
    grid: Grid | None = None,
    times: Sequence[int] = (0, -1),
    labels=None,
    title: str | None = None,
    cmap: str = "RdBu_r",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Snapshots of a `(t, x, y)` field: one row per time index, columns prediction,
    reference and absolute error, with `x` horizontal and `y` vertical.

    **Arguments:**

    - `prediction`, `reference`: fields of shape `(n_t, n_x, n_y)`.
    - `grid`: the grid, for physical axes, names and times (default: indices).
    - `times`: time *indices* of the rows (negative indices count from the end).
    - `labels`: integer expert labels of shape `(n_t, n_x, n_y)`.
    - `title`: a title placed before the error summary.
    - `cmap`: colour map of the fields.
    - `path`: where to save the figure (optional).
    """
    prediction, reference, labels = _check_fields(prediction, reference, labels, 3)
    (t, x, y), names = _axis_coords(grid, prediction.shape, ("t", "x", "y"))
    times = [int(i) for i in times]
    if not times or any(not -t.size <= i < t.size for i in times):
        raise ValueError(
            f"times: expected a non-empty sequence of indices in [-{t.size}, {t.size}); "
            f"got {times}."
        )
    figure = _new_figure(13.0, 3.6 * len(times))
    axes = np.atleast_2d(figure.subplots(len(times), 3, sharex=True, sharey=True))
    for row, index in zip(axes, times):
        frame_labels = None if labels is None else labels[index].T
        _triptych(figure, row, prediction[index].T, reference[index].T, y, x, frame_labels, cmap)
        row[0].set_ylabel(f"{names[2]}   ({names[0]} = {t[index]:.4g})")
    for ax in axes[-1]:
        ax.set_xlabel(names[1])
    summary = f"relative L2 error {100 * _relative_l2(prediction, reference):.2f}%"
    figure.suptitle(summary if title is None else f"{title} — {summary}")
    return _finish(figure, path)


def _series(records, kind: str, key: str):
    points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
    return np.array(points, dtype=float).reshape(-1, 2)


def plot_training_curves(
    metrics: str | os.PathLike | Sequence[Mapping[str, Any]],
    *,
    keys: Sequence[str] | None = None,
    log_scale: bool = True,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Training curves from a metrics file written by `hcmoe.training.fit`.

    One panel per metric, against the step: training records as lines, evaluation records
    as markers (a metric in both appears in both).

    **Arguments:**

    - `metrics`: a JSON-lines path or the records themselves (`FitResult.history`).
    - `keys`: metrics to plot (default: every metric found, loss first).
    - `log_scale`: logarithmic y axis for positive metrics spanning more than a decade.
    - `title`: figure title.
    - `path`: where to save the figure (optional).
    """
    records = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    found: dict[str, None] = {}
    for record in records:
        found.update(dict.fromkeys(k for k in record if k not in _BOOKKEEPING))
    if keys is None:
        keys = sorted(found, key=lambda k: k != "loss")
    missing = [k for k in keys if k not in found]
    if not keys or missing:
        raise ValueError(
            f"keys: expected metrics present in the records {sorted(found)}; "
            f"got {list(keys)} (missing {missing})."
        )
    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    figure = _new_figure(4.3 * columns, 3.2 * rows)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, key in zip(axes, keys):
        train, evaluation = _series(records, "train", key), _series(records, "eval", key)
        if len(train):
            ax.plot(train[:, 0], train[:, 1], label="train")
        if len(evaluation):
            ax.plot(evaluation[:, 0], evaluation[:, 1], "o-", label="eval")
        values = np.concatenate([train[:, 1], evaluation[:, 1]])
        if log_scale and values.size and np.all(values > 0) and values.max() > 10 * values.min():
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend()
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    if title is not None:
        figure.suptitle(title)
    return _finish(figure, path)


def _summaries(errors: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    if not errors:
        raise ValueError("errors: expected at least one method; got an empty mapping.")
    summaries = {}
    for method, values in errors.items():
        values = np.asarray(values, dtype=float).ravel()
        if values.size == 0:
            raise ValueError(f"errors[{method!r}]: expected per-sample errors; got none.")
        summaries[method] = (float(values.mean()), float(values.std()))
    return summaries


def comparison_table(errors: Mapping[str, Any], *, percent: bool = True) -> str:
    """A Markdown table of mean ± standard deviation of per-sample errors per method.

    ```
    | method | relative L2 error |
    |---|---|
    | PI-HC-MoE | 3.60% ± 2.93% |
    ```

    **Arguments:**

    - `errors`: method name → per-sample relative L2 errors (fractions, e.g. `relative_l2`).
    - `percent`: report in percent.
    """
    scale, unit = (100.0, "%") if percent else (1.0, "")
    lines = ["| method | relative L2 error |", "|---|---|"]
    for method, (mean, std) in _summaries(errors).items():
        lines.append(f"| {method} | {scale * mean:.2f}{unit} ± {scale * std:.2f}{unit} |")
    return "\n".join(lines)


def plot_method_comparison(
    errors: Mapping[str, Any],
    *,
    percent: bool = True,
    log_scale: bool = False,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Bar chart of mean relative L2 error per method, with ± one standard deviation.

    **Arguments:**

    - `errors`: method name → per-sample relative L2 errors (fractions).
    - `percent`: plot in percent.
    - `log_scale`: logarithmic y axis (useful when methods differ by orders of magnitude).
    - `title`: figure title.
    - `path`: where to save the figure (optional).
    """
    summaries = _summaries(errors)
    scale = 100.0 if percent else 1.0
    means = np.array([m for m, _ in summaries.values()]) * scale
    stds = np.array([s for _, s in summaries.values()]) * scale
    figure = _new_figure(1.6 + 1.4 * len(summaries), 3.6)
    ax = figure.subplots()
    positions = np.arange(len(summaries))
    ax.bar(positions, means, yerr=stds, capsize=4, color="C0")
    ax.set_xticks(positions, list(summaries))
    for position, mean, std in zip(positions, means, stds):
        ax.annotate(
            f"{mean:.2f} ± {std:.2f}",
            (position, mean + std),
            ha="center",
            va="bottom",
            textcoords="offset points",
            xytext=(0, 2),
            fontsize=8,
        )
    ax.margins(y=0.12)
    ax.set_ylabel("relative L2 error" + (" (%)" if percent else ""))
    if log_scale:
        ax.set_yscale("log")
    if title is not None:
        ax.set_title(title)
    return _finish(figure, path)
