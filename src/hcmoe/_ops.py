"""Linear operators on grid fields.

Every operator maps a field of shape `(*grid.shape, *trailing)` to one of the same shape,
acting on the grid axes only, so the same code applies it to a solution `u` (no trailing
axes) and to a whole stack of basis functions `B` (one trailing basis axis) at once.
Operators combine linearly: `ops.Identity() - 0.5 * ops.FiniteDifference("x")`.

The constraint solve needs an operator's values only at the sampled points, so every operator
also has `at_points(field, grid, points)`. Local operators (finite differences, identity, their
combinations) say which neighbours each point needs (`point_stencil`) and are evaluated there
directly, `O(points x stencil)` instead of `O(grid)`; the others (spectral operators, user
callables, compositions) are applied on the whole grid and gathered. `operators_at_points`
evaluates a dict of operators at once, sharing one real FFT among the Fourier multipliers.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Int

from ._grid import Grid


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
    inside the solve; benchmarks/README.md, section 10.)"""
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

    values = jax.lax.scan(step, None, (neighbours, weights))[1]
    values = values.reshape((chunks * size,) + trailing)[:rows]
    return values.reshape(lead + trailing)


def _contract_many(flat: Array, stencils: Sequence[tuple[Array, Array]]) -> list[Array]:
    """`_contract` of several `(neighbours, weights)` stencils (any point shapes, any widths)
    of the same field in one scan: rows concatenated, narrower stencils padded with zero
    weights. One scan means one cotangent accumulator for all of them."""
    width = max(neighbours.shape[-1] for neighbours, _ in stencils)
    rows, neighbour_rows, weight_rows = [], [], []
    for neighbours, weights in stencils:
        neighbours = jnp.reshape(neighbours, (-1, neighbours.shape[-1]))
        weights = jnp.reshape(weights, (-1, weights.shape[-1]))  # cast in `_contract`
        pad = ((0, 0), (0, width - neighbours.shape[-1]))
        neighbour_rows.append(jnp.pad(neighbours, pad))  # padded columns read row 0 ...
        weight_rows.append(jnp.pad(weights, pad))  # ... with weight 0
        rows.append(neighbours.shape[0])
    values = _contract(flat, jnp.concatenate(neighbour_rows), jnp.concatenate(weight_rows))
    pieces = jnp.split(values, np.cumsum(rows)[:-1].tolist())
    return [
        piece.reshape(neighbours.shape[:-1] + flat.shape[1:])
        for piece, (neighbours, _) in zip(pieces, stencils)
    ]


def whole_grid_values(
    requests: Sequence[tuple[AbstractOperator, ArrayLike]], field: Array, grid: Grid
) -> dict[int, Array]:
    """`{i: op(field)}` on the whole grid, flattened to `(grid.size, *trailing)`, for the
    requests whose operator is a Fourier multiplier (from one shared real FFT of `field`):
    what `evaluate_at_points(..., whole=...)` then only gathers. Computed once, it serves
    requests at other points of the same field (e.g. each expert's rows in turn).

    Other whole-grid operators (`Compose`, `Linear`) are left out on purpose: gathered right
    after they are applied, XLA fuses the two and computes only the rows gathered (measured:
    `Compose` of two x-differences, 101 x 1024 x 16, 20k rows: 15 ms with the gather, 23 ms
    for the whole grid alone); an FFT cannot be fused that way."""
    whole, spectral = {}, []
    for i, (op, _) in enumerate(requests):
        symbol = op.fourier_symbol(grid)
        if symbol is not None:
            spectral.append((i, symbol))
    if spectral:
        names = tuple(a for a in grid.names if any(a in axes for _, (axes, _) in spectral))
        spectrum = _rfft(field, grid, names)
        for i, (_, symbol) in spectral:
            whole[i] = flat_field(_irfft(spectrum, symbol, grid, names, field), grid)
    return whole


def evaluate_at_points(
    requests: Sequence[tuple[AbstractOperator, ArrayLike]], field: Array, grid: Grid,
    whole: Mapping[int, Array] | None = None,
) -> list[Array]:
    """`[op.at_points(field, grid, points) for op, points in requests]`, computed together:
    every local stencil (`point_stencil`) in one gather-and-contract pass (one cotangent
    buffer in the gradient), every Fourier multiplier from one shared real FFT of `field`
    (each then one inverse FFT, gathered), the rest applied on the whole grid and gathered.
    `whole`: `whole_grid_values` of the same field and operators, already computed; the
    requests it holds are gathered from it.
    """
    out: list[Array | None] = [None] * len(requests)
    local, spectral = [], []
    for i, (op, points) in enumerate(requests):
        if whole is not None and i in whole:
            out[i] = whole[i][jnp.asarray(points)]
            continue
        symbol = op.fourier_symbol(grid)
        if symbol is not None:
            spectral.append((i, symbol))
            continue
        stencil = op.point_stencil(grid, points)
        if stencil is None:
            out[i] = op.at_points(field, grid, points)
        else:
            local.append((i, stencil))
    if spectral:
        names = tuple(a for a in grid.names if any(a in axes for _, (axes, _) in spectral))
        spectrum = _rfft(field, grid, names)
        for i, (_, symbol) in spectral:
            values = _irfft(spectrum, symbol, grid, names, field)
            out[i] = flat_field(values, grid)[jnp.asarray(requests[i][1])]
    if local:
        values = _contract_many(flat_field(field, grid), [stencil for _, stencil in local])
        for (i, _), value in zip(local, values):
            out[i] = value
    return out


def evaluate_at_expert_points(
    requests: Sequence[tuple[AbstractOperator, ArrayLike]], fields: Array, grid: Grid
) -> list[Array]:
    """`evaluate_at_points` of each expert's requests on its own field, for every expert at
    once: `fields` has shape `(*grid.shape, K)` (expert `k`'s field in `fields[..., k]`) and
    each request's points `(K, *p)`; returns one `(K, *p)` array per request.

    Equal to `jax.vmap(evaluate_at_points)` over the experts, without its batched gathers:
    XLA:CPU expands a gather (and the scatter of its transpose) whose operand and indices
    both carry the experts' axis into index tuples built at run time (measured at 10^5
    points, K = 4: 7 of a 30 ms backward). Here the fields are flattened to
    `grid.size * K` numbers and every local stencil of every expert is read by one plain
    gather at `neighbour * K + k`; Fourier multipliers share one real FFT of all the fields,
    other operators run on the whole grid with the experts as a trailing axis."""
    num = fields.shape[-1]
    flat = jnp.reshape(fields, (-1,))
    expert = jnp.arange(num, dtype=jnp.int32)
    whole = whole_grid_values(requests, fields, grid)
    out: list[Array | None] = [None] * len(requests)
    local = []
    wide = grid.size * num >= 2**31  # flat indices into `fields` past int32
    for i, (op, points) in enumerate(requests):
        points = jnp.asarray(points)
        if wide:
            points = points.astype(jnp.int64)
        offset = expert.reshape((num,) + (1,) * (points.ndim - 1)).astype(points.dtype)
        stencil = None if i in whole else op.point_stencil(grid, points)
        if stencil is not None:
            neighbours, weights = stencil
            local.append((i, (neighbours * num + offset[..., None], weights)))
            continue
        values = whole[i] if i in whole else flat_field(op(fields, grid), grid)
        out[i] = jnp.reshape(values, (-1,))[points * num + offset]
    if local:  # one gather (one scatter in the transpose) for all of them
        values = _contract_many(flat, [stencil for _, stencil in local])
        for (i, _), value in zip(local, values):
            out[i] = value
    return out


def operators_at_points(
    operators: Mapping[str, AbstractOperator], field: Array, grid: Grid, points
) -> dict[str, Array]:
    """`{name: op.at_points(field, grid, points)}`, through `evaluate_at_points` (one pass
    for the local stencils, one real FFT shared by the Fourier multipliers)."""
    names = list(operators)
    values = evaluate_at_points([(operators[name], points) for name in names], field, grid)
    return dict(zip(names, values))


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
        neighbours = jnp.concatenate([n for n, _ in stencils], axis=-1)
        weights = jnp.concatenate([c * w for (c, _), (_, w) in zip(self.terms, stencils)],
                                  axis=-1)
        return neighbours, weights

    def fourier_symbol(self, grid):
        symbols = [op.fourier_symbol(grid) for _, op in self.terms]
        if any(s is None for s in symbols):
            return None
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
                f"ops.Linear: fn must return the shape of its input {field.shape}; "
                f"got {out.shape}."
            )
        return out


# --------------------------------------------------------------------------------------------
# Finite differences
# --------------------------------------------------------------------------------------------


def fd_weights(offsets: np.ndarray, order: int) -> np.ndarray:
    """Weights `c` with `sum_k c_k f(x + offsets_k h) ~= h^order f^(order)(x)`.

    Solves the moment (Vandermonde) conditions exactly; accuracy is `len(offsets) - order`.
    """
    offsets = np.asarray(offsets, dtype=np.float64)
    n = offsets.size
    powers = np.arange(n)
    vandermonde = offsets[None, :] ** powers[:, None]
    rhs = np.zeros(n)
    rhs[order] = math.factorial(order)
    return np.linalg.solve(vandermonde, rhs)


def _fd_stencils(n: int, order: int, accuracy: int, periodic: bool):
    """Per-point neighbour indices and weights (unit spacing), shapes `(n, width)`.

    Interior points use the central stencil of the requested accuracy (width
    `2*floor((order+1)/2) - 1 + accuracy`); on a non-periodic axis the points too close to an
    edge use one-sided stencils of the same width, as close to centred as fits.
    """
    half = (order + 1) // 2 - 1 + accuracy // 2
    width = 2 * half + 1
    if not periodic and width > n:
        raise ValueError(
            f"FiniteDifference: a derivative of order {order} with accuracy {accuracy} needs "
            f"{width} points along the axis; the grid has {n}."
        )
    central = fd_weights(np.arange(-half, half + 1), order)
    index = np.empty((n, width), dtype=np.int32)
    weight = np.empty((n, width), dtype=np.float64)
    for i in range(n):
        if periodic:
            index[i] = (i + np.arange(-half, half + 1)) % n
            weight[i] = central
        else:
            start = min(max(i - half, 0), n - width)
            index[i] = np.arange(start, start + width)
            weight[i] = central if start == i - half else fd_weights(index[i] - i, order)
    return index, weight


class FiniteDifference(AbstractOperator):
    """The `order`-th derivative along one axis by finite differences.

    Central differences of the given `accuracy` (even, default 2) inside; on a non-periodic
    axis, one-sided stencils of the same width near the edges (formal accuracy
    `width - order`: the same as inside for odd orders, one less for even orders);
    wrap-around on a periodic axis. Assumes uniform spacing along the axis.

    **Arguments:**

    - `axis`: the grid axis name, e.g. `"x"`.
    - `order`: derivative order (1, 2, ...).
    - `accuracy`: even formal order of accuracy of the interior stencil.
    """

    axis: str = eqx.field(static=True)
    order: int = eqx.field(static=True, default=1)
    accuracy: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"FiniteDifference: order must be an int >= 1; got {self.order!r}.")
        if not isinstance(self.accuracy, int) or self.accuracy < 2 or self.accuracy % 2:
            raise ValueError(
                f"FiniteDifference: accuracy must be an even int >= 2; got {self.accuracy!r}."
            )

    def _stencils(self, grid):
        n = grid.shape[grid.axis(self.axis)]
        index, weight = _fd_stencils(n, self.order, self.accuracy, grid.is_periodic(self.axis))
        return index, weight / grid.spacing(self.axis) ** self.order

    def __call__(self, field, grid):
        return _apply_stencils(field, grid.axis(self.axis), *self._stencils(grid))

    def point_stencil(self, grid, points):
        return _stencil_at_points(grid, self.axis, *self._stencils(grid), points)


def _static_take(x: Array, index: np.ndarray) -> Array:
    """`x[index]` along axis 0 for a concrete `index`, as a concatenation of slices (runs of
    consecutive indices): no gather, so the transpose is cheap padding, not a scatter."""
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [index.size]])
    pieces = [x[index[a] : index[a] + (b - a)] for a, b in zip(starts, stops)]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)


def _apply_stencils(field, axis: int, index: np.ndarray, weight: np.ndarray):
    """`out[i] = sum_j weight[i, j] * field[index[i, j]]` along `axis` (per-point stencils)."""
    n = index.shape[0]
    moved = jnp.moveaxis(field, axis, 0)
    out = 0
    for j in range(index.shape[1]):
        w = jnp.asarray(weight[:, j], dtype=field.dtype).reshape((n,) + (1,) * (field.ndim - 1))
        out = out + w * _static_take(moved, index[:, j])
    return jnp.moveaxis(out, 0, axis)


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


def _backward_stencils(n: int, accuracy: int):
    """First derivative from the point and the `accuracy` points before it (BDF weights);
    the first points use as many earlier points as there are (point 0: a forward stencil)."""
    if accuracy + 1 > n:
        raise ValueError(
            f"BackwardDifference: accuracy {accuracy} needs {accuracy + 1} points along the "
            f"axis; the grid has {n}."
        )
    width = accuracy + 1
    index = np.empty((n, width), dtype=np.int32)
    weight = np.zeros((n, width), dtype=np.float64)
    for i in range(n):
        if i == 0:
            offsets = np.arange(width)
        else:
            offsets = -np.arange(min(i, accuracy) + 1)[::-1]
        points = i + offsets
        index[i] = np.concatenate([points, np.full(width - points.size, i)])
        weight[i, : points.size] = fd_weights(offsets, 1)
    return index, weight


class BackwardDifference(AbstractOperator):
    """The first derivative along an axis from the current and earlier points only (the BDF
    formulas: `accuracy=1` is backward Euler, `2` is BDF2; the first points use the lower
    orders that fit, point 0 a forward stencil). In time, a residual built on it is an
    implicit, A-stable time-stepping scheme: its discrete solution is determined level by
    level by the initial and boundary conditions, and a small residual means a small error,
    which central differences in time (leapfrog, unstable for diffusion) do not give.

    **Arguments:**

    - `axis`: the grid axis name, usually `"t"` (not periodic).
    - `accuracy`: 1 or more: the number of earlier points used.
    """

    axis: str = eqx.field(static=True)
    accuracy: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if not isinstance(self.accuracy, int) or self.accuracy < 1:
            raise ValueError(
                f"BackwardDifference: accuracy must be an int >= 1; got {self.accuracy!r}."
            )

    def _stencils(self, grid):
        if grid.is_periodic(self.axis):
            raise ValueError(
                f"BackwardDifference: axis {self.axis!r} is periodic; use FiniteDifference."
            )
        index, weight = _backward_stencils(grid.shape[grid.axis(self.axis)], self.accuracy)
        return index, weight / grid.spacing(self.axis)

    def __call__(self, field, grid):
        return _apply_stencils(field, grid.axis(self.axis), *self._stencils(grid))

    def point_stencil(self, grid, points):
        return _stencil_at_points(grid, self.axis, *self._stencils(grid), points)


# --------------------------------------------------------------------------------------------
# Spectral operators (periodic axes): Fourier multipliers, by real FFTs
# --------------------------------------------------------------------------------------------


def _wavenumbers(grid: Grid, name: str) -> np.ndarray:
    if not grid.is_periodic(name):
        raise ValueError(
            f"spectral operators need a periodic axis; axis {name!r} of {grid} is not periodic "
            f"(declare it with Grid(..., periodic=({name!r},)) or use FiniteDifference)."
        )
    n = grid.shape[grid.axis(name)]
    low, high = grid.extent(name)
    return 2 * np.pi * np.fft.fftfreq(n, d=(high - low) / n)


def _symbol_on_grid(grid: Grid, wavenumbers: dict[str, np.ndarray], symbol) -> np.ndarray:
    """`symbol(k_a, k_b, ...)` on the grid's axes: size 1 on the axes not in `wavenumbers`."""
    grids = []
    for name, k in wavenumbers.items():
        shape = [1] * grid.ndim
        shape[grid.axis(name)] = k.size
        grids.append(k.reshape(shape))
    return np.broadcast_to(symbol(*grids), _symbol_shape(grid, tuple(wavenumbers)))


def _symbol_shape(grid: Grid, names) -> tuple[int, ...]:
    return tuple(n if a in names else 1 for a, n in zip(grid.names, grid.shape))


def _rfft(field: Array, grid: Grid, names: tuple[str, ...]) -> Array:
    """The real FFT of `field` over the periodic axes `names` (in grid order; the last one
    is halved)."""
    return jnp.fft.rfftn(field, axes=tuple(grid.axis(a) for a in names))


def _irfft(spectrum: Array, symbol: np.ndarray, grid: Grid, names, field: Array) -> Array:
    """The real field whose spectrum over `names` is `spectrum * symbol` (shape of `field`)."""
    axes = tuple(grid.axis(a) for a in names)
    last = axes[-1]
    symbol = np.asarray(symbol)
    if symbol.shape[last] > 1:
        symbol = np.take(symbol, np.arange(spectrum.shape[last]), axis=last)  # rfft half
    symbol = symbol.reshape(symbol.shape + (1,) * (field.ndim - grid.ndim))
    sizes = tuple(field.shape[a] for a in axes)
    out = jnp.fft.irfftn(spectrum * jnp.asarray(symbol, spectrum.dtype), s=sizes, axes=axes)
    return out.astype(field.dtype)


def _apply_symbol(op: AbstractOperator, field: Array, grid: Grid) -> Array:
    names, symbol = op.fourier_symbol(grid)
    return _irfft(_rfft(field, grid, names), symbol, grid, names, field)


def _zero_nyquist(k: np.ndarray, order: int) -> np.ndarray:
    # The Nyquist mode of an odd derivative has no real-valued representation; drop it.
    if order % 2 and k.size % 2 == 0:
        k = k.copy()
        k[k.size // 2] = 0.0
    return k


class Spectral(AbstractOperator):
    """The `order`-th derivative along a periodic axis by FFT (mode `k` times `(ik)^order`)."""

    axis: str = eqx.field(static=True)
    order: int = eqx.field(static=True, default=1)

    def fourier_symbol(self, grid):
        k = _zero_nyquist(_wavenumbers(grid, self.axis), self.order)
        return (self.axis,), _symbol_on_grid(grid, {self.axis: k},
                                             lambda kk: (1j * kk) ** self.order)

    def __call__(self, field, grid):
        return _apply_symbol(self, field, grid)


class Laplacian(AbstractOperator):
    """`sum_a d^2 u / d a^2` over `axes`, spectrally (`method="spectral"`, periodic axes only)
    or by second-order finite differences (`method="fd"`)."""

    axes: tuple[str, ...] = eqx.field(static=True, default=("x", "y"))
    method: str = eqx.field(static=True, default="spectral")

    def __check_init__(self):
        if self.method not in ("spectral", "fd"):
            raise ValueError(f"Laplacian: method must be 'spectral' or 'fd'; got {self.method!r}.")

    def _fd(self) -> AbstractOperator:
        return sum((FiniteDifference(a, order=2) for a in self.axes[1:]),
                   FiniteDifference(self.axes[0], order=2))

    def fourier_symbol(self, grid):
        if self.method == "fd":
            return None
        ks = {a: _wavenumbers(grid, a) for a in self.axes}
        return _names(grid, ks), _symbol_on_grid(grid, ks, lambda *kk: -sum(k**2 for k in kk))

    def point_stencil(self, grid, points):
        return self._fd().point_stencil(grid, points) if self.method == "fd" else None

    def at_points(self, field, grid, points):
        if self.method == "fd":
            return self._fd().at_points(field, grid, points)
        return super().at_points(field, grid, points)

    def __call__(self, field, grid):
        if self.method == "fd":
            return sum(FiniteDifference(a, order=2)(field, grid) for a in self.axes)
        return _apply_symbol(self, field, grid)


def _names(grid: Grid, wavenumbers: dict) -> tuple[str, ...]:
    return tuple(a for a in grid.names if a in wavenumbers)


class InverseLaplacian(AbstractOperator):
    """`psi = Delta^{-1} u` on periodic `axes`, with the mean mode set to zero."""

    axes: tuple[str, ...] = eqx.field(static=True, default=("x", "y"))

    def fourier_symbol(self, grid):
        ks = {a: _wavenumbers(grid, a) for a in self.axes}

        def symbol(*kk):
            k2 = sum(k**2 for k in kk)
            return np.where(k2 == 0, 0.0, -1.0 / np.where(k2 == 0, 1.0, k2))

        return _names(grid, ks), _symbol_on_grid(grid, ks, symbol)

    def __call__(self, field, grid):
        return _apply_symbol(self, field, grid)


class VelocityFromVorticity(AbstractOperator):
    """One component of the 2-D incompressible velocity of a periodic vorticity field.

    With the stream function `-Delta psi = omega` (zero mean): `u = d psi / dy`,
    `v = -d psi / dx`. `component` is `"u"` (along `axes[0]`) or `"v"` (along `axes[1]`).
    """

    component: str = eqx.field(static=True)
    axes: tuple[str, str] = eqx.field(static=True, default=("x", "y"))

    def __check_init__(self):
        if self.component not in ("u", "v"):
            raise ValueError(
                f"VelocityFromVorticity: component must be 'u' or 'v'; got {self.component!r}."
            )

    def fourier_symbol(self, grid):
        ax, ay = self.axes
        ks = {ax: _zero_nyquist(_wavenumbers(grid, ax), 1),
              ay: _zero_nyquist(_wavenumbers(grid, ay), 1)}

        def symbol(kx_, ky_):
            k2 = kx_**2 + ky_**2
            inv = np.where(k2 == 0, 0.0, 1.0 / np.where(k2 == 0, 1.0, k2))  # psi = omega / k^2
            return 1j * ky_ * inv if self.component == "u" else -1j * kx_ * inv

        return _names(grid, ks), _symbol_on_grid(grid, ks, symbol)

    def __call__(self, field, grid):
        return _apply_symbol(self, field, grid)
