"""The operator algebra: `AbstractOperator`, identity, linear combinations, compositions and
user-supplied linear callables, and the stencil contraction behind `at_points`."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Int

from .._grid import Grid


def flat_field(field: Array, grid: Grid) -> Array:
    """`field` with its grid axes flattened (row-major): shape `(grid.size, *trailing)`."""
    return jnp.reshape(field, (grid.size,) + tuple(field.shape[grid.ndim :]))


class AbstractOperator(eqx.Module):
    """A linear map of grid fields.

    Subclasses implement `__call__(field, grid)`: `field` has shape
    `(*grid.shape, *trailing)` and the result has the same shape. Linearity is the contract
    that the solver relies on (`L(B w) = (L B) w`); it is not checked.

    Optionally, a local operator implements `point_stencil(grid, points)` (which grid points,
    with which weights, make its value at each point); then `at_points` costs
    `O(points x stencil)`. `fourier_symbol(grid)` marks a Fourier multiplier on periodic axes
    (several of them share one FFT in `operators_at_points`).
    """

    @abc.abstractmethod
    def __call__(self, field: Array, grid: Grid) -> Array:
        """Apply the operator to `field` (shape `(*grid.shape, *trailing)`)."""

    def point_stencil(
        self, grid: Grid, points: Int[ArrayLike, "*p"]
    ) -> tuple[Int[Array, "*p width"], Array] | None:
        """The neighbours and weights of the operator at flat grid indices `points`:
        `(L u)[p] = sum_j weights[p, j] u[neighbours[p, j]]`, both of shape
        `(*points.shape, width)`; None (the default) when the operator is not a local stencil.
        """
        return None

    def fourier_symbol(self, grid: Grid) -> tuple[tuple[str, ...], np.ndarray] | None:
        """`(axes, symbol)` when the operator multiplies the Fourier modes of the periodic
        `axes` by `symbol` (a NumPy array shaped `grid.shape` with size 1 on the other axes,
        Hermitian, so real fields stay real); None (the default) otherwise."""
        return None

    def at_points(self, field: Array, grid: Grid, points: Int[ArrayLike, "*p"]) -> Array:
        """`self(field, grid)` at the flat (row-major) grid indices `points`.

        **Arguments:**

        - `field`: shape `(*grid.shape, *trailing)`.
        - `grid`: the grid.
        - `points`: integer array of any shape `P` (NumPy or traced) of indices into the
          flattened grid (`numpy.ravel_multi_index(..., grid.shape)`).

        **Returns:** shape `(*P, *trailing)`. From `point_stencil` when the operator has one
        (only the neighbours of `points` are read), else the whole-grid result gathered.
        """
        stencil = self.point_stencil(grid, points)
        if stencil is None:
            return flat_field(self(field, grid), grid)[jnp.asarray(points)]
        return _contract(flat_field(field, grid), *stencil)

    def __add__(self, other):
        return Combination(((1.0, self), (1.0, _as_operator(other))))

    def __radd__(self, other):
        return Combination(((1.0, _as_operator(other)), (1.0, self)))

    def __sub__(self, other):
        return Combination(((1.0, self), (-1.0, _as_operator(other))))

    def __rsub__(self, other):
        return Combination(((1.0, _as_operator(other)), (-1.0, self)))

    def __neg__(self):
        return Combination(((-1.0, self),))

    def __mul__(self, scale):
        if isinstance(scale, AbstractOperator):
            raise TypeError(
                "operators compose with `ops.Compose(outer, inner)`, not `*`; "
                "`*` scales an operator by a number."
            )
        return Combination(((scale, self),))

    __rmul__ = __mul__


CHUNK_ROWS = 4096  # rows per step of `_contract`'s scan


def _contract(flat: Array, neighbours: Array, weights: Array) -> Array:
    """`sum_j weights[..., j] * flat[neighbours[..., j]]`, in a `lax.scan` over chunks of
    about `CHUNK_ROWS` rows (each chunk one fused gather-multiply-add over the stencil).

    Why a scan: its transpose scatters every chunk into one grid-sized accumulator carried
    through the reversed loop, and its temporaries are chunk-sized. An unrolled sum of
    gathers transposes to one zero-filled grid-sized buffer per stencil column, all live at
    once; a single gather of every column materialises `rows x width` gathered rows. (For
    stacks that are not differentiated, one fused gather was tried too: faster alone, slower
    inside the solve; docs/notes/2026-benchmarks-log.md, section 10.)"""
    trailing = flat.shape[1:]
    lead, width = neighbours.shape[:-1], neighbours.shape[-1]
    rows = int(np.prod(lead, dtype=np.int64))
    if not trailing:
        # A scalar field (`u` itself, not the basis): one gather of every column is only
        # `rows x width` numbers, and its transpose one scatter into one grid vector; a scan
        # would store its per-chunk indices and weights again as residuals when linearised.
        weights = jnp.asarray(weights).astype(flat.dtype)
        return jnp.sum(weights * flat[neighbours], axis=-1)
    neighbours = jnp.reshape(neighbours, (rows, width))
    weights = jnp.reshape(jnp.asarray(weights).astype(flat.dtype), (rows, width))
    chunks = max(1, -(-rows // CHUNK_ROWS))
    size = -(-rows // chunks)
    pad = ((0, chunks * size - rows), (0, 0))  # padded rows read row 0 with weight 0
    neighbours = jnp.pad(neighbours, pad).reshape(chunks, size, width)
    weights = jnp.pad(weights, pad).reshape(chunks, size, width)
    ones = (1,) * len(trailing)

    def step(_, chunk):
        index, w = chunk
        out = 0
        for j in range(width):
            out = out + w[:, j].reshape((size,) + ones) * flat[index[:, j]]
        return None, out

    # `out` starts as the Python int 0, so the checker infers `int | Array` for it.
    values = cast(Array, jax.lax.scan(step, None, (neighbours, weights))[1])
    values = values.reshape((chunks * size,) + trailing)[:rows]
    return values.reshape(lead + trailing)


def _as_operator(value) -> AbstractOperator:
    if isinstance(value, AbstractOperator):
        return value
    raise TypeError(f"expected an hcmoe operator; got {type(value).__name__}: {value!r}.")


class Identity(AbstractOperator):
    """`L u = u`."""

    def __call__(self, field, grid):
        return field

    def point_stencil(self, grid, points):
        points = jnp.asarray(points)
        return points[..., None], jnp.ones(points.shape + (1,))


class Combination(AbstractOperator):
    """`L u = sum_i c_i L_i u` (built by `+`, `-` and scalar `*` on operators)."""

    terms: tuple[tuple[float, AbstractOperator], ...]

    def __call__(self, field, grid):
        return sum(scale * op(field, grid) for scale, op in self.terms)

    def point_stencil(self, grid, points):
        stencils = [op.point_stencil(grid, points) for _, op in self.terms]
        if any(s is None for s in stencils):
            return None
        stencils = cast(list[tuple[Array, Array]], stencils)  # none is None (checked above)
        neighbours = jnp.concatenate([n for n, _ in stencils], axis=-1)
        weights = jnp.concatenate([c * w for (c, _), (_, w) in zip(self.terms, stencils)], axis=-1)
        return neighbours, weights

    def fourier_symbol(self, grid):
        symbols = [op.fourier_symbol(grid) for _, op in self.terms]
        if any(s is None for s in symbols):
            return None
        symbols = cast(list[tuple[tuple[str, ...], np.ndarray]], symbols)  # checked above
        axes = tuple(a for a in grid.names if any(a in names for names, _ in symbols))
        return axes, sum(c * s for (c, _), (_, s) in zip(self.terms, symbols))

    def at_points(self, field, grid, points):
        # Term by term: the same rounding as the whole-grid `__call__`.
        return sum(scale * op.at_points(field, grid, points) for scale, op in self.terms)

    def __add__(self, other):
        other = _as_operator(other)
        extra = other.terms if isinstance(other, Combination) else ((1.0, other),)
        return Combination(self.terms + extra)

    def __mul__(self, scale):
        if isinstance(scale, AbstractOperator):
            return super().__mul__(scale)
        return Combination(tuple((scale * c, op) for c, op in self.terms))

    __rmul__ = __mul__


class Compose(AbstractOperator):
    """`L u = outer(inner(u))`.

    At points: when both are local stencils, so is the composition (`point_stencil`), and
    only the neighbours of the points are read. Two stencils along the same axis
    (`FiniteDifference`, `BackwardDifference`, or compositions of them) are merged into one
    per-position stencil of that axis at trace time, each neighbour once (`d_x` of `d_x`,
    width 3 each: the 5-point stencil, 3 non-zero weights inside); others multiply out
    (`outer` width x `inner` width). Otherwise `inner` is applied on the grid and `outer` at
    the points."""

    outer: AbstractOperator
    inner: AbstractOperator

    def __call__(self, field, grid):
        return self.outer(self.inner(field, grid), grid)

    def point_stencil(self, grid, points):
        table = _axis_table(self, grid)
        if table is not None:
            return _stencil_at_points(grid, *table, points)
        outer = self.outer.point_stencil(grid, points)
        if outer is None:
            return None
        neighbours, weights = outer
        inner = self.inner.point_stencil(grid, neighbours)  # neighbours are grid points
        if inner is None:
            return None
        inner_neighbours, inner_weights = inner
        shape = neighbours.shape[:-1] + (-1,)
        weights = jnp.asarray(weights)[..., None] * jnp.asarray(inner_weights)
        return inner_neighbours.reshape(shape), weights.reshape(shape)

    def at_points(self, field, grid, points):
        stencil = self.point_stencil(grid, points)
        if stencil is not None:
            return _contract(flat_field(field, grid), *stencil)
        return self.outer.at_points(self.inner(field, grid), grid, points)


_EPS = float(np.finfo(np.float64).eps)


def _axis_table(op: AbstractOperator, grid: Grid):
    """`(axis, index, weight)`: the per-position stencils `(n, width)` of an operator that acts
    along one axis only (`FiniteDifference`, `BackwardDifference`, or a `Compose` of such
    along the same axis, merged: each neighbour once, exact zeros dropped); else None."""
    from ._finite_difference import BackwardDifference, FiniteDifference  # they import this

    if isinstance(op, (FiniteDifference, BackwardDifference)):
        return (op.axis, *op._stencils(grid))
    if not isinstance(op, Compose):
        return None
    outer, inner = _axis_table(op.outer, grid), _axis_table(op.inner, grid)
    if outer is None or inner is None or outer[0] != inner[0]:
        return None
    (axis, o_index, o_weight), (_, i_index, i_weight) = outer, inner
    rows = []
    for i in range(o_index.shape[0]):
        merged: dict[int, float] = {}
        scale: dict[int, float] = {}
        for j, wj in zip(o_index[i], o_weight[i]):
            for k, wk in zip(i_index[j], i_weight[j]):
                merged[int(k)] = merged.get(int(k), 0.0) + float(wj) * float(wk)
                scale[int(k)] = scale.get(int(k), 0.0) + abs(float(wj) * float(wk))
        # Drop weights that cancel (to rounding: an exact zero, or a few ulps of their terms).
        kept = [(k, w) for k, w in merged.items() if abs(w) > 8 * _EPS * scale[k]]
        rows.append(sorted(kept) or [(i, 0.0)])
    width = max(len(r) for r in rows)
    index = np.empty((len(rows), width), np.int32)
    weight = np.zeros((len(rows), width), np.float64)
    for i, r in enumerate(rows):
        index[i] = [k for k, _ in r] + [r[0][0]] * (width - len(r))  # padding: weight 0
        weight[i, : len(r)] = [w for _, w in r]
    return axis, index, weight


class Linear(AbstractOperator):
    """A user-supplied linear callable `fn(field, grid) -> field`.

    `fn` must be linear in `field` and act on the leading `grid.ndim` axes only (trailing axes
    are a batch of fields). At points it is applied on the whole grid and gathered.
    """

    fn: Callable = eqx.field(static=True)

    def __call__(self, field, grid):
        out = self.fn(field, grid)
        if out.shape != field.shape:
            raise ValueError(
                f"ops.Linear: fn must return the shape of its input {field.shape}; got {out.shape}."
            )
        return out


def _stencil_at_points(grid: Grid, name: str, index: np.ndarray, weight: np.ndarray, points):
    """The per-point stencils `(index, weight)` of an axis (shape `(n, width)`) as flat-grid
    neighbours and weights of the flat indices `points`."""
    axis = grid.axis(name)
    n = grid.shape[axis]
    stride = int(np.prod(grid.shape[axis + 1 :], dtype=np.int64))
    points = jnp.asarray(points)
    position = (points // stride) % n
    shift = jnp.asarray((index - np.arange(n)[:, None]) * stride, points.dtype)
    return points[..., None] + shift[position], jnp.asarray(weight)[position]
