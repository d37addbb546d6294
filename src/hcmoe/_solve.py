"""One expert's least-squares problem, its solve, and the results types."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int

from ._levenberg_marquardt import LevenbergMarquardt
from ._pde import AbstractPDE
from ._pdedata import PDEData


class SolveStats(eqx.Module):
    """Per-expert diagnostics of the constraint solve (each field has a leading `K` axis).

    - `num_steps`: solver iterations (0 for the direct linear solve).
    - `residual_norm`: `||r_k(w_k)||_2` at the returned weights (PDE, condition and ridge rows).
    - `converged`: the solver reported success, the residual is finite and, with hcmoe's
      default Levenberg–Marquardt, the returned weights are stationary: the Gauss–Newton
      model predicts no further decrease of `½‖r‖²` beyond `rtol` of it (plus `atol²`; see
      `hcmoe._levenberg_marquardt.gauss_newton_decrement`). The Cauchy test alone also
      passes where the trust region has collapsed and the last accepted step was tiny, far
      from a minimiser (measured: gradient 0.2 and a negative Hessian eigenvalue at an expert
      reported converged at rtol = atol = 1e-12). Gradients through an expert that did not
      converge are unreliable: the implicit adjoint assumes a stationary point
      (benchmarks/README.md shows a gradient norm changing 3-6x with the summation order at
      two capped experts).
    - `result`: the raw `optimistix.RESULTS` (or `lineax.RESULTS`) of each expert.
    - `condition_error`: the largest unweighted residual `|L u - g|` of the expert's own
      function over its least-squares condition rows (0 without any; exact conditions hold by
      construction and are not counted).
    - `points`: the flat grid indices (`numpy.unravel_index(points, grid.shape)`) of the PDE
      points each expert used, shape `(*batch, experts, m)`, `-1` in padding slots.
    """

    num_steps: Int[Array, "*batch experts"]
    residual_norm: Float[Array, "*batch experts"]
    converged: Bool[Array, "*batch experts"]
    result: Any
    condition_error: Float[Array, "*batch experts"] | None = None
    points: Int[Array, "*batch experts m"] | None = None

    @property
    def num_failed(self) -> Array:
        """Number of experts that did not converge."""
        return jnp.sum(~self.converged, axis=-1)


class Solution(eqx.Module):
    """The constrained prediction.

    - `u`: the prediction on the grid, `u = u_p + T(B) w_k` on expert `k`'s block,
      shape `grid.shape`, in the basis dtype.
    - `weights`: the basis weights of each expert, shape `(K, n_basis)`.
    - `stats`: a `SolveStats`.

    Batched calls add a leading batch axis to every field.
    """

    u: Array
    weights: Array
    stats: SolveStats


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


def residual(w: Array, problem: ExpertProblem, pde: AbstractPDE, data: Any, ridge: float,
             center: Array | None = None):
    """`r(w) = [F(A_j w + c_j) on PDE rows ; condition rows ; ridge * (w - center)]` for one
    expert (`center` None: zero)."""
    return residual_rows(_values(problem, w), problem.cond_matrix @ w + problem.cond_offset, w,
                         problem, pde, data, ridge, center)


def residual_rows(values: dict[str, Array], cond_values: Array, w: Array, problem,
                  pde: AbstractPDE, data: Any, ridge: float, center: Array | None = None):
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
    better = (jnp.linalg.norm(residual(candidate, problem, pde, data, ridge, center))
              < jnp.linalg.norm(r))
    return jnp.where(better & jnp.all(jnp.isfinite(candidate)), candidate, w)


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
    linear_solver: lx.AbstractLinearSolver | None = None,
    warm_start: bool = False,
    ridge_toward: str = "zero",
):
    """Solve one expert's problem; returns `(w, num_steps, residual_norm, result, ok)`.

    `ridge_toward`: `"zero"`, ridge rows `ridge * w`; `"init"`, `ridge * (w - init)` (see
    `hcmoe.solve`).

    `warm_start`: start the nonlinear solve from one Gauss–Newton step off `init` (kept only
    if it lowers the residual), computed without gradient: at a converged minimiser, and by
    the implicit function theorem its gradient, nothing depends on where the solve started
    (but see `hcmoe.solve`: the termination test can pass early after a warm start).

    `linear_solver` solves the linear PDEs' single least-squares problem (default `lx.QR()`:
    `lx.Normal(lx.Cholesky())` is 2-8x faster for m >> N but squares the condition number,
    which shows at the 1e-10 level). An `hcmoe` `LevenbergMarquardt` solver gets this expert's
    Jacobian (`jacobian`).
    """

    center = None if ridge_toward == "zero" else init

    def fn(w, _):
        return residual(w, problem, pde, data, ridge, center)

    if pde.linear:
        # r(w) = M w + r(0) exactly: one least-squares solve, differentiated by lineax.
        zeros = jnp.zeros_like(init)
        offset = fn(zeros, None)
        matrix = jacobian(zeros, problem, pde, data, ridge)
        sol = lx.linear_solve(
            lx.MatrixLinearOperator(matrix), -offset,
            solver=lx.QR() if linear_solver is None else linear_solver, throw=False,
        )
        w = sol.value
        num_steps = jnp.array(0, dtype=jnp.int32)
        ok = sol.result == lx.RESULTS.successful
        result = sol.result
    else:
        if warm_start:
            init = _gauss_newton_start(jax.lax.stop_gradient(init),
                                       jax.lax.stop_gradient(problem), pde,
                                       jax.lax.stop_gradient(data), ridge,
                                       jax.lax.stop_gradient(center))  # None stays None
        if isinstance(solver, LevenbergMarquardt):
            solver = solver.with_jacobian(
                eqx.Partial(jacobian, problem=problem, pde=pde, data=data, ridge=ridge)
            )
        sol = optx.least_squares(
            fn, solver, init, max_steps=max_steps, adjoint=adjoint, throw=False
        )
        w = sol.value
        num_steps = jnp.asarray(sol.stats["num_steps"], dtype=jnp.int32)
        ok = sol.result == optx.RESULTS.successful
        result = sol.result
        if isinstance(solver, LevenbergMarquardt):
            # Stationarity, from the decrement the descent already holds at the returned
            # weights (no extra pass over the rows).
            state = jax.lax.stop_gradient(sol.state.descent_state)
            tol = solver.rtol * state.objective + solver.atol**2
            ok = ok & (state.decrement <= tol)
    norm = jnp.linalg.norm(fn(w, None))
    return w, num_steps, norm, result, ok & jnp.isfinite(norm)
