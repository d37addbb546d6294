r"""The `Coupled` coupling: the joint optimum of the blended experts from per-expert work.

`hcmoe.Joint` fits all `K x N` weights of the blend `u = u_p + sum_k T(phi_k B) w_k` as one
dense least-squares problem. That problem is structured. Give every PDE and condition row to
the expert whose block holds it; with local stencils and compact windows the row of a point in
block `k` depends only on the weights of the experts whose windows reach it (`k` and its
neighbours: 3 in a 1-D split, up to `3^d` in `d` split axes). So

- each expert's rows have a local Jacobian `J_k` with `M N` columns (its `M` neighbours'
  weights), built from operator stacks of that width at its own rows, and
- the Gauss–Newton matrix `H = sum_k P_k^T J_k^T J_k P_k + ridge^2 I` (with `P_k` the
  gather of expert `k`'s neighbours' weights) is block-sparse: its diagonal blocks are
  `N x N`, one per expert.

Each Levenberg–Marquardt step solves `(H + lambda I) d = J^T r` by conjugate gradients on
these products, preconditioned by the inverses of the diagonal blocks (block Jacobi, one
`N x N` Cholesky per expert) plus a coarse correction in the shared-weight subspace
`w_1 = ... = w_K` (PI-HC's problem: a single `N x N` solve), so that the iteration count does
not grow with `K`. The `(K N)^2` matrix is never formed. The implicit adjoint solves the same
kind of system with the full Hessian of `½‖r‖²` (`sum_k P_k^T H_k P_k`, each `H_k` the local
Hessian of expert `k`'s rows) by the same preconditioned iteration.

The neighbours come from the windows' supports, widened by the operators' stencils: an
operator without a `point_stencil` (a Fourier multiplier, `Compose`, `Linear`), an exact
condition along a split axis (its ramp spreads the face's trace along the axis), or a PDE
that overrides `transform_basis` (hcmoe cannot see how far that map reaches) couples every
expert to every other (`M = K`). The result is still the joint optimum; its cost is then the
dense joint's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy as jsp
import numpy as np
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, Scalar

from ._adjoint import live_tangent, no_tangents
from ._expert import ExpertProblem, hessian as local_hessian, jacobian, residual
from ._grid import Grid
from ._joint import windowed_basis, windows
from ._levenberg_marquardt import LevenbergMarquardt, WarmStart
from ._operators import evaluate_at_points, whole_grid_values
from ._operators._base import CHUNK_ROWS
from ._partition import AbstractPartition, as_partition
from ._pde import AbstractPDE, ansatz
from ._results import RESULTS, Solution, SolveStats
from ._rows import Rows, check_residual_data, evaluate_rows, nonfinite_data_entries, problem_rows


PRECONDITIONERS = ("two-level", "block-jacobi")
INNER = ("auto", "cg", "direct")
# `inner="auto"` factorises the assembled `(K N)^2` Gauss–Newton matrix up to this many
# unknowns (without a mesh), and runs preconditioned CG past it.
DIRECT_MAX = 512


# ---------------------------------------------------------------------------------------
# Which experts' weights each expert's rows see.


def _axis_reach(op, grid: Grid) -> dict[str, float] | None:
    """How many grid points along each axis `op`'s stencil reaches from a point (`inf` on a
    periodic wrap-around is not needed: distances are measured the short way round), or
    None when the operator has no concrete local stencil."""
    points = np.arange(grid.size)
    try:
        with jax.ensure_compile_time_eval():
            stencil = op.point_stencil(grid, points)
            if stencil is None:
                return None
            neighbours, weights = (np.asarray(a) for a in stencil)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None
    used = weights != 0
    here = np.unravel_index(np.broadcast_to(points[:, None], neighbours.shape), grid.shape)
    there = np.unravel_index(neighbours, grid.shape)
    reach = {}
    for axis, name in enumerate(grid.names):
        distance = np.abs(there[axis] - here[axis])
        if grid.is_periodic(name):
            distance = np.minimum(distance, grid.shape[axis] - distance)
        reach[name] = float(np.max(np.where(used, distance, 0), initial=0))
    return reach


def _reach(pde: AbstractPDE, reaches, exact_axes, grid: Grid) -> dict[str, float]:
    """The largest reach along each axis of the operators (`reaches`: `_axis_reach` of each),
    the exact conditions and the basis map (`inf` along every axis for an operator without a
    concrete stencil or a PDE with its own `transform_basis`)."""
    reach = dict.fromkeys(grid.names, 0.0)
    if type(pde).transform_basis is not AbstractPDE.transform_basis:
        return dict.fromkeys(grid.names, np.inf)
    for op_reach in reaches:
        if op_reach is None:
            return dict.fromkeys(grid.names, np.inf)
        for name, value in op_reach.items():
            reach[name] = max(reach[name], value)
    for name in exact_axes:
        reach[name] = np.inf
    return reach


def _commutes(pde: AbstractPDE, phi: np.ndarray, exact_axes, grid: Grid) -> bool:
    """Whether `T(phi_k B) = phi_k T(B)` for every window: the PDE keeps the default
    (identity) `transform_basis` and no window varies along an exact condition's axis (the
    condition subtracts the face's trace along that axis)."""
    if type(pde).transform_basis is not AbstractPDE.transform_basis:
        return False
    for name in exact_axes:
        axis = grid.axis(name) + 1
        if not np.array_equal(phi, np.broadcast_to(np.take(phi, [0], axis=axis), phi.shape)):
            return False
    return True


def _dilate(mask: np.ndarray, grid: Grid, reach: dict[str, float]) -> np.ndarray:
    """`mask` (boolean, `grid.shape`) grown by `reach[a]` points along every axis `a`."""
    out = mask
    for axis, name in enumerate(grid.names):
        steps = reach[name]
        if steps == 0:
            continue
        if not np.isfinite(steps) or steps >= grid.shape[axis]:
            out = np.broadcast_to(out.any(axis=axis, keepdims=True), out.shape)
            continue
        grown = out.copy()
        for shift in range(1, int(steps) + 1):
            for sign in (1, -1):
                if grid.is_periodic(name):
                    grown |= np.roll(out, sign * shift, axis=axis)
                else:
                    moved = np.roll(out, sign * shift, axis=axis)
                    edge = [slice(None)] * out.ndim
                    edge[axis] = slice(0, shift) if sign > 0 else slice(-shift, None)
                    moved[tuple(edge)] = False
                    grown |= moved
        out = grown
    return out


def neighbours(
    partition: AbstractPartition, grid: Grid, reach: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """`(index, mask)`, both `(K, M)`: the experts whose window, grown by `reach`, touches
    expert `k`'s block (`index[k, 0] == k`; padded slots repeat `k` with `mask` False)."""
    phi = windows(partition, grid) != 0
    owned = partition.owned(grid)
    num = owned.shape[0]
    lists = []
    for k in range(num):
        lists.append([k])
    for j in range(num):
        grown = _dilate(phi[j], grid, reach)
        for k in range(num):
            if k != j and np.any(grown & owned[k]):
                lists[k].append(j)
    width = max(len(x) for x in lists)
    index = np.array([x + [x[0]] * (width - len(x)) for x in lists], np.int32)
    mask = np.array([[True] * len(x) + [False] * (width - len(x)) for x in lists])
    return index, mask


# ---------------------------------------------------------------------------------------
# The coupled problem: every expert's rows over its neighbours' weights.


class CoupledProblem(eqx.Module):
    """Every expert's rows as an `ExpertProblem` over its neighbours' weights (leading axis
    `K`; stacks `(K, m, M * N)`, slot-major: columns `s N ... (s + 1) N - 1` multiply the
    weights of expert `index[k, s]`), the neighbour table, which experts are real (padding
    experts of a mesh have no rows) and the ridge."""

    problems: ExpertProblem
    index: Int[Array, "K M"]
    mask: Bool[Array, "K M"]
    real: Bool[Array, " K"]
    modes: Float[Array, "K L"]
    # The transpose of the neighbour table, for `scatter` as a gather (faster than a
    # scatter-add on CPU): expert k's weights appear in slot `seen_slot[k, j]` of expert
    # `seen_by[k, j]` (`seen_mask` False in padding).
    seen_by: Int[Array, "K M2"]
    seen_slot: Int[Array, "K M2"]
    seen_mask: Bool[Array, "K M2"]
    ridge: float = eqx.field(static=True)

    @property
    def width(self) -> int:
        return self.index.shape[1]

    def gather(self, w: Float[Array, "K N"]) -> Float[Array, "K MN"]:
        """Each expert's local weights: its neighbours' weights, slot-major."""
        local = w[self.index] * self.mask[..., None]
        return local.reshape(w.shape[0], -1)

    def scatter(self, local: Float[Array, "K MN"], n: int) -> Float[Array, "K N"]:
        """The transpose of `gather`: each slot's part added to its expert."""
        parts = local.reshape(local.shape[0], -1, n)
        seen = parts[self.seen_by, self.seen_slot] * self.seen_mask[..., None]  # (K, M2, N)
        return jnp.sum(seen, axis=1)

    def local_rows(self, w, pde, data) -> Float[Array, "K R"]:
        """Every expert's PDE and condition rows (no ridge rows) at the weights `w`."""
        width = self.width * w.shape[1]
        fn = lambda v, p: residual(v, p, pde, data, 0.0)[:-width]  # noqa: E731
        return jax.vmap(fn)(self.gather(w), self.problems)

    def ridge_rows(self, w, center) -> Float[Array, "K N"]:
        shift = w if center is None else w - center
        return self.ridge * _where(self.real[:, None], shift, 0.0)

    def residual(self, w, pde, data, center) -> Float[Array, " rows"]:
        """The residual of the whole coupled problem: every expert's rows, then the ridge."""
        rows = self.local_rows(w, pde, data)
        return jnp.concatenate([rows.reshape(-1), self.ridge_rows(w, center).reshape(-1)])

    def jacobians(self, w, pde, data) -> Float[Array, "K R MN"]:
        """Every expert's local Jacobian `d rows_k / d (local weights)` (no ridge rows)."""
        width = self.width * w.shape[1]
        fn = lambda v, p: jacobian(v, p, pde, data, 0.0)[:-width]  # noqa: E731
        return jax.vmap(fn)(self.gather(w), self.problems)

    def hessians(self, w, pde, data) -> Float[Array, "K MN MN"]:
        """Every expert's local Hessian of `½‖rows_k‖²` (its second-order terms included)."""
        fn = lambda v, p: local_hessian(v, p, pde, data, 0.0)  # noqa: E731
        return jax.vmap(fn)(self.gather(w), self.problems)


def _where(condition, x, y) -> Array:
    """`jnp.where(condition, x, y)`, typed as one array (its one-argument overload returns a
    tuple, which the type checker cannot rule out)."""
    return cast(Array, jnp.where(condition, x, y))


def _transpose_table(index: np.ndarray, mask: np.ndarray):
    """For every expert, which `(expert, slot)` pairs of the neighbour table hold it."""
    seen = [[] for _ in range(index.shape[0])]
    for i in range(index.shape[0]):
        for m in range(index.shape[1]):
            if mask[i, m]:
                seen[index[i, m]].append((i, m))
    width = max(1, max(len(x) for x in seen))
    by = np.zeros((index.shape[0], width), np.int32)
    slot = np.zeros((index.shape[0], width), np.int32)
    valid = np.zeros((index.shape[0], width), bool)
    for k, pairs in enumerate(seen):
        for j, (i, m) in enumerate(pairs):
            by[k, j], slot[k, j], valid[k, j] = i, m, True
    return by, slot, valid


class BlockOperator(eqx.Module):
    """`A = sum_k P_k^T G_k P_k + diag(shift_k) I` on `(K, N)` weights, from local blocks
    `G_k` (`(K, M N, M N)`), with its block-Jacobi and coarse (shared-weight) parts."""

    local: Float[Array, "K MN MN"]
    shift: Float[Array, " K"]
    structure: CoupledProblem

    def mv(self, v):
        s = self.structure
        local = jnp.einsum("kij,kj->ki", self.local, s.gather(v))
        return s.scatter(local, v.shape[1]) + self.shift[:, None] * v

    def dense(self, n: int) -> Float[Array, "KN KN"]:
        """`A` assembled as a `(K N)^2` matrix from the local blocks (the `"direct"` inner
        solve, for small `K N`; the Jacobian itself is never formed)."""
        s = self.structure
        num, width = s.index.shape
        blocks = self.local.reshape(num, width, n, width, n)
        # One-hot selections rather than a scatter-add into (K, K, N, N): XLA's CPU scatter
        # of these blocks took 120 ms at K = 8 (the einsum: well under 1 ms).
        select = jax.nn.one_hot(s.index, num, dtype=self.local.dtype) * s.mask[..., None]
        out = jnp.einsum("kma,kminj,knb->aibj", select, blocks, select)
        out = out.reshape(num * n, num * n)
        return out + jnp.diag(jnp.repeat(self.shift, n))

    def diagonal_blocks(self, n: int) -> Float[Array, "K N N"]:
        s = self.structure
        num, width = s.index.shape
        blocks = self.local.reshape(num, width, n, width, n)
        diag = jnp.einsum("kaiaj->kaij", blocks)  # (K, M, N, N): each slot's own block
        seen = diag[s.seen_by, s.seen_slot] * s.seen_mask[..., None, None]
        out = jnp.sum(seen, axis=1)
        return out + self.shift[:, None, None] * jnp.eye(n, dtype=self.local.dtype)[None]

    def coarse(self, n: int) -> Float[Array, "LN LN"]:
        """`Z^T A Z` for the coarse space `Z = modes ⊗ I_N` (`modes` `(K, L)`, zero on
        padding experts): `w_k = sum_l modes[k, l] c_l`."""
        s = self.structure
        num, width = s.index.shape
        local_modes = s.modes[s.index] * s.mask[..., None]  # (K, M, L)
        blocks = self.local.reshape(num, width, n, width, n)
        total = jnp.einsum("kma,kminj,knb->aibj", local_modes, blocks, local_modes)
        gram = jnp.einsum("k,ka,kb->ab", self.shift, s.modes, s.modes)
        size = s.modes.shape[1] * n
        eye = jnp.eye(n, dtype=total.dtype)
        return total.reshape(size, size) + jnp.einsum("ab,ij->aibj", gram, eye).reshape(size, size)


class Preconditioner(eqx.Module):
    """Block Jacobi (each expert's diagonal block, Cholesky-factorised) plus, for
    `"two-level"`, the additive coarse correction `Z (Z^T A Z)^{-1} Z^T` (`Z = modes ⊗
    I_N`, see `coarse_modes`)."""

    blocks: Float[Array, "K N N"]
    coarse: Float[Array, "LN LN"] | None
    modes: Float[Array, "K L"]

    @classmethod
    def of(cls, operator: BlockOperator, n: int, kind: str) -> Preconditioner:
        # Cholesky factors, applied by triangular solves: explicit inverses were tried (two
        # batched products per iteration) and lost the preconditioner's accuracy on
        # ill-conditioned blocks (measured, DS 51 x 512, K = 8: 132 iterations ending at a
        # relative residual 5e-7 instead of 48 reaching 1e-10).
        blocks = jnp.linalg.cholesky(operator.diagonal_blocks(n))
        coarse = jnp.linalg.cholesky(operator.coarse(n)) if kind == "two-level" else None
        return cls(blocks, coarse, operator.structure.modes)

    def apply(self, r):
        solve = lambda c, b: jsp.linalg.cho_solve((c, True), b)  # noqa: E731
        z = jax.vmap(solve)(self.blocks, r)
        if self.coarse is not None:
            projected = jnp.einsum("ka,kn->an", self.modes, r).reshape(-1)
            c = solve(self.coarse, projected).reshape(self.modes.shape[1], -1)
            z = z + jnp.einsum("ka,an->kn", self.modes, c)
        return z


def coarse_modes(partition: AbstractPartition, grid: Grid, count: int, total: int) -> np.ndarray:
    """`(total, L)` coarse modes: low-order polynomials (total degree, `L <= count`) of each
    expert's block centre, scaled to [-1, 1] per axis, orthonormalised over the real experts
    (rows past the real experts, the padding, are zero). Degree 0 alone is the shared-weight
    subspace (PI-HC's problem); the partition of unity reproduces low-order polynomials, so
    `w_k = p(x_k) c` is a smooth global field, the error the block-Jacobi step leaves."""
    owned = partition.owned(grid)
    num = owned.shape[0]
    centres = []
    for name in grid.names:
        coords = grid.mesh()[name]
        centre = np.array([coords[owned[k]].mean() for k in range(num)])
        spread = centre.max() - centre.min()
        if spread > 0:
            centres.append(2 * (centre - centre.min()) / spread - 1)
    columns = [np.ones(num)]
    degree = 1
    while len(columns) < min(count, num) and centres and degree < num:
        for combo in _monomials(len(centres), degree):
            column = np.prod([centres[a] ** e for a, e in enumerate(combo)], axis=0)
            columns.append(column)
        degree += 1
    modes = np.stack(columns[: min(count, num)], axis=1)
    q, r = np.linalg.qr(modes)
    keep = np.abs(np.diag(r)) > 1e-10 * np.abs(r[0, 0])
    out = np.zeros((total, int(keep.sum())))
    out[:num] = q[:, keep]
    return out


def _monomials(dims: int, degree: int) -> list[tuple[int, ...]]:
    """Exponent tuples of the monomials of exactly `degree` in `dims` variables."""
    if dims == 1:
        return [(degree,)]
    return [(e,) + rest for e in range(degree, -1, -1) for rest in _monomials(dims - 1, degree - e)]


def direct_solve(operator: BlockOperator, b, *, positive: bool):
    """`A x = b` by factorising `A` assembled from its blocks (Cholesky where `positive`,
    else LU); the same `(x, iterations = 0, relative residual)` as `pcg`."""
    n = b.shape[1]
    matrix = operator.dense(n)
    flat = b.reshape(-1)
    if positive:
        x = jsp.linalg.cho_solve(jsp.linalg.cho_factor(matrix), flat)
    else:
        x = jnp.linalg.solve(matrix, flat)
    x = x.reshape(b.shape)
    norm_b = jnp.linalg.norm(b)
    relative = jnp.linalg.norm(b - operator.mv(x)) / jnp.where(norm_b > 0, norm_b, 1.0)
    return x, jnp.array(0, jnp.int32), relative


def pcg(
    mv, b, precondition, *, rtol: float, max_steps: int, restarts: int = 0
) -> tuple[Array, Int[Array, ""], Scalar]:
    """Preconditioned conjugate gradients for `A x = b` (`A` symmetric positive definite):
    returns `x`, the iterations taken and the relative residual `‖b - A x‖ / ‖b‖`.

    CG's recursively updated residual drifts from the true one on ill-conditioned systems
    (measured: 1e-10 recursive against 4e-7 true, condition number 1e9), so when the true
    residual misses `rtol` the iteration restarts from `x` with the true residual, up to
    `restarts` times, within `max_steps` iterations in all. None by default: where the miss
    is the rounding floor of the system, restarts only spend iterations (measured, DS 51 x
    512, K = 16: 74 iterations without, 116 with one restart, 200 (the cap) with three, all
    ending near 4e-7); Levenberg–Marquardt's refinement step and its next iterate correct
    what an inexact step leaves."""
    norm_b = jnp.linalg.norm(b)
    tol = rtol * norm_b

    def inner(x, steps):
        r = b - mv(x)
        z = precondition(r)

        def cond(carry):
            _, r, _, _, _, k = carry
            return (jnp.linalg.norm(r) > tol) & (k < max_steps)

        def body(carry):
            x, r, z, p, rz, k = carry
            ap = mv(p)
            alpha = rz / jnp.vdot(p, ap)
            x = x + alpha * p
            r = r - alpha * ap
            z = precondition(r)
            rz_new = jnp.vdot(r, z)
            p = z + (rz_new / rz) * p
            return x, r, z, p, rz_new, k + 1

        x, _, _, _, _, steps = jax.lax.while_loop(cond, body, (x, r, z, z, jnp.vdot(r, z), steps))
        return x, steps

    def outer_cond(carry):
        x, steps, rounds = carry
        missed = jnp.linalg.norm(b - mv(x)) > tol
        return missed & (steps < max_steps) & (rounds <= restarts)

    def outer_body(carry):
        x, steps, rounds = carry
        x, steps = inner(x, steps)
        return x, steps, rounds + 1

    start = (jnp.zeros_like(b), jnp.array(0, jnp.int32), jnp.array(0, jnp.int32))
    x, steps, _ = jax.lax.while_loop(outer_cond, outer_body, start)
    relative = jnp.linalg.norm(b - mv(x)) / jnp.where(norm_b > 0, norm_b, 1.0)
    return x, steps, relative


# ---------------------------------------------------------------------------------------
# Levenberg–Marquardt steps from the block structure.


class _CoupledState(eqx.Module):
    """The descent's view of the last accepted iterate (the fields `LevenbergMarquardt`'s
    objective test reads: `objective`, `previous`, `decrement`), plus the local Jacobians
    and residual rows, the Gauss–Newton matrix's local blocks, `J^T r`, and the inner
    iterations and relative residual of the last Gauss–Newton system solved."""

    jac: Array
    rows: Array
    ridge_rows: Array
    gram: Array
    gradient: Array
    objective: Scalar
    previous: Scalar
    decrement: Scalar
    inner_steps: Array
    inner_residual: Scalar


class CoupledDescent(optx.AbstractDescent):
    """The damped Gauss–Newton step `(H + lambda I) d = J^T r` of the coupled problem, by
    preconditioned CG on the block structure (module docstring), refined once with the
    damped least-squares residual as `NormalDampedNewtonDescent` does."""

    structure: CoupledProblem
    pde: AbstractPDE
    data: Any
    preconditioner: str = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    direct: bool = eqx.field(default=False, static=True)

    def _split(self, residual, shape):
        num, n = shape
        rows = residual[: residual.size - num * n].reshape(num, -1)
        return rows, residual[residual.size - num * n :].reshape(num, n)

    def _operator(self, gram, damping):
        s = self.structure
        shift = _where(s.real, s.ridge**2 + damping, 1.0)
        return BlockOperator(gram, shift, s)

    def _solve(self, operator, b):
        if self.direct:
            return direct_solve(operator, b, positive=True)
        pre = Preconditioner.of(operator, b.shape[1], self.preconditioner)
        return pcg(operator.mv, b, pre.apply, rtol=self.rtol, max_steps=self.max_steps)

    def init(self, y, f_info_struct):
        num, n = y.shape
        rows_total = f_info_struct.residual.shape[0] - num * n
        rows = rows_total // num
        width = self.structure.width * n
        zero = jnp.array(0.0, y.dtype)
        inf = jnp.array(jnp.inf, y.dtype)
        return _CoupledState(
            jnp.zeros((num, rows, width), y.dtype),
            jnp.zeros((num, rows), y.dtype),
            jnp.zeros_like(y),
            jnp.zeros((num, width, width), y.dtype),
            jnp.zeros_like(y),
            inf,
            inf,
            inf,
            jnp.array(0, jnp.int32),
            zero,
        )

    def query(self, y, f_info, state):
        s = self.structure
        jac = s.jacobians(y, self.pde, self.data)
        rows, ridge_rows = self._split(f_info.residual, y.shape)
        gram = jnp.einsum("kri,krj->kij", jac, jac)
        local_gradient = jnp.einsum("kr,kri->ki", rows, jac)
        gradient = s.scatter(local_gradient, y.shape[1]) + s.ridge * ridge_rows
        step, steps, relative = self._solve(self._operator(gram, 0.0), gradient)
        objective = 0.5 * jnp.vdot(f_info.residual, f_info.residual)
        return _CoupledState(
            jac,
            rows,
            ridge_rows,
            gram,
            gradient,
            objective,
            state.objective,
            0.5 * jnp.vdot(gradient, step),
            steps,
            relative,
        )

    def step(self, step_size, state):
        s = self.structure
        tiny = step_size <= jnp.finfo(step_size.dtype).eps
        damping = jnp.where(tiny, jnp.finfo(step_size.dtype).max, 1 / jnp.where(tiny, 1, step_size))
        operator = self._operator(state.gram, damping)
        diff, _, _ = self._solve(operator, state.gradient)
        # One refinement with the damped least-squares residual (see
        # `NormalDampedNewtonDescent`): `J^T (r - J d) - lambda d`, products with J only.
        n = diff.shape[1]
        left = state.rows - jnp.einsum("kri,ki->kr", state.jac, s.gather(diff))
        ridge = jnp.where(s.real[:, None], s.ridge, 0.0)
        correction = (
            s.scatter(jnp.einsum("kr,kri->ki", left, state.jac), n)
            + ridge * (state.ridge_rows - ridge * diff)
            - jnp.where(s.real[:, None], damping, 0.0) * diff
        )
        more, _, _ = self._solve(operator, correction)
        return -(diff + more), optx.RESULTS.successful


# ---------------------------------------------------------------------------------------
# Building the problem, solving it, differentiating it.


def _exact_axes(pde, grid, data) -> tuple[str, ...]:
    return tuple(c.axis for c in pde.conditions(grid, data) if c.exact)


def _contract_slots(flat: Array, neighbours: Array, weights: Array) -> Array:
    """`out[r, m] = sum_j weights[r, m, j] * flat[neighbours[r, j]]`: one stencil per row,
    applied with `M` sets of weights (the operator's weights times each neighbour's window),
    in a scan over row chunks (see `_operators._base._contract`: chunk-sized temporaries,
    one grid-sized cotangent accumulator). `flat` `(points, N)` -> `(rows, M, N)`."""
    rows, width = neighbours.shape
    chunks = max(1, -(-rows // CHUNK_ROWS))
    size = -(-rows // chunks)
    pad = chunks * size - rows
    neighbours = jnp.pad(neighbours, ((0, pad), (0, 0))).reshape(chunks, size, width)
    weights = jnp.pad(weights, ((0, pad), (0, 0), (0, 0)))
    weights = weights.reshape(chunks, size, *weights.shape[1:])

    def step(_, chunk):
        index, w = chunk
        out = 0
        for j in range(width):
            out = out + w[:, :, j, None] * flat[index[:, j]][:, None, :]
        return None, out

    values = cast(Array, jax.lax.scan(step, None, (neighbours, weights))[1])
    return values.reshape(chunks * size, *values.shape[2:])[:rows]


def _windowed_stacks(requests, transformed, phi, index, mask, grid: Grid) -> list[Array]:
    """`L(phi_j T(B))` at every expert's points (`(K, p)`) for each of its neighbours `j =
    index[k, s]`, slot-major, `(K, p, M * N)`, for every `(L, points)` request. From the
    operators' stencils: the neighbours of each point are gathered once and weighted by each
    window there (`phi` `(K, grid.size)`); every request's rows in one scan (as
    `evaluate_at_points` does for the independent experts' stacks)."""
    dtype = transformed.dtype
    maskj = jnp.asarray(mask, dtype)[:, :, None, None]
    indexj = jnp.asarray(index)[:, :, None, None]
    stencils, shapes = [], []
    for op, points in requests:
        neighbours, weights = op.point_stencil(grid, points)
        neighbours = jnp.asarray(neighbours)
        weights = jnp.asarray(weights).astype(dtype)
        num, p, width = neighbours.shape
        there = phi[indexj, neighbours[:, None]] * maskj  # (K, M, p, width)
        slot_weights = jnp.moveaxis(there, 1, 2) * weights[:, :, None, :]  # (K, p, M, width)
        stencils.append(
            (neighbours.reshape(num * p, width), slot_weights.reshape(num * p, -1, width))
        )
        shapes.append((num, p))
    flat = jnp.reshape(transformed, (grid.size, -1))
    return [
        _contract_slots(flat, n, w).reshape(num, p, -1)
        for (n, w), (num, p) in zip(stencils, shapes)
    ]


def _local_problems(problem, transformed, particular, phi, index, mask, grid):
    """Every expert's `ExpertProblem` over its neighbours' weights from the stencils (see
    `_windowed_stacks`), when `T(phi_j B) = phi_j T(B)` and every operator is a stencil."""
    dtype = transformed.dtype
    requests = problem.requests()
    names = problem.names
    phi = jnp.asarray(phi.reshape(phi.shape[0], -1), dtype)
    values = _windowed_stacks(requests, transformed, phi, index, mask, grid)
    if particular is None:
        offsets = [jnp.zeros(jnp.shape(points), dtype) for _, points in requests]
    else:
        offsets = evaluate_at_points(requests, particular, grid)
    num, width = index.shape[0], index.shape[1] * transformed.shape[-1]
    if len(requests) > len(names):
        matrices = jnp.concatenate(values[len(names) :], axis=-2)
        cond_offsets = jnp.concatenate(offsets[len(names) :], axis=-1)
    else:
        matrices = jnp.zeros((num, 1, width), dtype)
        cond_offsets = jnp.zeros((num, 1), dtype)
    return ExpertProblem(
        dict(zip(names, values[: len(names)])),
        dict(zip(names, offsets[: len(names)])),
        problem.coords,
        problem.pde_valid,
        matrices,
        cond_offsets,
        problem.cond_target,
        problem.cond_scale,
        problem.cond_valid,
        point_data=problem.point_data,
        points=problem.points,
    )


class Ansatz(eqx.Module):
    """The blended prediction's ansatz: `u = u_p + sum_k phi_k T(B) w_k` from `T(B)`
    (`(*grid, N)`) and the windows `phi` (`(K, *grid)`) when the two commute, else
    `u_p + sum_k T(phi_k B) w_k` from the transformed windowed basis (`(K, *grid, N)`)."""

    transformed: Array
    particular: Array | None
    phi: Array | None

    def __call__(self, weights: Array) -> Array:
        if self.phi is None:
            u = jnp.einsum("k...n,kn->...", self.transformed, weights)
        else:
            fields = jnp.tensordot(self.transformed, weights, axes=([-1], [1]))  # (*grid, K)
            u = jnp.sum(fields * jnp.moveaxis(self.phi, 0, -1), axis=-1)
        return u if self.particular is None else u + self.particular


def build_coupled(
    basis,
    pde: AbstractPDE,
    partition: AbstractPartition,
    grid: Grid,
    data,
    *,
    key,
    rows: Rows,
    total_experts: int,
    coarse: int = 1,
):
    """The coupled problem of one sample: `(structure, ansatz, problem rows)`, padded with
    row-less experts to `total_experts`.

    Two ways to the same stacks: where `T(phi_j B) = phi_j T(B)` and every operator is a
    stencil (`_commutes`, diffusion–sorption, heat), from `T(B)` and the windows at each
    stencil's points, at about the independent experts' cost per neighbour; otherwise from
    the transformed windowed basis `T([phi_1 B, ...])` exactly as `Joint` builds it, each
    expert evaluating its neighbours' functions at its rows (the dense joint's cost)."""
    num = partition.num_experts(grid)
    owned = as_partition(np.asarray(partition.labels(grid)))
    # Rows: each expert's own block; every condition row counted once, with the joint
    # problem's balance (pooled over the experts).
    problem, transformed, particular = problem_rows(
        basis,
        pde,
        grid,
        data,
        owned,
        rows.points_per_expert,
        key,
        condition_scope="owned",
        balance=rows.balance,
        pooled=True,
    )
    check_residual_data(pde, problem, data, grid)
    exact_axes = _exact_axes(pde, grid, data)
    reaches = [_axis_reach(op, grid) for op in problem.operators]  # probes every point
    reach = _reach(pde, reaches, exact_axes, grid)
    index, mask = neighbours(partition, grid, reach)
    real = np.arange(total_experts) < num
    if total_experts > num:
        # Row-less experts fill a mesh: copies of expert 0's rows, masked out, whose
        # neighbour slots all point at expert 0 with mask False (so they see no weights and
        # no weights see them). Padded here, on the rows' indices, rather than on the
        # stacks: XLA's SPMD partitioner failed on the transpose of a padded stack.
        fill = np.concatenate([np.arange(num), np.zeros(total_experts - num, np.int64)])
        per = dataclasses.replace(problem, operators=())
        per = jax.tree.map(lambda x: jnp.take(x, fill, axis=0), per)
        dummy = jnp.asarray(~real)
        problem = dataclasses.replace(
            per,
            operators=problem.operators,
            pde_valid=per.pde_valid & ~dummy[:, None],
            cond_scale=jnp.where(dummy[:, None], 0.0, per.cond_scale),
            cond_valid=per.cond_valid & ~dummy[:, None],
        )
        index = np.concatenate(
            [index, np.zeros((total_experts - num, index.shape[1]), index.dtype)]
        )
        mask = np.concatenate([mask, np.zeros((total_experts - num, mask.shape[1]), bool)])
    phi = windows(partition, grid)
    stencils = all(r is not None for r in reaches)
    if stencils and _commutes(pde, phi, exact_axes, grid):
        problems = _local_problems(problem, transformed, particular, phi, index, mask, grid)
        form = Ansatz(transformed, particular, jnp.asarray(phi, transformed.dtype))
    else:
        problems, form = _windowed_problems(problem, basis, pde, partition, grid, data, index, mask)
    modes = coarse_modes(partition, grid, coarse, total_experts)
    seen_by, seen_slot, seen_mask = _transpose_table(index, mask)
    structure = CoupledProblem(
        problems,
        jnp.asarray(index),
        jnp.asarray(mask),
        jnp.asarray(real),
        jnp.asarray(modes, basis.dtype),
        jnp.asarray(seen_by),
        jnp.asarray(seen_slot),
        jnp.asarray(seen_mask),
        float(rows.ridge),
    )
    return structure, form, problem


def _windowed_problems(problem, basis, pde, partition, grid, data, index, mask):
    """The general path of `build_coupled`: every expert's rows evaluated on its neighbours'
    transformed windowed functions `T(phi_j B)` (Fourier multipliers from one whole-grid
    transform per expert, shared by the experts that see it)."""
    num, n = index.shape[0], basis.shape[-1]
    transformed, particular, _ = ansatz(pde, windowed_basis(basis, partition, grid), grid, data)
    transformed = jnp.moveaxis(transformed.reshape(*grid.shape, num, n), -2, 0)
    per_expert = dataclasses.replace(problem, operators=())
    whole = jax.vmap(lambda f: whole_grid_values(problem.requests(), f, grid))(transformed)

    def slot(k_rows, k_index, first):
        local = dataclasses.replace(k_rows, operators=problem.operators)
        return evaluate_rows(
            local,
            transformed[k_index],
            particular if first else None,
            grid,
            {i: v[k_index] for i, v in whole.items()},
        )

    slots = [
        jax.vmap(functools.partial(slot, first=m == 0))(per_expert, jnp.asarray(index[:, m]))
        for m in range(index.shape[1])
    ]
    maskj = jnp.asarray(mask, basis.dtype)

    def join(part):
        return jnp.concatenate(
            [part(p) * maskj[:, m, None, None] for m, p in enumerate(slots)], axis=-1
        )

    problems = dataclasses.replace(
        slots[0],
        stacks={name: join(lambda p, name=name: p.stacks[name]) for name in slots[0].stacks},
        cond_matrix=join(lambda p: p.cond_matrix),
    )
    return problems, Ansatz(transformed, particular, None)


def _solver(solver, descent: CoupledDescent) -> LevenbergMarquardt:
    if isinstance(solver, WarmStart):
        raise ValueError(
            "solver: hcmoe.Coupled does not take hcmoe.WarmStart; pass "
            "hcmoe.LevenbergMarquardt(...) (or None)."
        )
    if not isinstance(solver, LevenbergMarquardt):
        raise ValueError(
            "solver: hcmoe.Coupled solves its Gauss–Newton steps on the experts' blocks and "
            "needs hcmoe.LevenbergMarquardt(...) (or None for the default); got "
            f"{type(solver).__name__}. Use coupling=hcmoe.Joint() for another solver."
        )
    return eqx.tree_at(lambda s: s.solver.descent, solver, descent)


def coupled_weights(
    args: dict[str, Any],
    *,
    solver,
    max_steps: int,
    ridge_toward: str,
    preconditioner: str,
    rtol: float,
    inner_max_steps: int,
    mesh,
    direct: bool = False,
):
    """`(weights (K, N), steps, result, inner_steps, inner_residual)` of the coupled problem
    `args["structure"]` (with `args["pde"]`, `args["data"]`, `args["init"]`), differentiated
    by the implicit function theorem: the tangent solves `(sum_k P_k^T H_k P_k + ridge^2 I)
    dw = -d(grad)` by the same preconditioned CG, never forming the `(K N)^2` matrix."""
    dynamic, static = eqx.partition(args, lambda x: isinstance(x, jax.Array))

    def center_of(a):
        return a["init"] if ridge_toward == "init" else None

    def constrain(x):
        if mesh is None:
            return x
        from ._sharding import EXPERTS, P, constrain_to

        return constrain_to(x, mesh, P(EXPERTS))

    def run(dynamic):
        a = eqx.combine(dynamic, static)
        structure, pde, data = a["structure"], a["pde"], a["data"]
        # Each device holds its experts' rows (and so their Jacobians and blocks); the
        # weights, the neighbour table and the conjugate-gradient vectors (K x N numbers)
        # are replicated.
        structure = dataclasses.replace(structure, problems=constrain(structure.problems))
        center = center_of(a)
        descent = CoupledDescent(
            structure, pde, data, preconditioner, rtol, inner_max_steps, direct
        )
        lm = _solver(solver, descent)

        def fn(w, _):
            return structure.residual(w, pde, data, center)

        sol = optx.least_squares(
            fn,
            lm,
            a["init"],
            max_steps=max_steps,
            throw=False,
            adjoint=optx.RecursiveCheckpointAdjoint(),
        )
        result = RESULTS.promote(sol.result)
        result = RESULTS.where(
            (result == RESULTS.successful) & ~lm.stationary(sol.state),
            RESULTS.not_stationary,
            result,
        )
        descent_state = sol.state.descent_state
        steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
        return (
            sol.value,
            steps,
            result,
            descent_state.inner_steps,
            descent_state.inner_residual,
        )

    @jax.custom_jvp
    def solve(dynamic):
        return run(dynamic)

    def solve_jvp(primals, tangents):
        (dynamic,), (tangent,) = primals, tangents
        out = run(jax.lax.stop_gradient(dynamic))
        weights = out[0]
        fixed = jax.lax.stop_gradient(weights)

        def gradient(b):
            s, pde, data = b["structure"], b["pde"], b["data"]

            def objective(w):
                r = s.residual(w, pde, data, center_of(b))
                return 0.5 * jnp.vdot(r, r)

            return jax.grad(objective)(fixed)

        rhs = live_tangent(gradient, dynamic, tangent, static)
        if rhs is None:
            return out, (jnp.zeros_like(weights), *no_tangents(out[1:]))
        a = eqx.combine(jax.lax.stop_gradient(dynamic), static)
        structure = a["structure"]
        hess = structure.hessians(fixed, a["pde"], a["data"])
        shift = _where(structure.real, structure.ridge**2, 1.0)
        operator = BlockOperator(hess, shift, structure)
        # Preconditioned with the Gauss–Newton blocks `J_k^T J_k` (positive semi-definite
        # whatever the second-order terms; plus the ridge), not the Hessian's own blocks,
        # whose Cholesky fails where the solve stopped short of a minimiser.
        jac = structure.jacobians(fixed, a["pde"], a["data"])
        gauss_newton = BlockOperator(jnp.einsum("kri,krj->kij", jac, jac), shift, structure)
        pre = Preconditioner.of(gauss_newton, fixed.shape[1], preconditioner)

        def linear_solve(mv, b):
            del mv
            if direct:
                return direct_solve(operator, b, positive=False)[0]
            return pcg(operator.mv, b, pre.apply, rtol=rtol, max_steps=inner_max_steps)[0]

        d_weights = -jax.lax.custom_linear_solve(
            operator.mv, rhs.astype(weights.dtype), linear_solve, symmetric=True
        )
        return out, (d_weights, *no_tangents(out[1:]))

    solve.defjvp(solve_jvp, symbolic_zeros=True)
    return solve(dynamic)


def solve_coupled(
    basis: Float[Array, "*grid n_basis"],
    pde: AbstractPDE,
    partition: AbstractPartition,
    grid: Grid,
    data: Any,
    *,
    key,
    init,
    solver,
    rows: Rows,
    max_steps: int,
    dtype,
    throw: bool,
    preconditioner: str,
    rtol: float,
    inner_max_steps: int,
    coarse: int | None = None,
    inner: str = "auto",
    mesh=None,
) -> Solution:
    """The `Coupled` coupling's solve of one sample (`hcmoe.solve` documents the arguments);
    the module docstring describes the method."""
    from ._independent import _checked, _initial_weights, checked_inputs, default_solver

    out_dtype = basis.dtype
    num = partition.num_experts(grid)
    n = basis.shape[-1]
    total = num
    if mesh is not None:
        from ._sharding import EXPERTS, axis_size, padded_size

        total = padded_size(num, axis_size(mesh, EXPERTS))
    finite_basis = jnp.all(jnp.isfinite(basis))
    bad_data = nonfinite_data_entries(data)
    basis = basis.astype(dtype)
    structure, form, problem = build_coupled(
        basis,
        pde,
        partition,
        grid,
        data,
        key=key,
        rows=rows,
        total_experts=total,
        coarse=max(1, -(-num // 4)) if coarse is None else coarse,
    )
    init = _initial_weights(init, num, n, dtype)
    if total > num:
        init = jnp.concatenate([init, jnp.zeros((total - num, n), dtype)])
    if solver is None:
        solver = default_solver(dtype)
    args = dict(structure=structure, pde=pde, data=data, init=init)
    weights, steps, result, inner_steps, inner_residual = coupled_weights(
        args,
        solver=solver,
        max_steps=max_steps,
        ridge_toward=rows.ridge_toward,
        preconditioner=preconditioner,
        rtol=rtol,
        inner_max_steps=inner_max_steps,
        mesh=mesh,
        direct=inner == "direct" or (inner == "auto" and mesh is None and total * n <= DIRECT_MAX),
    )
    weights = checked_inputs(weights, finite_basis, bad_data)
    # Diagnostics per expert: its own rows' residual (with its ridge rows) and condition error.
    center = init if rows.ridge_toward == "init" else None
    frozen = jax.lax.stop_gradient((structure, weights))
    local = frozen[0].local_rows(frozen[1], pde, data)
    ridge_part = frozen[0].ridge_rows(
        frozen[1], None if center is None else jax.lax.stop_gradient(center)
    )
    norms = jnp.sqrt(jnp.sum(local**2, axis=-1) + jnp.sum(ridge_part**2, axis=-1))[:num]
    problems = frozen[0].problems
    cond = jnp.einsum("kci,ki->kc", problems.cond_matrix, frozen[0].gather(frozen[1]))
    cond = cond + problems.cond_offset - problems.cond_target
    cond_error = jnp.max(jnp.where(problems.cond_valid, jnp.abs(cond), 0.0), axis=-1)[:num]
    weights = weights[:num]
    if mesh is not None:
        # Replicated, as `sharded_expert_map` does: left to XLA, a slice of the padded
        # experts can come out tiled in a way jax cannot express on the mesh.
        from ._sharding import P, constrain_to

        weights, norms, cond_error = constrain_to((weights, norms, cond_error), mesh, P())
    finite = jnp.all(jnp.isfinite(norms))
    result = RESULTS.where(
        (result == RESULTS.successful) & ~finite, RESULTS.nonfinite_residual, result
    )
    ok = result == RESULTS.successful
    u = form(weights)
    if throw:
        message = (
            "hcmoe.solve: the coupled experts' constraint solve did not converge (see "
            "Solution.stats with throw=False; stats.messages() says why). Try more "
            "max_steps, a larger hcmoe.Rows(ridge=...), or hcmoe.Coupled(inner_max_steps=...)."
        )
        u = _checked(u, [(~ok, message)])
    stats = SolveStats(
        jnp.broadcast_to(steps, (num,)),
        norms.astype(out_dtype),
        jnp.broadcast_to(ok, (num,)),
        jax.tree.map(lambda x: jnp.broadcast_to(x, (num,)), result),
        cond_error.astype(out_dtype),
        problem.points[:num],
        inner_steps=jnp.broadcast_to(inner_steps, (num,)),
        coupling_residual=jnp.broadcast_to(inner_residual, (num,)).astype(out_dtype),
    )
    solution = Solution(u.astype(out_dtype), weights.astype(out_dtype), stats)
    if mesh is not None:
        from ._sharding import P, constrain_to

        solution = constrain_to(solution, mesh, P())
    return solution
