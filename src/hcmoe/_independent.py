"""The `Independent` coupling's solve: every expert's own least-squares problem, its implicit
gradient, the diagnostics and the assembled prediction."""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Float, PRNGKeyArray

from ._adjoint import (
    expert_fields,
    implicit_solve,
    per_expert_products,
    rows_from_fields,
)
from ._execution import _run_experts, assemble_from_fields, resolve_schedule
from ._grid import Grid
from ._levenberg_marquardt import LevenbergMarquardt, TrustRegion
from ._partition import AbstractPartition
from ._pde import AbstractPDE
from ._results import RESULTS, Solution, SolveStats
from ._rows import Rows, check_residual_data, nonfinite_data_entries, problem_rows


def _checked(x: Array, checks) -> Array:
    """`x`, raising (`equinox.error_if`, under jit too) the message of the first `(bad,
    message)` whose scalar predicate `bad` holds.

    The checks hang on a zero scalar added to `x` rather than on `x` itself: `error_if`
    routes its operand through a conditional placed on one device, so on a mesh the sharded
    `(K, n_basis)` weights came back unsharded and XLA warned "Involuntary full
    rematerialization" at every compile (and a grid-sized operand holds a copy of itself);
    a scalar costs neither. `x + 0` is `x` (bit for bit, but for the sign of a zero)."""
    flag = jnp.zeros((), x.dtype)
    for bad, message in checks:
        flag = eqx.error_if(flag, bad, message)
    return x + flag


def checked_inputs(x: Array, finite_basis, bad_data) -> Array:
    """`x` (the solved weights), raising if the basis was not finite (`finite_basis`) or a
    data entry was not (`bad_data`: `nonfinite_data_entries(data)`); see `_checked`."""
    return _checked(
        x,
        [
            (
                ~finite_basis,
                "hcmoe.solve: the basis contains NaN or inf; the backbone diverged "
                "or its input is not finite.",
            ),
            *(
                (
                    ~finite,
                    f"hcmoe.solve: data[{name!r}] contains NaN or inf; the PDE's residual "
                    "and conditions need finite data.",
                )
                for name, finite in bad_data
            ),
        ],
    )


def solve_independent(
    basis: Float[Array, "*grid n_basis"],
    pde: AbstractPDE,
    partition: AbstractPartition,
    grid: Grid,
    data: Any,
    *,
    key: PRNGKeyArray | None,
    init: Array | None,
    solver,
    rows: Rows,
    adjoint: optx.AbstractAdjoint | None,
    max_steps: int,
    dtype,
    throw: bool,
    schedule: str = "auto",
    mesh=None,
) -> Solution:
    r"""Every expert's own least-squares solve (the `Independent` coupling; `hcmoe.solve`
    documents the arguments), in `dtype`, with the result cast back to the basis dtype.

    For each expert `k` this solves

    $$w_k = \arg\min_w \|F(A_{k,1} w + c_{k,1}, \dots) \|^2 + \|\text{conditions}\|^2
    + \|\text{ridge}\, w\|^2$$

    where `A_{k,j}` are the rows of `L_j T(B)` at the expert's (sampled) points, and returns
    `u = u_p + T(B) w_k` on block `k` (blended, `u = u_p + sum_k phi_k T(B) w_k`, for a
    `Partition(..., overlap=...)`). With `adjoint=None` gradients are hcmoe's implicit
    adjoint through each expert's field (`_adjoint`) for nonlinear PDEs, lineax's
    differentiable least-squares solve for linear ones; otherwise the optimistix `adjoint`.
    `schedule` and `mesh` are the `Independent` coupling's (`resolve_schedule`,
    `_sharding.sharded_expert_map`).
    """
    out_dtype = basis.dtype
    labels = partition.labels(grid)
    num_experts = int(labels.max()) + 1
    points_per_expert, ridge, ridge_toward = rows.points_per_expert, rows.ridge, rows.ridge_toward
    # Checked on the (small) weights, which `u` is assembled from, rather than on the basis:
    # `error_if` on the basis holds a grid-sized copy of it (its conditional's output) through
    # the solve (measured: 19 MiB of a 59 MiB forward peak at 101 x 1024 x 16).
    finite_basis = jnp.all(jnp.isfinite(basis))
    bad_data = nonfinite_data_entries(data)
    basis = basis.astype(dtype)
    problem, transformed, particular = problem_rows(
        basis,
        pde,
        grid,
        data,
        partition,
        points_per_expert,
        key,
        condition_scope=rows.condition_scope,
        balance=rows.balance,
    )
    check_residual_data(pde, problem, data, grid)
    n = basis.shape[-1]
    schedule = resolve_schedule(schedule, pde.linear, work=problem.pde_valid.shape[-1] * n)
    init = _initial_weights(init, num_experts, n, dtype)
    if solver is None:
        solver = default_solver(dtype)
    # hcmoe's own implicit adjoint (`_adjoint`: the same equation as optimistix's, without
    # the operator stacks' cotangents) unless the user chose an adjoint; linear PDEs keep
    # lineax's differentiable least-squares solve.
    field_adjoint = adjoint is None and not pde.linear
    if adjoint is None:
        adjoint = optx.ImplicitAdjoint(lx.AutoLinearSolver(well_posed=None))
    run = functools.partial(
        _run_experts,
        grid=grid,
        mesh=mesh,
        schedule=schedule,
        max_steps=max_steps,
        ridge=ridge,
        adjoint=adjoint,
        ridge_toward=ridge_toward,
    )
    args = dict(
        transformed=transformed,
        particular=particular,
        rows=problem,
        init=init,
        pde=pde,
        data=data,
        solver=solver,
    )
    if field_adjoint:
        weights, steps, result, ok = implicit_solve(
            args, run, grid=grid, ridge=ridge, ridge_toward=ridge_toward, mesh=mesh
        )
    else:
        weights, steps, result, ok = run(args)
    weights = checked_inputs(weights, finite_basis, bad_data)
    # Diagnostics from the operators applied to each expert's field `T w_k + u_p`, so that
    # they differentiate like `u`, without the stacks.
    centers = init if ridge_toward == "init" else None
    fields = expert_fields(weights, transformed, particular, per_expert_products(problem, grid))
    rows_r, cond_rows = rows_from_fields(fields, weights, problem, pde, data, grid, ridge, centers)
    norms = jnp.linalg.norm(rows_r, axis=-1)
    cond_error = jnp.max(jnp.where(problem.cond_valid, jnp.abs(cond_rows), 0.0), axis=-1)
    result = jax.vmap(lambda bad, r: RESULTS.where(bad, RESULTS.nonfinite_residual, r))(
        ok & ~jnp.isfinite(norms), result
    )
    ok = ok & jnp.isfinite(norms)
    u = assemble_from_fields(fields, labels, partition.blend(grid))
    if throw:
        message = (
            "hcmoe.solve: at least one expert's constraint solve did not converge (see "
            "Solution.stats with throw=False; stats.messages() says why). Try more "
            "max_steps, a solver with looser rtol/atol, a larger hcmoe.Rows(ridge=...), or "
            "precision='float64'."
        )
        u = _checked(u, [(~jnp.all(ok), message)])
    stats = SolveStats(
        steps,
        norms.astype(out_dtype),
        ok,
        result,
        cond_error.astype(out_dtype),
        problem.points,
    )
    return Solution(u.astype(out_dtype), weights.astype(out_dtype), stats)


def default_solver(dtype) -> optx.AbstractLeastSquaresSolver:
    """The solver `hcmoe.solve` uses when given none: `hcmoe.LevenbergMarquardt()`
    (normal-equation steps, rtol = atol = 1e-4, the paper's tolerances) in float64 (m >> N);
    optimistix's QR-based one in lower precision, where squaring the condition number costs
    too much accuracy (it starts from `λ = 1` and stops at the Cauchy test)."""
    if jnp.dtype(dtype) == jnp.float64:
        return LevenbergMarquardt(rtol=1e-4, atol=1e-4)
    # optimistix's solver with hcmoe's trust region from λ = 1 (its own), whose step size
    # keeps the weights' dtype: optimistix's is float64 under x64, and its QR descent then
    # fails on float32 weights ("Vector and operator structures do not match").
    return eqx.tree_at(
        lambda s: s.search,
        optx.LevenbergMarquardt(rtol=1e-4, atol=1e-4),
        TrustRegion(initial_damping=1.0),
    )


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
