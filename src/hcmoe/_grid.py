"""Named, ordered space-time grids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import equinox as eqx
import numpy as np


class StaticArray:
    """A read-only NumPy array that is hashable, so it can live in a static field.

    Grids and label partitions are *structure*: the number of points an expert owns decides
    array shapes, so their coordinates must be concrete at trace time. Wrapping them here keeps
    them out of the traced leaves of `jax.jit` / `eqx.filter_jit`.
    """

    __slots__ = ("array", "_hash")

    def __init__(self, array):
        array = np.array(array)
        array.setflags(write=False)
        self.array = array
        self._hash = hash((array.shape, array.dtype.str, array.tobytes()))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return (
            isinstance(other, StaticArray)
            and self._hash == other._hash
            and self.array.shape == other.array.shape
            and bool(np.array_equal(self.array, other.array))
        )

    def __repr__(self):
        return f"StaticArray(shape={self.array.shape}, dtype={self.array.dtype})"


class Grid(eqx.Module):
    """A tensor-product grid with named, ordered axes.

    ```python
    grid = hcmoe.Grid(t=jnp.linspace(0, 1, 51), x=jnp.linspace(0, 1, 65))
    grid = hcmoe.Grid(t=t, x=x, y=y, periodic=("x", "y"))
    ```

    The keyword order is the axis order of every field on the grid: a field has shape
    `grid.shape` (plus trailing axes, e.g. the basis axis). Coordinates must be strictly
    increasing. A periodic axis holds `n` points of a period `n * dx` (the right end point is
    *not* stored), so its coordinates must be uniform.

    Coordinates are concrete (NumPy) and static: they decide the shapes of the per-expert
    problems, so a grid is hashable and costs nothing to close over or pass through `jit`.

    **Arguments:**

    - `periodic`: names of periodic axes.
    - `**axes`: one 1-D coordinate array per axis, in order.
    """

    names: tuple[str, ...] = eqx.field(static=True)
    _coords: tuple[StaticArray, ...] = eqx.field(static=True)
    periodic: tuple[str, ...] = eqx.field(static=True)

    def __init__(self, *, periodic: Sequence[str] = (), **axes):
        if not axes:
            raise ValueError("Grid: expected at least one axis, e.g. Grid(t=..., x=...); got none.")
        if isinstance(periodic, str):
            periodic = (periodic,)
        coords = []
        for name, values in axes.items():
            values = np.asarray(values, dtype=np.float64)
            if values.ndim != 1 or values.size < 2:
                raise ValueError(
                    f"Grid: axis {name!r} expected a 1-D coordinate array with at least 2 "
                    f"points; got shape {values.shape}."
                )
            if not np.all(np.diff(values) > 0):
                raise ValueError(f"Grid: axis {name!r} coordinates must be strictly increasing.")
            coords.append(StaticArray(values))
        by_name = dict(zip(axes, coords))
        for name in periodic:
            if name not in by_name:
                raise ValueError(
                    f"Grid: periodic axis {name!r} is not one of the axes {tuple(axes)}."
                )
            values = by_name[name].array
            d = np.diff(values)
            if not np.allclose(d, d[0], rtol=1e-8, atol=0):
                raise ValueError(
                    f"Grid: periodic axis {name!r} must have uniform spacing; got spacings "
                    f"from {d.min()} to {d.max()} over {values.size} points."
                )
        self.names = tuple(axes)
        self._coords = tuple(coords)
        self.periodic = tuple(name for name in self.names if name in periodic)

    # -- basic facts ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(c.array.size for c in self._coords)

    @property
    def ndim(self) -> int:
        return len(self.names)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def axis(self, name: str) -> int:
        """Position of the named axis; a clear error for an unknown name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown grid axis {name!r}; this grid has axes {self.names}.")

    def coords(self, name: str) -> np.ndarray:
        """The 1-D coordinates of an axis."""
        return self._coords[self.axis(name)].array

    def is_periodic(self, name: str) -> bool:
        self.axis(name)
        return name in self.periodic

    def spacing(self, name: str) -> float:
        """The (mean) spacing of an axis; exact for uniform axes."""
        c = self.coords(name)
        return float((c[-1] - c[0]) / (c.size - 1))

    def extent(self, name: str) -> tuple[float, float]:
        """`[low, high]` of an axis; for a periodic axis `high` is one period after `low`."""
        c = self.coords(name)
        if self.is_periodic(name):
            return float(c[0]), float(c[0] + c.size * self.spacing(name))
        return float(c[0]), float(c[-1])

    def mesh(self) -> dict[str, np.ndarray]:
        """The coordinates of every grid point: name -> array of shape `grid.shape`."""
        arrays = np.meshgrid(*(c.array for c in self._coords), indexing="ij")
        return dict(zip(self.names, arrays))

    def boundary_index(self, name: str, side: str | int) -> int:
        """Index along `name` of a face: `"low"` (first), `"high"` (last) or an integer."""
        n = self.shape[self.axis(name)]
        if side in ("low", "start", "left", "first"):
            return 0
        if side in ("high", "end", "right", "last"):
            return n - 1
        if isinstance(side, (int, np.integer)) and -n <= side < n:
            return int(side) % n
        raise ValueError(
            f"side: expected 'low', 'high' or an index in [-{n}, {n}) for axis {name!r}; "
            f"got {side!r}."
        )

    def with_coords(self, **axes) -> Grid:
        """A copy with some axes' coordinates replaced (e.g. a finer evaluation grid)."""
        new = {name: axes.pop(name, self.coords(name)) for name in self.names}
        if axes:
            raise ValueError(f"with_coords: unknown axes {tuple(axes)}; grid has {self.names}.")
        return Grid(periodic=self.periodic, **new)

    def check_field(self, field, argname: str, trailing: int = 0) -> None:
        """Raise if `field.shape` does not start with `grid.shape` (trace-time check)."""
        shape = tuple(field.shape)
        expected = self.shape
        if shape[: self.ndim] != expected or len(shape) != self.ndim + trailing:
            extra = f" plus {trailing} trailing axis" if trailing else ""
            raise ValueError(
                f"{argname}: expected shape {expected}{extra} (grid axes {self.names}); "
                f"got {shape}."
            )

    def __repr__(self):
        axes = ", ".join(
            f"{n}[{c.array.size}]{'(periodic)' if n in self.periodic else ''}"
            for n, c in zip(self.names, self._coords)
        )
        return f"Grid({axes})"


def uniform_grid(periodic: Sequence[str] = (), **axes: tuple) -> Grid:
    """Build a grid from `(low, high, n)` triples.

    Non-periodic axes include both end points; periodic axes exclude `high` (it is `low` plus
    one period): `uniform_grid(t=(0, 5, 64), x=(0, 1, 64), y=(0, 1, 64), periodic=("x", "y"))`.
    """
    coords: Mapping[str, np.ndarray] = {}
    for name, spec in axes.items():
        if len(spec) != 3:
            raise ValueError(f"uniform_grid: axis {name!r} expected (low, high, n); got {spec!r}.")
        low, high, n = spec
        if name in periodic:
            coords[name] = low + (high - low) * np.arange(n) / n
        else:
            coords[name] = np.linspace(low, high, n)
    return Grid(periodic=tuple(periodic), **coords)
