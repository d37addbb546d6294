"""The implicit-function gradient of the experts' solves, without the rows' cotangents.

At an expert's minimiser the gradient of its objective vanishes:
`g(w; T, u_p, θ) = ∇_w ½‖r(w)‖² = 0`, with `r` built from the operators' values
`v_j = L_j (T w + u_p)` at the expert's rows (`θ`: data, targets, PDE parameters, ...). So
`dw = -H⁻¹ ∂g/∂(T, u_p, θ) · (dT, du_p, dθ)`, with `H = ∂g/∂w` the Hessian at the solution.

`optimistix.ImplicitAdjoint` differentiates the same equation, but through the operator
stacks `A_j = L_j T` at the rows (`m x N` each): their cotangent, `m x N` per operator and
expert, is materialised and then scattered back into the basis. Yet it has rank two
(`a λᵀ + b wᵀ` for `m`-vectors `a`, `b`), and

    g = Tᵀ Σ_j L_jᵀ R_j(v),   R_j = ∂(½‖r‖²)/∂v_j,

is a function of `T` through two grid fields only: `T w` going in and `Σ_j L_jᵀ R_j` coming
out. Here `g` is evaluated in that *field form* (the operators applied to the one field
`T w + u_p` at the rows, and transposed onto one field), and its tangent is taken with
`jax.jvp` at the solution. Forward-mode tangents and, by transposition, reverse-mode
cotangents then flow through fields and `m`-vectors, never through `m x N` stacks; the
cotangent of `T` is a sum of outer products of fields with `w` and with the adjoint vector.
The stacks are needed only in the forward solve and for `H` (formed there, `N x N` per
expert), so the gradient does not keep them.

This is a `jax.custom_jvp`: `jax.jvp` and `jax.grad` (its transpose) both work, and every
input that is an array (basis, particular part, data, condition targets, PDE parameters,
`init` when the ridge pulls toward it) gets its exact tangent; inputs that are not
differentiated cost nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from ._expert import residual_rows
from ._grid import Grid
from ._operators import evaluate_at_expert_points


def _is_jax_array(x) -> bool:
    return isinstance(x, jax.Array)


def _expert_axes(rows):
    """`vmap` axes of a `ProblemRows`: every per-expert array on axis 0, operators shared."""
    return type(rows)(rows.names, None, 0, 0, 0, 0, 0, 0, 0, 0)


# Up to this many experts, the tangents of the products below with the basis are written
# one expert at a time, so that their transposes are sums of outer products, which XLA fuses
# with each other and with the other terms of the basis' cotangent into one pass over the
# grid. Past it, one matrix product is faster (measured at 101 x 1024 x 16 on a 2-core CPU:
# `(grid x K) @ (K x N) + U` took 1.33 ms at K = 4 against 0.78 ms for the outer products,
# 1.65 against 1.23 ms at K = 16, 3.47 against 3.73 ms at K = 32).
_UNROLL_MAX = 16


def per_expert_products(rows, grid: Grid) -> bool:
    """Whether `expert_fields`/`_gradients` take their tangents one expert at a time: few
    experts, and every operator of `rows` a local stencil or a Fourier multiplier. An opaque
    whole-grid operator (`ops.Linear`) keeps the matrix products: behind its transpose XLA
    did not fuse the outer products, and each held a grid-sized copy of the basis (measured:
    +48 MiB at the paper size, K = 4, 20k points per expert)."""
    num = rows.index.shape[0]
    if num > _UNROLL_MAX:
        return False
    return all(
        op.fourier_symbol(grid) is not None or op.point_stencil(grid, points) is not None
        for op, points in rows.requests()
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _fields_product(basis, weights, per_expert):
    """`basis @ weights.T`: `(P, N)` and `(K, N)` -> `(P, K)`."""
    return basis @ weights.T


@_fields_product.defjvp
def _fields_product_jvp(per_expert, primals, tangents):
    basis, weights = primals
    d_basis, d_weights = tangents
    if per_expert:
        tangent = jnp.stack([d_basis @ weights[k] for k in range(weights.shape[0])], axis=-1)
    else:
        tangent = d_basis @ weights.T
    return basis @ weights.T, tangent + basis @ d_weights.T


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _transpose_product(fields, basis, per_expert):
    """`fields.T @ basis`: `(P, K)` and `(P, N)` -> `(K, N)`."""
    return fields.T @ basis


@_transpose_product.defjvp
def _transpose_product_jvp(per_expert, primals, tangents):
    fields, basis = primals
    d_fields, d_basis = tangents
    if per_expert:
        tangent = jnp.stack([fields[:, k] @ d_basis for k in range(fields.shape[1])])
    else:
        tangent = fields.T @ d_basis
    return fields.T @ basis, tangent + d_fields.T @ basis


def expert_fields(weights, transformed, particular, per_expert: bool = False):
    """`T w_k + u_p` of every expert, shape `(*grid, K)`: one product `T W^T`, whose
    tangent in `T` is taken one expert at a time with `per_expert` (`per_expert_products`),
    so that its transpose fuses with the rest of the basis' cotangent."""
    n, num = transformed.shape[-1], weights.shape[0]
    fields = _fields_product(jnp.reshape(transformed, (-1, n)), weights, per_expert)
    fields = jnp.reshape(fields, (*transformed.shape[:-1], num))
    return fields if particular is None else fields + particular[..., None]


def rows_from_fields(fields, weights, rows, pde, data, grid: Grid, ridge: float, centers=None):
    """Every expert's residual rows `r_k(w_k)` (as `_solve.residual`) and its unweighted
    condition residual `L u - g`, from the operators applied to its field `fields[..., k]`
    (`(*grid, K)`) at its rows (`rows`: the experts' `ProblemRows`), not from operator
    stacks. Leading axis `K` on `weights`, `rows`, `centers` and the outputs. The operators
    are evaluated for all experts together (`evaluate_at_expert_points`), the pointwise
    residual per expert."""
    values = evaluate_at_expert_points(rows.requests(), fields, grid)
    names = rows.names
    num = weights.shape[0]
    if len(values) > len(names):
        cond_values = jnp.concatenate(
            [jnp.reshape(v, (num, -1)) for v in values[len(names) :]], axis=1
        )
    else:  # no conditions: the inert zero row
        cond_values = jnp.zeros_like(rows.cond_target)

    def one(pde_values, cond_values, w, rows, center):
        r = residual_rows(
            dict(zip(names, pde_values)), cond_values, w, rows, pde, data, ridge, center
        )
        return r, cond_values - rows.cond_target

    axes = (0, 0, 0, _expert_axes(rows), None if centers is None else 0)
    return jax.vmap(one, in_axes=axes)(values[: len(names)], cond_values, weights, rows, centers)


def _gradients(weights, transformed, particular, rows, pde, data, grid, ridge, centers):
    """`∇_w ½‖r_k(w_k)‖²` of every expert, in field form: `T^T G_k` plus the ridge rows'
    part, where `G_k` is the cotangent of expert `k`'s field (`Σ_j L_j^T R_j` at its rows)."""

    def objective(fields, weights):
        r, _ = rows_from_fields(fields, weights, rows, pde, data, grid, ridge, centers)
        return 0.5 * jnp.sum(r * r)  # the experts' objectives are independent: their sum

    per_expert = per_expert_products(rows, grid)
    fields = expert_fields(weights, transformed, particular, per_expert)
    field_part, weight_part = jax.grad(objective, argnums=(0, 1))(fields, weights)
    n, num = transformed.shape[-1], weights.shape[0]
    field_part = jnp.reshape(field_part, (-1, num))
    return (
        _transpose_product(field_part, jnp.reshape(transformed, (-1, n)), per_expert) + weight_part
    )


def no_tangents(tree):
    """Zero tangents of a solve's diagnostics: float0 for integer and boolean leaves, zeros
    for inexact ones."""

    def zero(x):
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(np.shape(x), jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def live_tangent(fn: Callable, dynamic, tangent, static):
    """The tangent of `fn(eqx.combine(dynamic, static))` along `tangent` (a `custom_jvp`
    rule's, `symbolic_zeros=True`), pushed through the leaves whose tangent is not zero only;
    None when every tangent is zero."""
    # `eqx.partition` leaves None where the static parts are; keep them as leaves so that
    # the primal and tangent leaves line up.
    leaves, treedef = jax.tree.flatten(dynamic, is_leaf=lambda x: x is None)
    tangent_leaves = treedef.flatten_up_to(tangent)
    live = [
        i
        for i, t in enumerate(tangent_leaves)
        if not isinstance(t, SymbolicZero)
        and t is not None
        and jnp.result_type(t) != jax.dtypes.float0
    ]
    if not live:
        return None

    def restricted(live_leaves):
        merged = list(leaves)
        for i, leaf in zip(live, live_leaves):
            merged[i] = leaf
        return fn(eqx.combine(jax.tree.unflatten(treedef, merged), static))

    return jax.jvp(restricted, ([leaves[i] for i in live],), ([tangent_leaves[i] for i in live],))[
        1
    ]


def _expert_solves(hessian, rhs, mesh):
    """`-H_k^{-1} rhs_k` for every expert. On a mesh, split over its `"experts"` axis like
    the forward solves (padded with copies of expert 0 when the axis size does not divide
    `K`), so that each device factorises only its own experts' Hessians; left to XLA, the
    replicated Hessians were factorised for all `K` experts on every device."""
    solve = jax.vmap(jnp.linalg.solve)
    if mesh is None:
        return -solve(hessian, rhs)
    from ._sharding import EXPERTS, P, axis_size, constrain_to, pad_leading, padded_size

    num = hessian.shape[0]
    total = padded_size(num, axis_size(mesh, EXPERTS))
    padded = constrain_to(pad_leading((hessian, rhs), total), mesh, P(EXPERTS))
    out = constrain_to(-solve(*padded), mesh, P(EXPERTS))
    return out if total == num else constrain_to(out[:num], mesh, P())


def implicit_solve(
    args: dict[str, Any],
    run: Callable,
    *,
    grid: Grid,
    ridge: float,
    ridge_toward: str,
    mesh=None,
):
    """`run(args, hessian=False)` -> `(weights (K, N), steps, result, ok)`, differentiated
    by the implicit function theorem in field form (module docstring).

    `args` holds `transformed`, `particular`, `rows` (a `ProblemRows`), `init`, `pde`,
    `data` and whatever else `run` needs; its JAX arrays are the differentiable inputs, the
    rest is static. `run(args, hessian=True)` must also return each expert's Hessian of
    `½‖r‖²` at its weights, `(K, N, N)`. `mesh`: the experts' mesh, if any (the adjoint's
    solves are split over it as the forward's are).
    """
    dynamic, static = eqx.partition(args, _is_jax_array)

    @jax.custom_jvp
    def solve(dynamic):
        return run(eqx.combine(dynamic, static), hessian=False)

    def solve_jvp(primals, tangents):
        (dynamic,), (tangent,) = primals, tangents
        weights, steps, result, ok, hessian = run(eqx.combine(dynamic, static), hessian=True)
        fixed = jax.lax.stop_gradient(weights)

        def gradients(a):
            centers = a["init"] if ridge_toward == "init" else None
            return _gradients(
                fixed,
                a["transformed"],
                a["particular"],
                a["rows"],
                a["pde"],
                a["data"],
                grid,
                ridge,
                centers,
            )

        rhs = live_tangent(gradients, dynamic, tangent, static)
        if rhs is None:
            d_weights = jnp.zeros_like(weights)
        else:
            d_weights = _expert_solves(hessian, rhs.astype(weights.dtype), mesh)
        out = (weights, steps, result, ok)
        return out, (d_weights, *no_tangents((steps, result, ok)))

    solve.defjvp(solve_jvp, symbolic_zeros=True)
    return solve(dynamic)
