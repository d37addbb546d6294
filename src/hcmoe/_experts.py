"""`hcmoe.solve`: operator stacks, per-expert problems, vmapped solves, assembly."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optimistix as optx
from jaxtyping import Array, Float, PRNGKeyArray

from ._adjoint import (
    _UNROLL_MAX,
    expert_fields,
    implicit_solve,
    per_expert_products,
    rows_from_fields,
)
from ._grid import Grid
from ._jaxlib_check import warn_if_hang_prone
from ._joint import COUPLINGS, joint_init, windowed_basis
from ._levenberg_marquardt import (
    LevenbergMarquardt,
    TrustRegion,
    check_initial_damping,
    check_termination,
)
from ._ops import evaluate_at_points, whole_grid_values
from ._partition import AbstractPartition, ExpertRows, as_partition
from ._pde import SCOPES, AbstractPDE, ansatz, residual_mask
from ._solve import (
    ExpertProblem,
    Solution,
    SolveStats,
    condition_residual,
    hessian as objective_hessian,
    residual,
    solve_expert,
)


_PRECISIONS = (None, "float64", "float32", "input")


def solve_dtype(precision: str | None, basis_dtype) -> jnp.dtype:
    """The dtype of the constraint solve (see `solve`'s `precision`)."""
    if precision not in _PRECISIONS:
        raise ValueError(
            f"precision: expected one of {_PRECISIONS}; got {precision!r}."
        )
    x64 = jax.config.jax_enable_x64
    if precision == "float64" and not x64:
        raise ValueError(
            "precision='float64' needs 64-bit JAX, which is off. Enable it at start-up with "
            "`jax.config.update('jax_enable_x64', True)` or the environment variable "
            "JAX_ENABLE_X64=1, or pass precision='float32' (less accurate constraints)."
        )
    if precision == "float32":
        return jnp.dtype(jnp.float32)
    if precision == "input":
        return jnp.dtype(basis_dtype)
    return jnp.dtype(jnp.float64 if x64 else jnp.float32)


def _check_basis(basis, grid: Grid):
    if not hasattr(basis, "shape") or not hasattr(basis, "dtype"):
        raise ValueError(f"basis: expected an array; got {type(basis).__name__}.")
    grid.check_field(basis, "basis", trailing=1)
    if not jnp.issubdtype(basis.dtype, jnp.floating):
        raise ValueError(f"basis: expected a floating-point array; got dtype {basis.dtype}.")


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
            low = jnp.min(jnp.where(equal, word, top), axis=1)
            high = jnp.max(jnp.where(equal, word, 0), axis=1)
        threshold = _bisect(enough, low, high)
        smaller, same = word < threshold[:, None], word == threshold[:, None]
        below = below | (smaller if equal is None else equal & smaller)
        equal = same if equal is None else equal & same
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

    last = _bisect(lambda last: jnp.sum(keep(last), axis=1) >= count,
                   jnp.where(excess, 0, end), jnp.full(excess.shape, end))
    return jax.vmap(lambda row: jnp.nonzero(row, size=count)[0])(keep(last))


def _condition_rows(conditions, grid, members, scope, points, dtype, balance, pde, warn=True):
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
        if balance == "mean":
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
        "condition_scope='global'), or exact=True for value conditions.",
        ConditionWarning,
        stacklevel=4,
    )


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
        return pde + list(zip(self.operators[len(self.names):], self.faces))

    @property
    def points(self) -> Array:
        """Flat grid indices of the PDE rows, -1 in padding slots."""
        return jnp.where(self.pde_valid, self.index, -1)


def problem_rows(
    basis, pde: AbstractPDE, grid: Grid, data, partition: AbstractPartition,
    points_per_expert: int | None, key, *, condition_scope: str | None = None,
    balance: str = "mean",
) -> tuple[ProblemRows, Array, Array | None]:
    """The ansatz (`T(B)`, `u_p`, both with the exact conditions built in, in the dtype of
    `basis`) and every expert's rows (`ProblemRows`): sampled PDE points, condition faces,
    their targets, scales and data, without evaluating any operator."""
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
    points = rows.counts if points_per_expert is None else np.minimum(rows.counts,
                                                                      points_per_expert)
    face_points, cond = _condition_rows(conditions, grid, members, condition_scope, points,
                                        dtype, balance, pde, warn=not any_exact)
    num_experts = index.shape[0]
    if cond is None:  # no conditions: one inert row keeps the shapes uniform
        zeros = jnp.zeros((num_experts, 1), dtype)
        cond = (zeros, zeros, jnp.zeros((num_experts, 1), bool))
    names = tuple(operators)
    coords = {name: jnp.asarray(c.reshape(-1), dtype)[index] for name, c in grid.mesh().items()}
    problem = ProblemRows(
        names, tuple(operators[name] for name in names) + tuple(c.operator for c in conditions),
        index, tuple(jnp.asarray(f) for f in face_points), coords, valid, *cond,
        point_data=_point_data(data, grid, index),
    )
    return problem, transformed, particular


def evaluate_rows(rows: ProblemRows, transformed: Array, particular: Array | None,
                  grid: Grid, whole: dict[int, Array] | None = None) -> ExpertProblem:
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
        matrices = jnp.concatenate(values[len(names):], axis=-2)
        cond_offsets = jnp.concatenate(offset_values[len(names):], axis=-1)
    else:
        matrices = jnp.zeros(lead + (1, n), dtype)
        cond_offsets = jnp.zeros(lead + (1,), dtype)
    return ExpertProblem(
        dict(zip(names, values[: len(names)])), dict(zip(names, offset_values[: len(names)])),
        rows.coords, rows.pde_valid, matrices, cond_offsets, rows.cond_target, rows.cond_scale,
        rows.cond_valid, point_data=rows.point_data, points=rows.points,
    )


def build_problems(
    basis, pde: AbstractPDE, grid: Grid, data, partition: AbstractPartition,
    points_per_expert: int | None, key, *, condition_scope: str | None = None,
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
        basis, pde, grid, data, partition, points_per_expert, key,
        condition_scope=condition_scope, balance=balance,
    )
    return evaluate_rows(rows, transformed, particular, grid), transformed, particular


def solve(
    basis: Float[Array, "*grid n_basis"],
    pde: AbstractPDE,
    partition: AbstractPartition | np.ndarray | None,
    grid: Grid,
    data: Any = None,
    *,
    key: PRNGKeyArray | None = None,
    solver: optx.AbstractLeastSquaresSolver | None = None,
    max_steps: int = 50,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    points_per_expert: int | None = None,
    ridge: float = 1e-4,
    init: Array | None = None,
    adjoint: optx.AbstractAdjoint | None = None,
    linear_solver: lx.AbstractLinearSolver | None = None,
    precision: str | None = None,
    throw: bool = False,
    mesh=None,
    condition_scope: str | None = None,
    balance: str = "mean",
    warm_start: bool = False,
    coupling: str = "independent",
    schedule: str = "auto",
    ridge_toward: str = "zero",
    initial_damping: float | None = None,
    termination: str | None = None,
) -> Solution:
    r"""Make the basis combination satisfy the PDE, independently on every expert's block.

    For each expert `k` this solves

    $$w_k = \arg\min_w \|F(A_{k,1} w + c_{k,1}, \dots) \|^2 + \|\text{conditions}\|^2
    + \|\text{ridge}\, w\|^2$$

    where `A_{k,j}` are the rows of `L_j T(B)` at the expert's (sampled) points, and returns
    `u = u_p + T(B) w_k` on block `k` (blended, `u = u_p + sum_k phi_k T(B) w_k`, for a
    `Partition(..., overlap=...)`). Conditions with `exact=True` are part of the ansatz
    `u_p + T(B) w` (see `hcmoe.Condition`); the others are rows. Gradients with respect to
    `basis` (and `data`, PDE parameters, ...) flow through the solve by the implicit function
    theorem, in forward and reverse mode (`hcmoe._adjoint`: taken through each expert's field,
    so the gradient never holds the `points x n_basis` operator stacks), or through `lineax`'s
    differentiable solve when `pde.linear`.

    **Arguments:**

    - `basis`: the backbone's basis functions, shape `(*grid.shape, n_basis)`.
    - `pde`: an `hcmoe.AbstractPDE`.
    - `partition`: `hcmoe.Partition(...)`, an integer label array of `grid.shape`, or None for
      a single expert (PI-HC).
    - `grid`: the `hcmoe.Grid` the basis lives on.
    - `data`: per-sample data for the PDE's residual and conditions (e.g. `{"u0": ...}`).
    - `key`: PRNG key, needed when `points_per_expert` samples points.
    - `solver`: any optimistix least-squares solver; default Levenberg–Marquardt with the
      steps of `optimistix.LevenbergMarquardt(rtol, atol)` solved from the normal equations
      (`J^T J + λ I`, Cholesky, Gram matrix formed once per accepted iterate from the
      operator stacks) in float64, and `optimistix.LevenbergMarquardt(rtol, atol)` (QR) in
      float32. Unused when `pde.linear`.
    - `initial_damping`: `λ` of the default float64 solver's first step (default None:
      1e-6, nearly a Gauss–Newton step; optimistix's is 1). Rejected steps are cheap here (a
      residual and a Cholesky of `N x N`, no new Jacobian), so a small start costs little
      where the problem is far from linear and saves the iterations that shrink `λ` 3.5x per
      step from 1 (measured in benchmarks/README.md, section 8). Only with the default
      solver.
    - `termination`: when the default float64 solver stops (default None: `"objective"`).
      `"objective"`: at optimistix's Cauchy test or as soon as `½‖r‖²` has converged (the
      last accepted step and the Gauss–Newton decrement both within `rtol` of it, plus
      `atol²`), whichever comes first; `"cauchy"`: at optimistix's test alone (the paper's
      release: weights and residuals changed by less than `atol + rtol` times their size).
      The expert problems are ill-conditioned (the ridge is the only curvature in directions
      the rows cannot see), and there the Cauchy test waits for weights that no longer change
      the objective: measured, 3x fewer iterations with `"objective"` on trained
      diffusion–sorption bases at the same test error (benchmarks/README.md, section 11).
      `u` keeps whatever component those directions have where the solve stopped. Only with
      the default solver; the float32 one (optimistix's) has the Cauchy test only.
    - `max_steps`: iteration cap of the nonlinear solve (paper: 50).
    - `rtol`, `atol`: tolerances of the default solver (paper: 1e-4).
    - `points_per_expert`: PDE points sampled per expert (paper: 20,000); None uses every
      point. An expert owning fewer points uses all it has (the request is clipped).
      Condition points are always all used.
    - `ridge`: weight of the `ridge * w` rows (paper: 1e-4); keeps the problem well posed.
    - `ridge_toward`: `"zero"` (default, the paper): ridge rows `ridge * w`, so directions
      the PDE and condition rows do not determine go to `w = 0`; `"init"`: `ridge * (w -
      init)`, so they keep `init` (default ones: the unconstrained sum of the basis, which is
      PI-SC's prediction). Only the weakly determined directions differ.
    - `init`: initial weights, shape `(n_basis,)` or `(K, n_basis)`; default ones (paper).
    - `adjoint`: None (default): hcmoe's implicit adjoint for nonlinear PDEs, the same
      equation as `optimistix.ImplicitAdjoint` (the exact Hessian of each expert's objective
      at its solution, LU) with its right-hand side, the tangent of the objective's gradient,
      taken through the expert's field `T(B) w + u_p`. Its cotangent of the basis is a few
      outer products of fields with `w`, where optimistix's goes through the
      `points x n_basis` stacks of every operator (gradient memory at the paper size, four
      experts: 115 -> 84 MiB; benchmarks/README.md, section 9). Gradients agree to rounding
      (tests/test_adjoint.py). Otherwise an optimistix adjoint, used as given (with a
      `linear_solver`, the default becomes `ImplicitAdjoint(linear_solver)`).
    - `linear_solver`: lineax solver of optimistix's implicit adjoint (default
      `lineax.AutoLinearSolver(well_posed=None)`; passing one selects that adjoint), and of
      the single least-squares solve when `pde.linear` (a tall system; default `lineax.QR()`;
      `lineax.Normal(lineax.Cholesky())` is 2-8x faster when points >> n_basis, at the cost
      of squaring the condition number).
    - `precision`: dtype of the solve. None (default): float64 when x64 is on, else float32;
      `"float64"`: float64, an error if x64 is off; `"float32"`; `"input"`: the basis dtype.
      The solution is cast back to the basis dtype.
    - `throw`: raise (via `equinox.error_if`, under jit too) when an expert does not converge.
      By default failures are only reported in `Solution.stats`.
    - `mesh`: a `jax.sharding.Mesh` with an `"experts"` axis to shard the experts over
      devices (see `hcmoe.expert_mesh`); None runs on the default device.
    - `condition_scope`: None (each condition's own `scope`), `"owned"` or `"global"` for
      all of them (see `hcmoe.Condition`).
    - `balance`: `"mean"` (default): each expert minimises its number of PDE rows times
      `mean(F^2) + sum_c weight_c^2 mean_c(cond_c^2)`, the functional `hcmoe.losses`
      measure, so a condition's weight means the same in the solve and in the loss whatever
      the numbers of rows; `"sum"`: plain sums of squared rows (the paper's release).
    - `warm_start`: start LM from one Gauss–Newton step off `init` (kept only where it lowers
      the residual); meant to reach the same minimiser in fewer iterations when the learned
      weights are far from `init`. **Caution:** LM then starts with damping 1, and where the
      objective is very flat (ill-conditioned stacks) that first damped step can be small
      enough to pass the termination test far from the minimiser: measured on the random
      diffusion–sorption benchmark basis, 2 steps, `u` 0.04-0.08 off a tight solve, reported
      as converged (benchmarks/README.md). Compare against a cold start before relying on it.
    - `coupling`: `"independent"` (default, the paper): each expert solves its own problem.
      `"joint"`: the weights of all experts minimise the residual of the blended field
      `u = u_p + sum_k T(phi_k B) w_k` together (PI-HC on the windowed basis
      `[phi_1 B, ..., phi_K B]`, with `K * points_per_expert` PDE points drawn over the
      whole domain); one `K n_basis`-unknown solve, on one device (no `mesh`). `stats` then
      describe that one solve (leading axis 1). See `hcmoe._joint`.
    - `schedule`: how the experts' solves run on one device. `"vmap"`: batched, one loop for
      all of them, which iterates until the slowest expert stops (every expert pays for the
      slowest); `"map"`: one after the other (`jax.lax.map`), each stopping at its own
      iteration count; `"auto"` (default): `"map"` for a nonlinear PDE on CPU when one
      expert's problem is large (sampled PDE rows x basis functions >= `MAP_MIN_WORK`,
      65,536), else `"vmap"` (a linear PDE has no iterations to wait on; a small problem
      pays more for the sequential loop than it saves; measured: `benchmarks/README.md`,
      "Schedules"). Results agree to rounding. With a
      `mesh` the experts are sharded over devices (vmapped within each) and `schedule` is
      not used.

    **Returns:** a `Solution` with `u`, `weights` (`(K, n_basis)`) and `stats`.

    **Raises:** `ValueError` at trace time for a basis whose shape does not match the grid, an
    unknown partition axis, more experts than points, missing data, or float64 without x64.
    At run time (`equinox.error_if`) for a non-finite basis, and with `throw=True` for a
    non-converged expert.

    **Warns:** `hcmoe.JaxlibHangWarning`, once per process, on CPU with a jaxlib whose batched
    linear algebra can hang (0.10.0-0.11.0; see `hcmoe._jaxlib_check`).
    """
    warn_if_hang_prone()
    _check_basis(basis, grid)
    partition = as_partition(partition)
    dtype = solve_dtype(precision, basis.dtype)
    out_dtype = basis.dtype
    if condition_scope not in (None, *SCOPES):
        raise ValueError(
            f"condition_scope: expected None, 'owned' or 'global'; got {condition_scope!r}."
        )
    if balance not in ("mean", "sum"):
        raise ValueError(f"balance: expected 'mean' or 'sum'; got {balance!r}.")
    labels = partition.labels(grid)
    num_experts = int(labels.max()) + 1
    if points_per_expert is not None and (
        not isinstance(points_per_expert, (int, np.integer)) or points_per_expert < 1
    ):
        raise ValueError(
            f"points_per_expert: expected a positive int or None; got {points_per_expert!r}."
        )
    resolve_schedule(schedule, pde.linear)  # an unknown name fails here, before any work
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling: expected one of {COUPLINGS}; got {coupling!r}.")
    _check_default_solver_option("initial_damping", initial_damping, check_initial_damping,
                                 solver)
    _check_default_solver_option("termination", termination, check_termination, solver)
    if ridge_toward not in RIDGE_TOWARD:
        raise ValueError(
            f"ridge_toward: expected one of {RIDGE_TOWARD}; got {ridge_toward!r}."
        )
    if coupling == "joint" and num_experts > 1:
        if mesh is not None:
            raise ValueError(
                "mesh: coupling='joint' is one solve for the weights of every expert and runs "
                "on one device; pass mesh=None, or coupling='independent' to shard the experts."
            )
        joint = solve(
            windowed_basis(basis, partition, grid), pde, None, grid, data, key=key,
            solver=solver, max_steps=max_steps, rtol=rtol, atol=atol,
            points_per_expert=None if points_per_expert is None
            else num_experts * int(points_per_expert),
            ridge=ridge, init=joint_init(init, num_experts, basis.shape[-1]), adjoint=adjoint,
            linear_solver=linear_solver, precision=precision, throw=throw,
            condition_scope=condition_scope, balance=balance, warm_start=warm_start,
            ridge_toward=ridge_toward, initial_damping=initial_damping, termination=termination,
        )
        # The inner solve checks and casts the basis and returns in its dtype.
        return Solution(joint.u, joint.weights.reshape(num_experts, -1), joint.stats)
    # Checked on the (small) weights, which `u` is assembled from, rather than on the basis:
    # `error_if` on the basis holds a grid-sized copy of it (its conditional's output) through
    # the solve (measured: 19 MiB of a 59 MiB forward peak at 101 x 1024 x 16).
    finite_basis = jnp.all(jnp.isfinite(basis))
    basis = basis.astype(dtype)
    rows, transformed, particular = problem_rows(
        basis, pde, grid, data, partition, points_per_expert, key,
        condition_scope=condition_scope, balance=balance,
    )
    n = basis.shape[-1]
    schedule = resolve_schedule(schedule, pde.linear, work=rows.pde_valid.shape[-1] * n)
    init = _initial_weights(init, num_experts, n, dtype)
    if solver is None:
        solver = default_solver(rtol, atol, dtype, initial_damping, termination)
    # hcmoe's own implicit adjoint (`_adjoint`: the same equation as optimistix's, without
    # the operator stacks' cotangents) unless the user chose an adjoint or its linear solver;
    # linear PDEs keep lineax's differentiable least-squares solve.
    field_adjoint = adjoint is None and linear_solver is None and not pde.linear
    if adjoint is None:
        adjoint = optx.ImplicitAdjoint(
            linear_solver if linear_solver is not None else lx.AutoLinearSolver(well_posed=None)
        )
    run = functools.partial(
        _run_experts, grid=grid, mesh=mesh, schedule=schedule, max_steps=max_steps,
        ridge=ridge, adjoint=adjoint, linear_solver=linear_solver, warm_start=warm_start,
        ridge_toward=ridge_toward,
    )
    args = dict(transformed=transformed, particular=particular, rows=rows, init=init, pde=pde,
                data=data, solver=solver)
    if field_adjoint:
        weights, steps, result, ok = implicit_solve(args, run, grid=grid, ridge=ridge,
                                                    ridge_toward=ridge_toward)
    else:
        weights, steps, result, ok = run(args)
    weights = eqx.error_if(
        weights,
        ~finite_basis,
        "hcmoe.solve: the basis contains NaN or inf; the backbone diverged or its input is "
        "not finite.",
    )
    # Diagnostics from the operators applied to each expert's field `T w_k + u_p`, so that
    # they differentiate like `u`, without the stacks.
    centers = init if ridge_toward == "init" else None
    fields = expert_fields(weights, transformed, particular,
                           per_expert_products(rows, grid))
    rows_r, cond_rows = rows_from_fields(fields, weights, rows, pde, data, grid, ridge, centers)
    norms = jnp.linalg.norm(rows_r, axis=-1)
    cond_error = jnp.max(jnp.where(rows.cond_valid, jnp.abs(cond_rows), 0.0), axis=-1)
    ok = ok & jnp.isfinite(norms)
    u = assemble_from_fields(fields, labels, partition.blend(grid))
    if throw:
        u = eqx.error_if(
            u,
            ~jnp.all(ok),
            "hcmoe.solve: at least one expert's constraint solve did not converge (see "
            "Solution.stats with throw=False). Try more max_steps, looser rtol/atol, a larger "
            "ridge, or precision='float64'.",
        )
    stats = SolveStats(
        steps, norms.astype(out_dtype), ok, result, cond_error.astype(out_dtype), rows.points,
    )
    return Solution(u.astype(out_dtype), weights.astype(out_dtype), stats)


def _run_experts(a, hessian: bool = False, *, grid, mesh, schedule, max_steps, ridge, adjoint,
                 linear_solver, warm_start, ridge_toward):
    """Every expert's solve on its schedule: `(weights, steps, result, ok)`, leading axis `K`,
    from `a`'s `rows`, `transformed`, `particular`, `init`, `pde`, `data` and `solver`.
    `hessian=True` also returns each expert's Hessian of `½‖r‖²` at its solution
    (`(K, N, N)`, for `_adjoint`).

    Without a mesh each expert's operator stacks are evaluated inside its own solve (one
    expert's rows live at a time under `schedule="map"`), gathering the Fourier multipliers'
    rows from their whole-grid results, computed once for all experts; with a mesh, all
    experts' stacks are built first and sharded (`sharded_expert_map`)."""
    pde, data, rows = a["pde"], a["data"], a["rows"]
    transformed, particular = a["transformed"], a["particular"]
    batched = rows.index.shape[0] > 1 and (mesh is not None or schedule != "map")

    def one(problem, w0):
        if isinstance(problem, ProblemRows):
            problem = evaluate_rows(dataclasses.replace(problem, operators=rows.operators),
                                    transformed, particular, grid, whole)
        w, steps, _, result, ok = solve_expert(
            problem, w0, pde, data, solver=a["solver"], max_steps=max_steps, ridge=ridge,
            adjoint=adjoint, linear_solver=linear_solver, warm_start=warm_start,
            ridge_toward=ridge_toward,
        )
        if not hessian:
            return w, steps, result, ok
        center = w0 if ridge_toward == "init" else None
        return w, steps, result, ok, _objective_hessian(w, problem, pde, data, ridge, center,
                                                        batched)

    if mesh is not None:
        from ._sharding import sharded_expert_map

        problems = evaluate_rows(rows, transformed, particular, grid)
        return sharded_expert_map(one, mesh, problems, a["init"])
    # Fourier multipliers act on the whole basis: applied once here (one FFT), and each
    # expert's solve gathers its rows from the results.
    whole = whole_grid_values(rows.requests(), transformed, grid)
    # The operators (modules, possibly holding arrays) are shared, not mapped over.
    per_expert = dataclasses.replace(rows, operators=())
    if schedule == "map":
        return jax.lax.map(lambda args: one(*args), (per_expert, a["init"]))
    return jax.vmap(one)(per_expert, a["init"])


def _objective_hessian(w, problem, pde, data, ridge, center, batched: bool):
    """Each expert's Hessian of `½‖r‖²` at its solution, for `_adjoint`: from the stacks
    (`_solve.hessian`) when the experts run batched, else `jax.hessian` (the faster of the
    two for one expert at a time; both measured in `_solve.hessian`)."""
    if batched:
        return objective_hessian(w, problem, pde, data, ridge)

    def objective(v):
        r = residual(v, problem, pde, data, ridge, center)
        return 0.5 * jnp.sum(r * r)

    return jax.hessian(objective)(w)


SCHEDULES = ("auto", "vmap", "map")
RIDGE_TOWARD = ("zero", "init")


# `schedule="auto"` on CPU runs experts one after the other only when one expert's problem
# (sampled PDE rows x basis functions) is at least this large. Measured on a 2-core CPU with
# the objective stopping rule (benchmarks/README.md, "Schedules"; every expert 3 LM steps):
# the batched loop was faster at 400 x 8 and 400 x 16 (3.2k, 6.4k: 1.4-1.7x) and 5000 x 8
# (40k: 1.15-1.24x), even at 2500 x 16 (40k), and the sequential one at 5000 x 16 (80k: the
# gradient 1.35x), 20000 x 16 and 25000 x 16 (320k, 400k: 1.2-1.5x; smaller working sets).
MAP_MIN_WORK = 65_536


def _check_default_solver_option(name: str, value, check, solver) -> None:
    """`check(value)` for an option of the default solver (None: unset), and a clear error
    when a `solver` is given as well."""
    if value is None:
        return
    check(value)
    if solver is not None:
        raise ValueError(
            f"{name}: {value!r} applies to the default solver only; got a solver "
            f"({type(solver).__name__}) as well. Set it on that solver instead (e.g. "
            f"hcmoe.LevenbergMarquardt(rtol, atol, {name}=...))."
        )


def resolve_schedule(schedule: str, linear: bool = False, work: int | None = None) -> str:
    """`"vmap"` or `"map"` for a `schedule` option. `"auto"`: sequential for nonlinear PDEs
    on CPU whose per-expert problem (`work` = sampled PDE rows x basis functions) is at least
    `MAP_MIN_WORK` (a batched loop runs every expert to the slowest one's iteration count,
    and a large problem gains little from batching on a CPU; a small one pays more for the
    sequential loop than it saves), batched otherwise (a linear PDE is one solve per expert,
    with no loop to wait on; an accelerator runs a batch of experts in about the time of
    one). `work=None` (not known yet) counts as large."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}; got {schedule!r}.")
    if schedule == "auto":
        large = work is None or work >= MAP_MIN_WORK
        return "map" if jax.default_backend() == "cpu" and not linear and large else "vmap"
    return schedule


def condition_error(problem: ExpertProblem, w: Array) -> Array:
    """Largest unweighted condition residual `|L u - g|` over an expert's condition rows."""
    rows = condition_residual(problem, w)
    return jnp.max(jnp.where(problem.cond_valid, jnp.abs(rows), 0.0))


def default_solver(rtol: float, atol: float, dtype, initial_damping: float | None = None,
                   termination: str | None = None) -> optx.AbstractLeastSquaresSolver:
    """Normal-equation Levenberg–Marquardt in float64 (m >> N); optimistix's QR-based one in
    lower precision, where squaring the condition number costs too much accuracy (it starts
    from `λ = 1` and stops at the Cauchy test; another `initial_damping` or `termination`
    raises)."""
    if jnp.dtype(dtype) == jnp.float64:
        return LevenbergMarquardt(rtol=rtol, atol=atol, initial_damping=initial_damping,
                                  termination="objective" if termination is None else termination)
    if initial_damping is not None:
        raise ValueError(
            f"initial_damping: {initial_damping!r} needs the float64 solver; the float32 one "
            "(optimistix's QR) starts from λ = 1. Use precision='float64' or leave it None."
        )
    if termination not in (None, "cauchy"):
        raise ValueError(
            f"termination: {termination!r} needs the float64 solver; the float32 one "
            "(optimistix's QR) stops at the Cauchy test only. Use precision='float64', or "
            "termination=None or 'cauchy'."
        )
    # optimistix's solver with hcmoe's trust region from λ = 1 (its own), whose step size
    # keeps the weights' dtype: optimistix's is float64 under x64, and its QR descent then
    # fails on float32 weights ("Vector and operator structures do not match").
    return eqx.tree_at(lambda s: s.search, optx.LevenbergMarquardt(rtol=rtol, atol=atol),
                       TrustRegion(initial_damping=1.0))


def _initial_weights(init, num_experts: int, n: int, dtype) -> Array:
    if init is None:
        return jnp.ones((num_experts, n), dtype)
    init = jnp.asarray(init, dtype)
    if init.shape == (n,):
        return jnp.broadcast_to(init, (num_experts, n))
    if init.shape != (num_experts, n):
        raise ValueError(
            f"init: expected shape ({n},) or ({num_experts}, {n}) (n_basis or experts x "
            f"n_basis); got {init.shape}."
        )
    return init


def assemble_from_fields(fields: Array, labels, blend=None) -> Array:
    """`u` from the experts' fields `T w_k + u_p` (`(*grid, K)`): `fields[x, labels[x]]`, or
    with a partition of unity `blend` (`(K, *grid.shape)`), `sum_k blend_k * fields_k`.

    Taken per expert with `where` for few experts, so that its transpose (the cotangent of
    each field) is elementwise and fuses with the products' transposes (`_adjoint`). `solve`
    computes the fields for its diagnostics anyway, so `u` costs no pass over the basis of
    its own (measured at 10⁴ points, 101 x 1024 x 16, one process: the gradient of a
    one-expert solve 1.05x faster than with `assemble`, four experts unchanged).
    `partition.blend` sums to one, so the blended form equals `assemble`'s to rounding."""
    if blend is not None:
        return jnp.sum(fields * jnp.moveaxis(jnp.asarray(blend, fields.dtype), 0, -1), axis=-1)
    num = fields.shape[-1]
    labels = jnp.asarray(labels)
    if num > _UNROLL_MAX:
        return jnp.take_along_axis(fields, labels[..., None], axis=-1)[..., 0]
    u = fields[..., 0]
    for k in range(1, num):
        u = jnp.where(labels == k, fields[..., k], u)
    return u


def assemble(
    transformed: Array, particular: Array | None, weights: Array, labels, blend=None
) -> Array:
    """`u = u_p + sum_i T(B)_i * W[labels]_i` on the grid; with a partition of unity `blend`
    (`(K, *grid.shape)`), `u = u_p + sum_k blend_k * (T(B) @ W_k)`.

    The reference form; `solve` takes `u` from the experts' fields
    (`assemble_from_fields`)."""
    if blend is None:
        per_point = weights[jnp.asarray(labels)]
        u = jnp.sum(transformed * per_point, axis=-1)
    else:
        u = assemble_from_fields(transformed @ weights.T, labels, blend)  # fields (*grid, K)
    return u if particular is None else u + particular
