"""The experts' execution on one device or a mesh (batched, sequential or sharded) and the
assembly of `u` from their fields."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._adjoint import (
    _UNROLL_MAX,
)
from ._expert import (
    hessian as objective_hessian,
    residual,
    solve_expert,
)
from ._operators import whole_grid_values
from ._rows import ProblemRows, evaluate_rows


def _run_experts(
    a, hessian: bool = False, *, grid, mesh, schedule, max_steps, ridge, adjoint, ridge_toward
) -> tuple[Any, ...]:
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
            problem = evaluate_rows(
                dataclasses.replace(problem, operators=rows.operators),
                transformed,
                particular,
                grid,
                whole,
            )
        w, steps, _, result, ok = solve_expert(
            problem,
            w0,
            pde,
            data,
            solver=a["solver"],
            max_steps=max_steps,
            ridge=ridge,
            adjoint=adjoint,
            ridge_toward=ridge_toward,
        )
        if not hessian:
            return w, steps, result, ok
        center = w0 if ridge_toward == "init" else None
        return (
            w,
            steps,
            result,
            ok,
            _objective_hessian(w, problem, pde, data, ridge, center, batched),
        )

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


# `schedule="auto"` on CPU runs experts one after the other only when one expert's problem
# (sampled PDE rows x basis functions) is at least this large. Measured on a 2-core CPU with
# the objective stopping rule (docs: how-to-choose.md#schedule; every expert 3 LM steps):
# the batched loop was faster at 400 x 8 and 400 x 16 (3.2k, 6.4k: 1.4-1.7x) and 5000 x 8
# (40k: 1.15-1.24x), even at 2500 x 16 (40k), and the sequential one at 5000 x 16 (80k: the
# gradient 1.35x), 20000 x 16 and 25000 x 16 (320k, 400k: 1.2-1.5x; smaller working sets).
MAP_MIN_WORK = 65_536


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
