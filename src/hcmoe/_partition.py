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

    def blend(self, grid: Grid) -> np.ndarray | None:
        """The partition of unity `phi`, shape `(K, *grid.shape)`, `sum_k phi_k = 1`, or None
        for a partition without overlap (then `phi_k` is the indicator of `labels == k`)."""
        return None

    def owned(self, grid: Grid) -> np.ndarray:
        """Each expert's own block, shape `(K, *grid.shape)`: the indicator of `labels == k`."""
        labels = self.labels(grid)
        return labels[None] == np.arange(int(labels.max()) + 1).reshape((-1,) + (1,) * labels.ndim)

    def members(self, grid: Grid) -> np.ndarray:
        """Which grid points each expert's PDE rows come from, shape `(K, *grid.shape)`: its
        own block, plus the halo where its blending weight is positive."""
        own = self.owned(grid)
        phi = self.blend(grid)
        return own if phi is None else own | (phi > 0)


class Partition(AbstractPartition):
    """A block decomposition defined in coordinates: `Partition(t=1, x=4)`.

    Each named axis's extent `[low, high]` (a periodic axis: one period) is cut into equal
    coordinate intervals, so the same partition applies at any resolution. Axes not named get
    one block. Blocks need not divide the number of grid points: experts then own different
    numbers of points (padded internally with zero-weight rows). Experts are numbered in
    row-major order over the named-in-grid-order axes.

    With `overlap=delta`, every block is extended by `delta` (in coordinates) on each side of
    each interface: expert `k` takes PDE rows from its extended block, and the prediction is
    blended with a C^1 partition of unity, `u = u_p + sum_k phi_k T(B) w_k`, where `phi_k`
    ramps from 1 to 0 across `[e - delta, e + delta]` at every interface `e` (a cubic
    smoothstep; a product of such windows over the split axes), so `sum_k phi_k = 1` and the
    prediction is continuous with a continuous first derivative across interfaces. Experts
    still solve independently. `overlap=0` (default) is the paper's piecewise prediction.

    **Arguments:**

    - `**blocks`: number of blocks per axis name (positive ints).
    - `overlap`: half-width of the blending zone at each interface, in the axis's coordinates:
      a float for every split axis, or a dict `{axis: delta}`. Up to half a block's width the
      windows sum to one as they are; wider overlaps (each expert reaching into several
      neighbours) are normalised by their sum.
    """

    blocks: tuple[tuple[str, int], ...] = eqx.field(static=True)
    overlap: tuple[tuple[str, float], ...] = eqx.field(static=True)

    def __init__(self, *, overlap: float | dict[str, float] = 0.0, **blocks: int):
        if isinstance(overlap, dict):
            items = dict(overlap)
            unknown = sorted(set(items) - set(blocks))
            if unknown:
                raise ValueError(
                    f"overlap: axis {unknown[0]!r} is not split by this partition; split axes "
                    f"are {tuple(blocks)}."
                )
        else:
            items = {name: overlap for name, count in blocks.items()}
        for name, delta in items.items():
            if (
                isinstance(delta, bool)
                or not isinstance(delta, (int, float, np.floating))
                or not (np.isfinite(delta) and delta >= 0)
            ):
                raise ValueError(
                    f"overlap: expected a non-negative float (coordinate width) for axis "
                    f"{name!r}; got {delta!r}."
                )
        self.overlap = tuple((n, float(d)) for n, d in items.items() if d > 0)
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
            index = _block_index(grid, name, count)
            if np.unique(index).size != count:
                raise ValueError(
                    f"partition: {count} blocks along {name!r} leave some block without grid "
                    f"points ({grid.shape[grid.axis(name)]} points); use fewer blocks."
                )
            block_index.append(index)
        mesh = np.meshgrid(*block_index, indexing="ij")
        return np.ravel_multi_index(tuple(mesh), counts).astype(np.int32)

    def blend(self, grid: Grid) -> np.ndarray | None:
        if not self.overlap:
            return None
        counts = self.counts(grid)
        overlap = dict(self.overlap)
        windows = []
        for name, count in zip(grid.names, counts):
            delta = overlap.get(name, 0.0)
            if count == 1 or delta == 0.0:
                labels = _block_index(grid, name, count)
                windows.append((labels[None] == np.arange(count)[:, None]).astype(np.float64))
                continue
            low, high = grid.extent(name)
            if delta > high - low:
                raise ValueError(
                    f"overlap: {delta} along {name!r} is more than the axis' extent "
                    f"({high - low:g}); every expert would see the whole axis."
                )
            windows.append(
                _windows(grid.coords(name), low, high, count, delta, grid.is_periodic(name))
            )
        phi = np.ones(())
        for w in windows:  # outer product: axes (c_0, n_0, c_1, n_1, ...)
            phi = np.multiply.outer(phi, w)
        d = len(windows)
        phi = phi.transpose([2 * a for a in range(d)] + [2 * a + 1 for a in range(d)])
        return phi.reshape((-1,) + grid.shape)  # experts in row-major order of the counts

    def __repr__(self):
        parts = [f"{n}={c}" for n, c in self.blocks]
        if self.overlap:
            parts.append(f"overlap={dict(self.overlap)}")
        return "Partition(" + ", ".join(parts) + ")"


def _block_index(grid: Grid, name: str, count: int) -> np.ndarray:
    low, high = grid.extent(name)
    fraction = (grid.coords(name) - low) / (high - low)
    return np.clip(np.floor(fraction * count), 0, count - 1).astype(np.int64)


def _smoothstep(s: np.ndarray) -> np.ndarray:
    s = np.clip(s, 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


def _windows(x, low, high, count, delta, periodic) -> np.ndarray:
    """1-D partition of unity `(count, n)`: block `j`'s window ramps up across its low
    interface and down across its high one, each over `[e - delta, e + delta]`; no ramp at
    the ends of a non-periodic axis, wrap-around on a periodic one."""
    width = (high - low) / count
    period = high - low
    out = np.empty((count, x.size))  # bumps; normalised below
    for j in range(count):
        centre = low + (j + 0.5) * width
        d = x - centre
        if periodic:
            d = (d + period / 2) % period - period / 2
        up = _smoothstep((d + width / 2 + delta) / (2 * delta))
        down = 1.0 - _smoothstep((d - width / 2 + delta) / (2 * delta))
        if not periodic:
            up = np.ones_like(d) if j == 0 else up
            down = np.ones_like(d) if j == count - 1 else down
        out[j] = up * down
    # Up to half a block's width the bumps already sum to one (each ramp pairs with its
    # neighbour's mirror image); wider overlaps are normalised (Shepard), still C^1.
    return out / out.sum(axis=0, keepdims=True)


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
        raise ValueError(f"num_experts: expected 1..{grid.size} (grid points); got {num_experts}.")
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
        return cls.from_masks(flat[None] == np.arange(num_experts)[:, None])

    @classmethod
    def from_masks(cls, masks: np.ndarray) -> ExpertRows:
        """Rows from a boolean `(K, ...)` membership array (flattened after the first axis);
        an expert may hold any subset of rows, overlapping others'."""
        masks = np.asarray(masks, dtype=bool).reshape(masks.shape[0], -1)
        num_experts = masks.shape[0]
        counts = masks.sum(axis=1)
        width = max(int(counts.max()), 1)
        index = np.zeros((num_experts, width), dtype=np.int32)
        valid = np.zeros((num_experts, width), dtype=bool)
        for k in range(num_experts):
            rows = np.flatnonzero(masks[k])
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
