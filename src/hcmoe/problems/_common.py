"""Helpers shared by the benchmark problems: argument checks, time stepping, dataset caching."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.random as jr
import numpy as np

from .. import data as data_lib
from .._grid import Grid


SPLITS = ("train", "test")


def check_choice(argname: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{argname}: expected one of {tuple(choices)}; got {value!r}.")


def check_axes(grid: Grid, names: tuple[str, ...], where: str) -> None:
    """Raise unless `grid` is a `Grid` with exactly the axes `names`, in that order."""
    if not isinstance(grid, Grid) or grid.names != names:
        got = grid if isinstance(grid, Grid) else type(grid).__name__
        raise ValueError(f"{where}: grid: expected a Grid with axes {names}; got {got!r}.")


def uniform_step(grid: Grid, name: str, where: str) -> float:
    """The spacing of a uniform axis; a clear error if it is not uniform."""
    steps = np.diff(grid.coords(name))
    if not np.allclose(steps, steps[0], rtol=1e-9, atol=0.0):
        raise ValueError(
            f"{where}: grid axis {name!r} must be uniform; got spacings from {steps.min()} to "
            f"{steps.max()}."
        )
    return float(steps.mean())


def num_substeps(level_step: float, max_dt: float, where: str) -> int:
    """The number of equal substeps of size at most `max_dt` between two stored time levels."""
    if not (isinstance(max_dt, (int, float)) and max_dt > 0):
        raise ValueError(f"{where}: max_dt: expected a positive number; got {max_dt!r}.")
    return max(1, math.ceil(level_step / max_dt - 1e-9))


def make_pde(cls, constants: Mapping[str, Any], where: str):
    """`cls(**constants)`, with a ValueError that lists the valid names for a typo."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(constants) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown constants {unknown}; {cls.__name__} has {names}.")
    return cls(**constants)


def pde_constants(pde) -> dict[str, Any]:
    return {f.name: getattr(pde, f.name) for f in dataclasses.fields(pde)}


def check_count(argname: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{argname}: expected a positive int; got {value!r}.")
    return int(value)


def split_key(seed: int, split: str):
    """Independent keys for the train and test splits of one seed."""
    check_choice("split", split, SPLITS)
    return jr.fold_in(jr.key(seed), SPLITS.index(split))


def cached_dataset(
    problem: str,
    split: str,
    size: str,
    params: dict[str, Any],
    generate: Callable[[], dict[str, np.ndarray]],
    *,
    cache_dir: str | os.PathLike | None,
    rebuild: bool,
) -> dict[str, np.ndarray]:
    """The dataset `<cache_dir>/<problem>-<size>-<split>`, regenerated when `params` change."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else data_lib.cache_dir()
    params = {"problem": problem, "split": split, "size": size, **params}
    return data_lib.cached(
        directory / f"{problem}-{size}-{split}", params, generate, rebuild=rebuild
    )
