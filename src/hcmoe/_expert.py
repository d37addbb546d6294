"""One expert's least-squares problem: its rows, residual, Jacobian, Hessian and solve."""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int

from ._levenberg_marquardt import LevenbergMarquardt, WarmStart
from ._pde import AbstractPDE
from ._pdedata import PDEData
from ._results import RESULTS


class ExpertProblem(eqx.Module):
    """The rows of one expert's least-squares problem.

    For operator `j`, `L_j u = stacks[j] @ w + offsets[j]` at the expert's sampled PDE points
    (shape `(m, N)` and `(m,)`); `coords` are those points' coordinates; `pde_valid` masks the
    padding rows; `point_data` the data entries that are fields on the grid, gathered at those
    points (they replace the whole-grid entries in `data` for `pde.residual`); `points` the
    flat grid indices of the rows (-1: padding). Condition rows: `cond_matrix @ w +
    cond_offset - cond_target`, scaled by `cond_scale` (weight and balance, zero on padding);
    `cond_valid` marks real condition rows.
    """

    # `*experts`: the same type holds one expert's rows or the stack of all experts' rows.
    stacks: dict[str, Float[Array, "*experts m n"]]
    offsets: dict[str, Float[Array, "*experts m"]]
    coords: dict[str, Float[Array, "*experts m"]]
    pde_valid: Bool[Array, "*experts m"]
    cond_matrix: Float[Array, "*experts c n"]
    cond_offset: Float[Array, "*experts c"]
    cond_target: Float[Array, "*experts c"]
    cond_scale: Float[Array, "*experts c"]
    cond_valid: Bool[Array, "*experts c"]
    point_data: dict[str, Array]
    points: Int[Array, "*experts m"]


def _data_at_points(problem, data: Any) -> Any:
    if not problem.point_data:
        return data
    merged = dict(data)
    merged.update(problem.point_data)
    owner = getattr(data, "owner", None)
    return merged if owner is None else PDEData(merged, owner)  # keeps its missing-key error


def condition_residual(problem: ExpertProblem, w: Array) -> Array:
    """`L u - g` at the expert's condition rows, unweighted (`cond_matrix @ w + cond_offset -
    cond_target`)."""
    return problem.cond_matrix @ w + problem.cond_offset - problem.cond_target


def _values(problem: ExpertProblem, w: Array) -> dict[str, Array]:
    """`{j: A_j w + c_j}`, the operators' values at the PDE rows. (As matrix-vector products:
    `sum(A_j * w, -1)` measured 1.4x slower in the forward and 1.8x in forward + backward.)"""
    return {name: a @ w + problem.offsets[name] for name, a in problem.stacks.items()}


def _on_valid_rows(problem, rows: Array) -> Array:
    """`rows` (leading axis: the PDE rows) with the rows outside `problem.pde_valid` zeroed."""
    mask = problem.pde_valid.reshape(problem.pde_valid.shape + (1,) * (rows.ndim - 1))
    return jnp.where(mask, rows, 0.0)


def residual(
    w: Array,
    problem: ExpertProblem,
    pde: AbstractPDE,
    data: Any,
    ridge: float,
    center: Array | None = None,
):
    """`r(w) = [F(A_j w + c_j) on PDE rows ; condition rows ; ridge * (w - center)]` for one
    expert (`center` None: zero)."""
    return residual_rows(
        _values(problem, w),
        problem.cond_matrix @ w + problem.cond_offset,
        w,
        problem,
        pde,
        data,
        ridge,
        center,
    )


def residual_rows(
    values: dict[str, Array],
    cond_values: Array,
    w: Array,
    problem,
    pde: AbstractPDE,
    data: Any,
    ridge: float,
    center: Array | None = None,
):
    """`residual` from the operators' values at the PDE rows (`{j: L_j u}`) and at the
    condition rows (`L_c u`, concatenated), however they were computed. `problem` supplies
    the rows' `coords`, `pde_valid`, `point_data`, `cond_target` and `cond_scale` (an
    `ExpertProblem`, or any object with those fields)."""
    pde_rows = pde.residual(values, problem.coords, _data_at_points(problem, data))
    pde_rows = _on_valid_rows(problem, pde_rows).reshape(-1)
    cond_rows = problem.cond_scale * (cond_values - problem.cond_target)
    ridge_rows = ridge * (w if center is None else w - center)
    return jnp.concatenate([pde_rows.astype(w.dtype), cond_rows, ridge_rows])


def jacobian(w: Array, problem: ExpertProblem, pde: AbstractPDE, data: Any, ridge: float):
    """`d r / d w` at `w`, rows ordered as in `residual`, shape `(rows, n)`.

    Built from the stacks: column `i` is the linearised `F` applied to the `i`-th columns of
    every `A_j`, so forming it costs `O(m N)` per operator, where `jax.jacfwd(residual)` would
    multiply every stack by the `N x N` identity (`O(m N^2)` per operator).
    """
    values = _values(problem, w)
    data = _data_at_points(problem, data)
    _, pde_jvp = jax.linearize(lambda v: pde.residual(v, problem.coords, data), values)
    in_axes = ({name: 1 for name in values},)
    columns = jax.vmap(pde_jvp, in_axes=in_axes, out_axes=-1)(problem.stacks)  # (m, ..., n)
    pde_rows = _on_valid_rows(problem, columns).reshape(-1, w.shape[0]).astype(w.dtype)
    cond_rows = problem.cond_scale[:, None] * problem.cond_matrix
    ridge_rows = ridge * jnp.eye(w.shape[0], dtype=w.dtype)
    return jnp.concatenate([pde_rows, cond_rows, ridge_rows])


def hessian(w: Array, problem: ExpertProblem, pde: AbstractPDE, data: Any, ridge: float):
    """`∇²_w ½‖r(w)‖²` at `w`, `(n, n)`: the same matrix as `jax.hessian` of
    `½‖residual‖²` (the PDE's second-order terms included; the ridge's centre does not enter).

    Built from the stacks. With `E(v) = ½‖F(v)‖²` over the PDE rows, a function of the
    operators' values `v_j = A_j w + c_j`, the PDE part is `Σ_j A_jᵀ C_j`, where column `i`
    of `C_j` is the Hessian-vector product of `E` with the `i`-th columns of the stacks; the
    condition and ridge rows are linear in `w` and add their Gram matrices. The columns run
    on the leading axis of the transposed stacks, where `vmap` keeps its batch, so no
    `(m, n)` tangent is transposed on the way; `jax.hessian` pushes the `n x n` identity
    through every stack instead. Measured on the diffusion–sorption benchmark (10⁴ and 10⁵
    points, one process): 4% faster gradients with four batched experts, 1-2% slower with
    one, so `_experts` uses it for batched experts only.
    """
    values = _values(problem, w)
    data = _data_at_points(problem, data)

    def energy(v):
        rows = _on_valid_rows(problem, pde.residual(v, problem.coords, data)).astype(w.dtype)
        return 0.5 * jnp.sum(rows * rows)

    _, hvp = jax.linearize(jax.grad(energy), values)
    n = w.shape[0]
    stacks = {name: jnp.moveaxis(problem.stacks[name], -1, 0) for name in values}  # (n, m..)
    columns = jax.vmap(hvp)(stacks)
    pde_part = sum(
        jnp.reshape(stacks[name], (n, -1)) @ jnp.reshape(columns[name], (n, -1)).T
        for name in values
    )
    cond = problem.cond_scale[:, None] * problem.cond_matrix
    return pde_part + cond.T @ cond + ridge**2 * jnp.eye(n, dtype=w.dtype)


def _gauss_newton_start(w, problem, pde, data, ridge, center):
    """One undamped Gauss–Newton step from `w`, or `w` itself if the step does not help."""
    r = residual(w, problem, pde, data, ridge, center)
    jac = jacobian(w, problem, pde, data, ridge)
    gram = jac.T @ jac  # includes ridge^2 I from the ridge rows
    step = jax.scipy.linalg.solve(gram, r @ jac, assume_a="pos")
    candidate = w - step
    better = jnp.linalg.norm(
        residual(candidate, problem, pde, data, ridge, center)
    ) < jnp.linalg.norm(r)
    return jnp.where(better & jnp.all(jnp.isfinite(candidate)), candidate, w)


@functools.singledispatch
def _for_expert(solver, jacobian):
    """`solver`, ready for one expert's problem, whose dense Jacobian is `jacobian(w)`:
    hcmoe's `LevenbergMarquardt` forms its steps from it; other solvers take their own."""
    del jacobian
    return solver


@_for_expert.register
def _(solver: LevenbergMarquardt, jacobian):
    return solver.with_jacobian(jacobian)


@_for_expert.register
def _(solver: WarmStart, jacobian):
    return WarmStart(_for_expert(solver.solver, jacobian))


@functools.singledispatch
def _stationary(solver, state):
    """Whether a solve's end `state` is stationary, where `solver` can tell (hcmoe's
    `LevenbergMarquardt` holds the Gauss–Newton decrement); True for other solvers."""
    del solver, state
    return jnp.array(True)


@_stationary.register
def _(solver: LevenbergMarquardt, state):
    return solver.stationary(state)


@_stationary.register
def _(solver: WarmStart, state):
    return _stationary(solver.solver, state)


@functools.singledispatch
def _start(solver, init, problem, pde, data, ridge, center):
    """Where the nonlinear solve starts: `init`, or, for a `WarmStart` solver, one
    Gauss–Newton step off it (without gradient)."""
    del solver, problem, pde, data, ridge, center
    return init


@_start.register
def _(solver: WarmStart, init, problem, pde, data, ridge, center):
    stop = jax.lax.stop_gradient
    return _gauss_newton_start(
        stop(init), stop(problem), pde, stop(data), ridge, stop(center)
    )  # None stays None


def solve_expert(
    problem: ExpertProblem,
    init: Array,
    pde: AbstractPDE,
    data: Any,
    *,
    solver,
    max_steps: int,
    ridge: float,
    adjoint,
    ridge_toward: str = "zero",
):
    """Solve one expert's problem; returns `(w, num_steps, residual_norm, result, ok)`, with
    `result` an `hcmoe.RESULTS`.

    `ridge_toward`: `"zero"`, ridge rows `ridge * w`; `"init"`, `ridge * (w - init)` (see
    `hcmoe.Rows`).

    A linear PDE (`pde.linear`) is one least-squares solve by `solver` if it is a lineax
    solver (default `lx.QR()`: `lx.Normal(lx.Cholesky())` is 2-8x faster for m >> N but
    squares the condition number, which shows at the 1e-10 level), differentiated by lineax.
    Otherwise `solver` is an optimistix least-squares solver (see `_for_expert`, `_start`
    and `_stationary` for what hcmoe's own solvers add).
    """

    center = None if ridge_toward == "zero" else init

    def fn(w, _):
        return residual(w, problem, pde, data, ridge, center)

    if pde.linear:
        # r(w) = M w + r(0) exactly: one least-squares solve, differentiated by lineax.
        zeros = jnp.zeros_like(init)
        offset = fn(zeros, None)
        matrix = jacobian(zeros, problem, pde, data, ridge)
        linear_solver = solver if isinstance(solver, lx.AbstractLinearSolver) else lx.QR()
        sol = lx.linear_solve(
            lx.MatrixLinearOperator(matrix),
            -offset,
            solver=linear_solver,
            throw=False,
        )
        w = sol.value
        num_steps = jnp.array(0, dtype=jnp.int32)
        result = RESULTS.promote(sol.result)
    else:
        init = _start(solver, init, problem, pde, data, ridge, center)
        solver = _for_expert(
            solver, eqx.Partial(jacobian, problem=problem, pde=pde, data=data, ridge=ridge)
        )
        sol = optx.least_squares(
            fn, solver, init, max_steps=max_steps, adjoint=adjoint, throw=False
        )
        w = sol.value
        num_steps = jnp.asarray(sol.stats["num_steps"], dtype=jnp.int32)
        result = RESULTS.promote(sol.result)
        result = RESULTS.where(
            (result == RESULTS.successful) & ~_stationary(solver, sol.state),
            RESULTS.not_stationary,
            result,
        )
    norm = jnp.linalg.norm(fn(w, None))
    result = RESULTS.where(
        (result == RESULTS.successful) & ~jnp.isfinite(norm), RESULTS.nonfinite_residual, result
    )
    return w, num_steps, norm, result, result == RESULTS.successful
