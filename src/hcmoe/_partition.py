"""Partitions of a grid into experts, and each expert's (padded) set of grid rows."""

from __future__ import annotations

import abc
import dataclasses

import equinox as eqx
import numpy as np

from ._grid import Grid, StaticArray


class AbstractPartition(eqx.Module):
    """Assigns every grid point to one of `num_experts(grid)` experts.

    Subclasses implement `labels(grid)`: a NumPy integer array of shape `grid.shape` with
    values in `0 .. K-1`, every expert owning at least one point. Labels are concrete (not
    traced): they decide the static sizes of the per-expert problems.
    """

    @abc.abstractmethod
    def labels(self, grid: Grid) -> np.ndarray:
        """Integer expert label of every grid point, shape `grid.shape`."""

    def num_experts(self, grid: Grid) -> int:
        return int(self.labels(grid).max()) + 1


class Partition(AbstractPartition):
    """A block decomposition defined in coordinates: `Partition(t=1, x=4)`.

    Each named axis's extent `[low, high]` (a periodic axis: one period) is cut into equal
    coordinate intervals, so the same partition applies at any resolution. Axes not named get
    one block. Blocks need not divide the number of grid points: experts then own different
    numbers of points (padded internally with zero-weight rows). Experts are numbered in
    row-major order over the named-in-grid-order axes.

    **Arguments:**

    - `**blocks`: number of blocks per axis name (positive ints).
    """

    blocks: tuple[tuple[str, int], ...] = eqx.field(static=True)

    def __init__(self, **blocks: int):
        for name, count in blocks.items():
            if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1:
                raise ValueError(
                    f"Partition: the number of blocks along {name!r} must be a positive int; "
                    f"got {count!r}."
                )
        self.blocks = tuple((name, int(count)) for name, count in blocks.items())

    def counts(self, grid: Grid) -> tuple[int, ...]:
        """Blocks per grid axis, in grid order; raises for an axis the grid does not have."""
        mapping = dict(self.blocks)
        unknown = [name for name in mapping if name not in grid.names]
        if unknown:
            raise ValueError(
                f"partition: unknown axis {unknown[0]!r}; the grid has axes {grid.names}."
            )
        counts = tuple(mapping.get(name, 1) for name in grid.names)
        for name, count, size in zip(grid.names, counts, grid.shape):
            if count > size:
                raise ValueError(
                    f"partition: {count} blocks along {name!r} but the grid has only {size} "
                    f"points on that axis (more experts than grid points)."
                )
        return counts

    def num_experts(self, grid: Grid) -> int:
        return int(np.prod(self.counts(grid)))

    def labels(self, grid: Grid) -> np.ndarray:
        counts = self.counts(grid)
        block_index = []
        for name, count in zip(grid.names, counts):
            low, high = grid.extent(name)
            fraction = (grid.coords(name) - low) / (high - low)
            index = np.clip(np.floor(fraction * count), 0, count - 1).astype(np.int64)
            if np.unique(index).size != count:
                raise ValueError(
                    f"partition: {count} blocks along {name!r} leave some block without grid "
                    f"points ({grid.shape[grid.axis(name)]} points); use fewer blocks."
                )
            block_index.append(index)
        mesh = np.meshgrid(*block_index, indexing="ij")
        return np.ravel_multi_index(tuple(mesh), counts).astype(np.int32)

    def __repr__(self):
        return "Partition(" + ", ".join(f"{n}={c}" for n, c in self.blocks) + ")"


class LabelPartition(AbstractPartition):
    """Any assignment of grid points to experts, given as an integer array of `grid.shape`.

    Useful for random point-to-expert assignments (see `random_labels`) and user masks. Unlike
    `Partition`, it belongs to one resolution.
    """

    _labels: StaticArray = eqx.field(static=True)

    def __init__(self, labels):
        labels = np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"partition: a label array must hold integers; got dtype {labels.dtype}."
            )
        if labels.size == 0 or labels.min() < 0:
            raise ValueError("partition: labels must be non-negative expert indices 0..K-1.")
        present = np.unique(labels)
        if present.size != labels.max() + 1:
            missing = sorted(set(range(int(labels.max()) + 1)) - set(present.tolist()))
            raise ValueError(
                f"partition: labels must use every expert 0..{int(labels.max())}; experts "
                f"{missing[:5]} own no point."
            )
        self._labels = StaticArray(labels.astype(np.int32))

    def labels(self, grid: Grid) -> np.ndarray:
        labels = self._labels.array
        if labels.shape != grid.shape:
            raise ValueError(
                f"partition: label array shape {labels.shape} does not match the grid shape "
                f"{grid.shape} (axes {grid.names})."
            )
        return labels


def as_partition(partition) -> AbstractPartition:
    """Accept a partition object, an integer label array, or None (one expert)."""
    if partition is None:
        return Partition()
    if isinstance(partition, AbstractPartition):
        return partition
    if isinstance(partition, np.ndarray) or hasattr(partition, "__array__"):
        return LabelPartition(np.asarray(partition))
    raise ValueError(
        "partition: expected hcmoe.Partition(...), an integer label array of the grid's shape, "
        f"or None; got {type(partition).__name__}."
    )


def random_labels(grid: Grid, num_experts: int, seed: int = 0) -> LabelPartition:
    """A random, balanced assignment of grid points to experts (the paper reviewers' ablation)."""
    if num_experts < 1 or num_experts > grid.size:
        raise ValueError(
            f"num_experts: expected 1..{grid.size} (grid points); got {num_experts}."
        )
    rng = np.random.default_rng(seed)
    labels = np.arange(grid.size) % num_experts
    rng.shuffle(labels)
    return LabelPartition(labels.reshape(grid.shape))


@dataclasses.dataclass(frozen=True)
class ExpertRows:
    """Padded per-expert row sets of a flat index space (trace-time NumPy, never traced).

    `index[k, :count[k]]` are expert `k`'s rows; the remaining slots repeat a valid row and
    have `valid == False`, so every expert has the same static width.
    """

    index: np.ndarray
    valid: np.ndarray

    @classmethod
    def from_labels(cls, labels: np.ndarray, num_experts: int) -> ExpertRows:
        flat = np.asarray(labels).reshape(-1)
        order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat, minlength=num_experts)
        width = max(int(counts.max()), 1)
        index = np.zeros((num_experts, width), dtype=np.int32)
        valid = np.zeros((num_experts, width), dtype=bool)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for k in range(num_experts):
            rows = order[starts[k] : starts[k] + counts[k]]
            index[k, : rows.size] = rows
            index[k, rows.size :] = rows[0] if rows.size else 0
            valid[k, : rows.size] = True
        return cls(index, valid)

    @property
    def width(self) -> int:
        return self.index.shape[1]

    @property
    def counts(self) -> np.ndarray:
        return self.valid.sum(axis=1)
