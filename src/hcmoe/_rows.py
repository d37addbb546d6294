"""Every expert's rows: the `Rows` options, the sampled PDE points, the condition rows, and
the operators evaluated at them (`ExpertProblem`)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array

from ._expert import (
    ExpertProblem,
)
from ._grid import Grid
from ._operators import evaluate_at_points
from ._partition import AbstractPartition, ExpertRows
from ._pde import SCOPES, AbstractPDE, ansatz, residual_mask
from ._pdedata import PDEData


BALANCES = ("mean", "sum")
RIDGE_TOWARD = ("zero", "init")


class Rows(eqx.Module):
    r"""The rows of every expert's least-squares problem: its sampled PDE points, how its
    condition rows are shared and weighted, and its ridge.

    Expert `k` minimises

    $$\|F(A_k w + c_k)\|^2 + \sum_c \|s_c (L_c u - g_c)\|^2 + \|\text{ridge}\,(w - w_c)\|^2$$

    over its sampled PDE points, its condition rows and `n_basis` ridge rows.

    **Arguments:**

    - `points_per_expert`: PDE points sampled (without replacement, with `solve`'s `key`)
      per expert (the paper: 20,000); None (default) uses every point. An expert owning fewer
      points uses all of its own (the request is clipped). Condition points are always all
      used. In the `Joint` coupling the one problem samples `K * points_per_expert` points
      over the whole domain.
    - `ridge`: weight of the `ridge * w` rows (the paper: 1e-4); keeps every problem well
      posed in the directions the PDE and condition rows do not determine.
    - `ridge_toward`: `"zero"` (default, the paper): the ridge pulls the weights to `w_c = 0`;
      `"init"`: to `w_c = init` (default ones: the unconstrained sum of the basis, PI-SC's
      prediction). Only the weakly determined directions differ.
    - `balance`: `"mean"` (default): each expert minimises its number of PDE rows times
      `mean(F^2) + sum_c weight_c^2 mean_c(cond_c^2)`, the functional `hcmoe.losses`
      measures, so a condition's weight means the same in the solve and in the loss whatever
      the numbers of rows; `"sum"`: plain sums of squared rows (the paper's release).
    - `condition_scope`: None (default: each condition's own `scope`), or `"owned"` /
      `"global"` for all of them (see `hcmoe.Condition`: with `"global"` every expert carries
      every condition row).

    **Raises:** `ValueError` at construction for a value outside the choices above.
    """

    points_per_expert: int | None = eqx.field(default=None, static=True)
    ridge: float = eqx.field(default=1e-4, static=True)
    ridge_toward: str = eqx.field(default="zero", static=True)
    balance: str = eqx.field(default="mean", static=True)
    condition_scope: str | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        points = self.points_per_expert
        if points is not None and (
            isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 1
        ):
            raise ValueError(f"points_per_expert: expected a positive int or None; got {points!r}.")
        if (
            isinstance(self.ridge, bool)
            or not isinstance(self.ridge, (int, float))
            or not (self.ridge >= 0)
        ):
            raise ValueError(f"ridge: expected a non-negative number; got {self.ridge!r}.")
        if self.ridge_toward not in RIDGE_TOWARD:
            raise ValueError(
                f"ridge_toward: expected one of {RIDGE_TOWARD}; got {self.ridge_toward!r}."
            )
        if self.balance not in BALANCES:
            raise ValueError(f"balance: expected one of {BALANCES}; got {self.balance!r}.")
        if self.condition_scope not in (None, *SCOPES):
            raise ValueError(
                f"condition_scope: expected None, 'owned' or 'global'; got "
                f"{self.condition_scope!r}."
            )


def _sample_rows(rows: ExpertRows, points: int | None, key) -> tuple[Array, Array]:
    """Per expert, `points` rows drawn without replacement from its own rows.

    Experts owning fewer rows than asked use all of theirs (the extra slots are padding with
    zero weight). `points=None` takes every row. The rows drawn are those with the `points`
    smallest of i.i.d. uniform scores (a uniformly random subset), listed in grid order.
    """
    if points is None or points >= rows.width:
        return jnp.asarray(rows.index), jnp.asarray(rows.valid)
    if key is None:
        raise ValueError(
            f"key: points_per_expert={points} samples points at random, so solve needs "
            "key=jax.random.key(...); pass points_per_expert=None to use every point."
        )
    scores = jr.uniform(key, rows.index.shape)
    scores = jnp.where(jnp.asarray(rows.valid), scores, 2.0)  # padding sorts last
    position = _lowest(scores, points)
    index = jnp.take_along_axis(jnp.asarray(rows.index), position, axis=1)
    valid = jnp.take_along_axis(jnp.asarray(rows.valid), position, axis=1)
    return index, valid


def _bisect(enough, low: Array, high: Array) -> Array:
    """Per row, the smallest integer `t` in `[low, high]` with `enough(t)` (a monotone
    test, true at `high`), by bisection; the loop stops once every row's bounds meet (at
    once where they start equal)."""

    def halve(bounds):
        low, high = bounds
        middle = low + (high - low) // 2
        fits = enough(middle)
        return jnp.where(fits, low, middle + 1), jnp.where(fits, middle, high)

    return jax.lax.while_loop(lambda b: jnp.any(b[0] < b[1]), halve, (low, high))[1]


def _lowest(scores: Array, count: int) -> Array:
    """Per row of non-negative `scores` `(K, n)`, the positions of its `count` smallest
    entries in increasing order (ties at the threshold: the lower positions, as `top_k`).

    The same set as `jax.lax.top_k(-scores, count)` without a sort (XLA's CPU sort of 10^5
    keys costs tens of ms): the threshold is found by bisection on the scores' bit patterns
    (non-negative floats order as their unsigned integers), one vectorised count per bit, 32
    bits at a time: float64 scores by their high words first (32 counts of 32-bit words),
    then the low words of the few scores that share the threshold's high word (usually one,
    and then no count at all).
    """
    if scores.dtype == jnp.float64:
        bits = jax.lax.bitcast_convert_type(scores, jnp.uint64)
        words = [(bits >> 32).astype(jnp.uint32), bits.astype(jnp.uint32)]
    else:
        words = [jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)]
    below = jnp.zeros(scores.shape, bool)  # smaller than the threshold in the words so far
    equal = None  # equal to it in the words so far (None: every score)
    for word in words:
        taken = jnp.sum(below, axis=1)

        def enough(middle, word=word, equal=equal, taken=taken):
            fit = word <= middle[:, None]
            return taken + jnp.sum(fit if equal is None else equal & fit, axis=1) >= count

        if equal is None:
            low, high = jnp.min(word, axis=1), jnp.max(word, axis=1)
        else:
            top = jnp.uint32(np.iinfo(np.uint32).max)
            low = jnp.min(jnp.where(equal, word, top), axis=1)  # pyright: ignore[reportArgumentType]
            high = jnp.max(jnp.where(equal, word, 0), axis=1)
        threshold = _bisect(enough, low, high)
        smaller, same = word < threshold[:, None], word == threshold[:, None]
        below = below | (smaller if equal is None else equal & smaller)
        equal = same if equal is None else equal & same
    assert equal is not None  # set by the first word
    at_most = below | equal
    # More entries at the threshold than room for them (padding scores, equal draws): the
    # lowest positions, up to the last one `last` that is needed, found by bisection on the
    # position. Without such ties (the rule for uniform draws) the loop does not iterate;
    # a cumulative sum over the ties cost 1.4 ms per call at 10^5 scores on XLA:CPU.
    position = jnp.arange(scores.shape[1])[None, :]
    end = scores.shape[1] - 1
    excess = jnp.sum(at_most, axis=1) > count

    def keep(last):
        return below | (at_most & (position <= last[:, None]))

    last = _bisect(
        lambda last: jnp.sum(keep(last), axis=1) >= count,
        jnp.where(excess, 0, end),
        jnp.full(excess.shape, end),
    )
    return jax.vmap(lambda row: jnp.nonzero(row, size=count)[0])(keep(last))


def _condition_rows(
    conditions, grid, members, scope, points, dtype, balance, pde, warn=True, pooled=False
):
    """Every least-squares condition's rows, per expert: face points (K, c) of each condition
    (their operator values are the caller's, evaluated together with the PDE operators), and
    target, scale, valid (K, c), concatenated over the conditions.

    `members` (K, *grid.shape) says which face points an expert owns (scope "owned"); with
    scope "global" every expert gets every row. With `balance="mean"`, the rows of condition
    `c` for expert `k` are scaled by `weight * sqrt(points[k] / rows_k(c))`, so the expert's
    objective is `points[k]` times the loss functional `mean(F^2) + sum_c weight_c^2
    mean_c(cond^2)` (see `Condition`); `"sum"` scales them by `weight` alone. Returns
    `([], None)` when there are no least-squares conditions.
    """
    num_experts = members.shape[0]
    # int32 like the sampled PDE points (`ExpertRows`), so that all stencil indices stay int32
    flat_index = np.arange(grid.size, dtype=np.int32 if grid.size < 2**31 else np.int64)
    flat_index = flat_index.reshape(grid.shape)
    face_points, targets, scales, valids = [], [], [], []
    has_rows = np.zeros(num_experts, bool)
    for cond in conditions:
        axis, face = grid.axis(cond.axis), cond.face_index(grid)
        cond_scope = cond.scope if scope is None else scope
        if cond_scope == "global":
            owned = np.ones((num_experts, int(np.prod(cond.face_shape(grid)))), bool)
        else:
            owned = np.take(members, face, axis=axis + 1).reshape(num_experts, -1)
        rows = ExpertRows.from_masks(owned)
        has_rows |= rows.counts > 0
        index, valid = rows.index, jnp.asarray(rows.valid)
        face_points.append(np.take(flat_index, face, axis=axis).reshape(-1)[index])  # (K, c)
        target = cond.target_on_face(grid).reshape(-1).astype(dtype)
        weight = cond.weight_on_face(grid).reshape(-1).astype(dtype)
        if balance == "mean" and pooled:  # one problem over all experts' rows (`Coupled`)
            factor = np.full((num_experts, 1), np.sqrt(np.sum(points) / max(rows.counts.sum(), 1)))
        elif balance == "mean":
            factor = np.sqrt(points / np.maximum(rows.counts, 1))[:, None]
        else:
            factor = np.ones((num_experts, 1))
        targets.append(target[index])
        scales.append(jnp.where(valid, weight[index] * jnp.asarray(factor, dtype), 0.0))
        valids.append(valid & (weight[index] != 0))  # zero-weight rows are not conditions
    if conditions and warn:
        empty = np.flatnonzero(~has_rows).tolist()
        if empty:
            _warn_no_conditions(pde, empty, num_experts)
    if not face_points:
        return [], None
    return face_points, tuple(jnp.concatenate(x, axis=1) for x in (targets, scales, valids))


_WARNED: set = set()


class ConditionWarning(UserWarning):
    """Some experts receive none of a PDE's (least-squares) conditions."""


def _warn_no_conditions(pde, empty, num_experts):
    key = (type(pde).__name__, tuple(empty), num_experts)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"hcmoe.solve: {type(pde).__name__} has initial/boundary conditions, but experts "
        f"{empty[:8]} of {num_experts} receive none of their rows (scope 'owned'), so their "
        "blocks are constrained by the PDE alone and may settle on a trivial solution (e.g. a "
        "constant). Use scope='global' on the conditions or solve(..., "
        "rows=hcmoe.Rows(condition_scope='global')), or exact=True for value conditions.",
        ConditionWarning,
        stacklevel=4,
    )


def nonfinite_data_entries(data) -> list[tuple[str, Array]]:
    """`(name, all finite)` for every floating-point array entry of a data mapping (checked
    by `solve` like the basis: a NaN in a data field otherwise ends as an unconverged solve
    with no word of why)."""
    if not isinstance(data, Mapping):
        return []
    checks = []
    for name, value in data.items():
        for leaf in jax.tree_util.tree_leaves(value):
            if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
                checks.append((str(name), jnp.all(jnp.isfinite(leaf))))
    return checks


def _sub_grid_axes(shape: tuple[int, ...], grid: Grid) -> tuple[str, ...] | None:
    """The grid axes whose sizes `shape` repeats, in order, when it is a proper, non-empty
    sub-sequence of `grid.shape` (a field over some of the grid's axes: `(nx,)` of a
    `(nt, nx)` grid); else None."""
    if not 0 < len(shape) < grid.ndim:
        return None
    names, start = [], 0
    for size in shape:
        matches = [i for i in range(start, grid.ndim) if grid.shape[i] == size]
        if not matches:
            return None
        names.append(grid.names[matches[0]])
        start = matches[0] + 1
    return tuple(names)


def _looks_like_a_field(shape: tuple[int, ...], grid: Grid) -> bool:
    """Whether a non-grid-shaped `shape` has the grid's size or one of its axes' sizes in a
    dimension (a field in another layout: `(nx, nt)`, `(nt * nx,)`), rather than that of
    a small parameter vector."""
    sizes = {n for n in grid.shape if n > 1}
    return int(np.prod(shape)) == grid.size or any(n in sizes for n in shape)


class _ReadsChecked(PDEData):
    """The data as `residual` sees it (a missing key: `PDEData`'s error), checking as each
    entry is read that it is not a field in a layout `residual` cannot use (see
    `check_residual_data`)."""

    __slots__ = ("grid", "at_points")

    def __init__(self, entries, owner: str, grid: Grid, at_points):
        super().__init__(entries, owner)
        self.grid, self.at_points = grid, frozenset(at_points)

    def __getitem__(self, key):
        value = super().__getitem__(key)
        shape = tuple(getattr(value, "shape", ()))
        if key in self.at_points or not shape:
            return value
        axes = _sub_grid_axes(shape, self.grid)
        if axes is None and _looks_like_a_field(shape, self.grid):
            raise ValueError(
                f"data[{key!r}]: {self.owner}.residual reads it, and it has shape {shape}, "
                f"which looks like a field on the grid {self.grid.shape} (axes "
                f"{list(self.grid.names)}) in another layout (transposed or flattened?). "
                "residual sees values at the sampled points: pass a field as a grid-shaped "
                f"array {self.grid.shape} (it then reaches residual gathered at the points), "
                "or a scalar."
            )
        if axes is not None:
            raise ValueError(
                f"data[{key!r}]: {self.owner}.residual reads it, and it has shape {shape}, a "
                f"field over the grid's {list(axes)} axes only (the grid is {self.grid.shape}, "
                f"axes {list(self.grid.names)}). residual sees values at the sampled points: "
                f"pass a field as a grid-shaped array {self.grid.shape} (it then reaches "
                "residual gathered at the points), e.g. with jnp.broadcast_to, or a scalar."
            )
        return value


def check_residual_data(pde: AbstractPDE, rows: ProblemRows, data, grid: Grid) -> None:
    """Trace `pde.residual` once (`jax.eval_shape`, no computation) on one expert's point
    arrays, so that bad data surfaces as a clear error at trace time:

    - an entry shaped like a field over only some grid axes (`(nx,)` on a `(nt, nx)` grid)
      that `residual` reads: it would broadcast against the point arrays wrongly, silently
      when the sizes happen to match (`ValueError` naming the entry and the shapes);
    - a residual that indexes a grid-shaped entry as a grid: since hcmoe 0.1.x such entries
      reach `residual` gathered at the points (`IndexError`, with a note saying so).
    """
    if not isinstance(data, Mapping):
        return
    owner = type(pde).__name__
    dtype = rows.coords[grid.names[0]].dtype if rows.coords else jnp.float64
    m = rows.index.shape[-1]
    point = jax.ShapeDtypeStruct((m,), dtype)
    values = {name: point for name in rows.names}
    coords = {name: point for name in grid.names}
    gathered = {
        name: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for name, v in rows.point_data.items()
    }

    def residual(values, coords, entries, gathered):
        merged = _ReadsChecked({**entries, **gathered}, owner, grid, gathered)
        return pde.residual(values, coords, merged)

    def spec(x):
        return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) if eqx.is_array(x) else x

    entries = jax.tree.map(spec, dict(data.items()))
    try:
        eqx.filter_eval_shape(residual, values, coords, entries, gathered)
    except IndexError as error:
        if gathered:
            error.add_note(
                f"hcmoe: data entries {sorted(gathered)} are grid-shaped, so {owner}.residual "
                f"receives them gathered at the sampled points (shape ({m},) per expert), not "
                "on the grid: read data[name] as a point array, like the operators' values "
                "(a change of hcmoe 0.1.x; see CHANGELOG.md, 'Migration')."
            )
        raise


def _point_data(data, grid: Grid, index):
    """Data entries that are fields on the grid (leading shape `grid.shape`), gathered at the
    expert's PDE points: `(K, m, ...)`. Other entries are passed to `residual` unchanged."""
    if not isinstance(data, Mapping):
        return {}
    gathered = {}
    for name, value in data.items():
        shape = getattr(value, "shape", None)
        if shape is not None and tuple(shape[: grid.ndim]) == grid.shape:
            flat = jnp.reshape(value, (grid.size,) + tuple(shape[grid.ndim :]))
            gathered[name] = flat[index]
    return gathered


class ProblemRows(eqx.Module):
    """Every expert's rows before any operator is evaluated (leading axis `K` on arrays).

    `requests()` lists `(operator, points)`: each PDE operator (`names`) at the sampled PDE
    points `index` `(K, m)`, then each least-squares condition's operator at its face points
    `faces[i]` `(K, c_i)`. The other fields are those of `ExpertProblem` without the operator
    values (`coords`, `pde_valid`, `cond_target`, `cond_scale`, `cond_valid`, `point_data`);
    with no conditions, one inert row (zero target and scale) keeps the shapes uniform.
    """

    names: tuple[str, ...] = eqx.field(static=True)
    operators: tuple
    index: Array
    faces: tuple
    coords: dict[str, Array]
    pde_valid: Array
    cond_target: Array
    cond_scale: Array
    cond_valid: Array
    point_data: dict[str, Array]

    def requests(self) -> list:
        pde = [(op, self.index) for op in self.operators[: len(self.names)]]
        return pde + list(zip(self.operators[len(self.names) :], self.faces))

    @property
    def points(self) -> Array:
        """Flat grid indices of the PDE rows, -1 in padding slots."""
        return jnp.where(self.pde_valid, self.index, -1)


def problem_rows(
    basis,
    pde: AbstractPDE,
    grid: Grid,
    data,
    partition: AbstractPartition,
    points_per_expert: int | None,
    key,
    *,
    condition_scope: str | None = None,
    balance: str = "mean",
    pooled: bool = False,
) -> tuple[ProblemRows, Array, Array | None]:
    """The ansatz (`T(B)`, `u_p`, both with the exact conditions built in, in the dtype of
    `basis`) and every expert's rows (`ProblemRows`): sampled PDE points, condition faces,
    their targets, scales and data, without evaluating any operator. `pooled`: the experts'
    rows are one problem (`Coupled`): with `balance="mean"` every condition row is scaled by
    the ratio of all experts' PDE points to all of that condition's rows."""
    dtype = basis.dtype
    transformed, particular, all_conditions = ansatz(pde, basis, grid, data)
    conditions = tuple(c for c in all_conditions if not c.exact)
    any_exact = len(conditions) < len(all_conditions)
    operators = pde.operators()
    if not operators:
        raise ValueError(f"{type(pde).__name__}.operators() returned no operators.")

    members = partition.members(grid)
    mask = residual_mask(pde, grid)
    pde_members = members if mask is None else members & mask[None]
    empty = np.flatnonzero(~pde_members.reshape(members.shape[0], -1).any(axis=1))
    if empty.size:
        raise ValueError(
            f"partition: experts {empty[:8].tolist()} own no point where "
            f"{type(pde).__name__} imposes the PDE (its residual_mask); use fewer blocks or "
            "another partition."
        )
    rows = ExpertRows.from_masks(pde_members)
    index, valid = _sample_rows(rows, points_per_expert, key)
    points = (
        rows.counts if points_per_expert is None else np.minimum(rows.counts, points_per_expert)
    )
    face_points, cond = _condition_rows(
        conditions,
        grid,
        members,
        condition_scope,
        points,
        dtype,
        balance,
        pde,
        warn=not any_exact,
        pooled=pooled,
    )
    num_experts = index.shape[0]
    if cond is None:  # no conditions: one inert row keeps the shapes uniform
        zeros = jnp.zeros((num_experts, 1), dtype)
        cond = (zeros, zeros, jnp.zeros((num_experts, 1), bool))
    names = tuple(operators)
    coords = {name: jnp.asarray(c.reshape(-1), dtype)[index] for name, c in grid.mesh().items()}
    problem = ProblemRows(
        names,
        tuple(operators[name] for name in names) + tuple(c.operator for c in conditions),
        index,
        tuple(jnp.asarray(f) for f in face_points),
        coords,
        valid,
        *cond,
        point_data=_point_data(data, grid, index),
    )
    return problem, transformed, particular


def evaluate_rows(
    rows: ProblemRows,
    transformed: Array,
    particular: Array | None,
    grid: Grid,
    whole: dict[int, Array] | None = None,
) -> ExpertProblem:
    """The `ExpertProblem` of `rows` (expert-stacked, or one expert's when `rows` has no
    leading `K` axis): every operator at every row in one pass (the PDE
    operators at the sampled points, the condition operators at their face points; one
    gather-and-contract scan for all local stencils, one FFT for the spectral ones; see
    `evaluate_at_points`). `whole`: `whole_grid_values` of `transformed` for these requests,
    if already computed (then only gathered)."""
    dtype = transformed.dtype
    requests = rows.requests()
    names = rows.names
    values = evaluate_at_points(requests, transformed, grid, whole)
    if particular is None:
        offset_values = [jnp.zeros(jnp.shape(points_), dtype) for _, points_ in requests]
    else:
        offset_values = evaluate_at_points(requests, particular, grid)
    lead, n = rows.index.shape[:-1], transformed.shape[-1]  # lead: (K,) or () for one expert
    if len(requests) > len(names):
        matrices = jnp.concatenate(values[len(names) :], axis=-2)
        cond_offsets = jnp.concatenate(offset_values[len(names) :], axis=-1)
    else:
        matrices = jnp.zeros(lead + (1, n), dtype)
        cond_offsets = jnp.zeros(lead + (1,), dtype)
    return ExpertProblem(
        dict(zip(names, values[: len(names)])),
        dict(zip(names, offset_values[: len(names)])),
        rows.coords,
        rows.pde_valid,
        matrices,
        cond_offsets,
        rows.cond_target,
        rows.cond_scale,
        rows.cond_valid,
        point_data=rows.point_data,
        points=rows.points,
    )


def build_problems(
    basis,
    pde: AbstractPDE,
    grid: Grid,
    data,
    partition: AbstractPartition,
    points_per_expert: int | None,
    key,
    *,
    condition_scope: str | None = None,
    balance: str = "mean",
) -> tuple[ExpertProblem, Array, Array | None]:
    """Evaluate the operators at every expert's sampled points (and the conditions' at their
    face points), gathering only the stencil neighbours of local operators
    (`AbstractOperator.at_points`; spectral operators share one FFT on the whole grid).

    Returns the expert-stacked problems (leading axis `K`), the transformed basis `T(B)` and
    the particular part `u_p` (or None), both with the exact conditions built in, all in the
    dtype of `basis`.
    """
    rows, transformed, particular = problem_rows(
        basis,
        pde,
        grid,
        data,
        partition,
        points_per_expert,
        key,
        condition_scope=condition_scope,
        balance=balance,
    )
    return evaluate_rows(rows, transformed, particular, grid), transformed, particular
