"""Couplings: how the experts' weights are fitted, and on which devices.

`hcmoe.solve` dispatches on the coupling's type (`AbstractCoupling.solve`); a new way of
fitting the experts is a new coupling, not a new keyword.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import equinox as eqx
from jax.sharding import Mesh

from ._execution import SCHEDULES
from ._grid import Grid
from ._independent import solve_independent
from ._joint import joint_init, windowed_basis
from ._partition import AbstractPartition, as_partition
from ._pde import AbstractPDE
from ._results import Solution
from ._rows import Rows


class AbstractCoupling(eqx.Module):
    """How the experts' weights are fitted (`hcmoe.solve(..., coupling=...)`).

    A coupling is a final class with its settings as fields; `solve` turns one sample's basis
    into a `Solution`. `mesh` (a `jax.sharding.Mesh` or None) says which devices run it:
    `hcmoe.constrain` splits a batch over the mesh's `"batch"` axis whatever the coupling.
    """

    mesh: eqx.AbstractVar[Mesh | None]

    @abc.abstractmethod
    def solve(
        self,
        basis,
        pde: AbstractPDE,
        partition: AbstractPartition,
        grid: Grid,
        data: Any,
        *,
        key,
        init,
        solver,
        rows: Rows,
        adjoint,
        max_steps: int,
        dtype,
        throw: bool,
    ) -> Solution:
        """One sample's solve; the arguments are `hcmoe.solve`'s, checked, with `dtype` the
        dtype of the solve (`precision` resolved). Returns the `Solution` in the basis
        dtype."""

    @property
    def label(self) -> str:
        """A short name for tables and figures, after the method's ("PI-HC-MoE (joint)");
        empty for the paper's independent experts."""
        return ""


class Independent(AbstractCoupling):
    """Every expert fits its own weights to its own block's rows (the paper's PI-HC-MoE):
    `K` small problems, solved side by side and sharded over devices.

    **Arguments:**

    - `schedule`: how the experts' solves run on one device. `"vmap"`: batched, one loop
      for all of them, which iterates until the slowest expert stops; `"map"`: one after the
      other (`jax.lax.map`), each stopping at its own iteration count; `"auto"` (default):
      `"map"` for a nonlinear PDE on CPU when one expert's problem is large (sampled PDE
      rows x basis functions >= 65,536), else `"vmap"`. Results agree to rounding. Not used
      with a `mesh`.
    - `mesh`: a `jax.sharding.Mesh` with an `"experts"` axis (e.g. `hcmoe.expert_mesh()`)
      to shard the experts over devices (vmapped within each; `K` need not divide the
      axis size), and a batch over its `"batch"` axis; None runs on the default device.
    """

    schedule: str = eqx.field(default="auto", static=True)
    mesh: Mesh | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}; got {self.schedule!r}.")
        if self.mesh is not None:
            from ._sharding import check_mesh

            check_mesh(self.mesh)

    def solve(
        self,
        basis,
        pde,
        partition,
        grid,
        data,
        *,
        key,
        init,
        solver,
        rows,
        adjoint,
        max_steps,
        dtype,
        throw,
    ) -> Solution:
        return solve_independent(
            basis,
            pde,
            partition,
            grid,
            data,
            key=key,
            init=init,
            solver=solver,
            rows=rows,
            adjoint=adjoint,
            max_steps=max_steps,
            dtype=dtype,
            throw=throw,
            schedule=self.schedule,
            mesh=self.mesh,
        )


class Joint(AbstractCoupling):
    r"""The weights of all experts minimise the residual of the blended field together.

    The prediction keeps the mixture's form, `u = u_p + sum_k T(phi_k B) w_k` (`phi_k` the
    partition's windows: its partition of unity with `overlap`, else each block's
    indicator), but the `K x N` weights solve one problem: PI-HC on the windowed basis
    `[phi_1 B, ..., phi_K B]` with `K * points_per_expert` PDE points drawn over the whole
    domain. Neighbours agree where their windows overlap because the joint optimum makes
    them. `stats` describe that one solve (leading axis 1). Its cost is one `K N`-unknown
    problem (Gauss–Newton matrix `(K N)^2`) on one device per sample.

    **Arguments:**

    - `mesh`: a `jax.sharding.Mesh` with a `"batch"` axis to split a batch of samples
      over devices (`hcmoe.constrain`; each sample's solve runs on one device, so other
      axes, e.g. `"experts"`, only replicate it); None runs on the default device.
    """

    mesh: Mesh | None = eqx.field(default=None, static=True)

    @property
    def label(self) -> str:
        return "joint"

    def __check_init__(self):
        if self.mesh is not None:
            from ._sharding import BATCH, check_mesh

            check_mesh(self.mesh, BATCH)

    def solve(
        self,
        basis,
        pde,
        partition,
        grid,
        data,
        *,
        key,
        init,
        solver,
        rows,
        adjoint,
        max_steps,
        dtype,
        throw,
    ) -> Solution:
        num_experts = partition.num_experts(grid)
        if num_experts == 1:
            return Independent().solve(
                basis,
                pde,
                partition,
                grid,
                data,
                key=key,
                init=init,
                solver=solver,
                rows=rows,
                adjoint=adjoint,
                max_steps=max_steps,
                dtype=dtype,
                throw=throw,
            )
        points = rows.points_per_expert
        joint_rows = dataclasses.replace(
            rows, points_per_expert=None if points is None else num_experts * int(points)
        )
        joint = solve_independent(
            windowed_basis(basis, partition, grid),
            pde,
            as_partition(None),
            grid,
            data,
            key=key,
            init=joint_init(init, num_experts, basis.shape[-1]),
            solver=solver,
            rows=joint_rows,
            adjoint=adjoint,
            max_steps=max_steps,
            dtype=dtype,
            throw=throw,
        )
        return Solution(joint.u, joint.weights.reshape(num_experts, -1), joint.stats)


class Coupled(AbstractCoupling):
    r"""The joint optimum of `Joint` (all `K x N` weights minimise the residual of the
    blended field together) from per-expert work, shardable over devices.

    Every PDE and condition row belongs to the expert whose block holds it
    (`points_per_expert` points sampled in each block, as `Independent` does); its row sees
    only the weights of the experts whose windows reach it (its neighbours). Each
    Levenberg–Marquardt step solves its Gauss–Newton system by conjugate gradients on the
    experts' local blocks, preconditioned by each expert's own factorised block and a coarse
    correction in the shared-weight subspace (PI-HC's problem); gradients solve the implicit
    function theorem's system the same way. The dense `(K N)^2` matrix is never formed. With
    every grid point (`points_per_expert=None`) it is the same problem as `Joint`'s and
    reaches its minimiser to solver tolerance; with sampled points the points are drawn per
    block instead of over the whole domain.

    Operators without a local stencil (Fourier multipliers, e.g. Navier–Stokes' velocity),
    an exact condition along a split axis, or a PDE that overrides `transform_basis` couple
    every expert to every other: still the joint optimum, at the dense joint's cost.
    Needs `hcmoe.LevenbergMarquardt` (the default solver in float64).

    **Arguments:**

    - `mesh`: a `jax.sharding.Mesh` with an `"experts"` axis (`hcmoe.expert_mesh()`): each
      device holds its experts' rows and blocks (`K` need not divide the axis size; row-less
      experts pad it), a batch is split over `"batch"`; None runs on the default device.
    - `preconditioner`: `"two-level"` (default: block Jacobi plus the coarse correction)
      or `"block-jacobi"` (without it; iterations then grow about as `K^2`).
    - `coarse_modes`: the coarse space's size in modes of `N` weights each: polynomials of
      the experts' block centres up to that count (1: the shared-weight subspace, PI-HC's
      problem). None (default): `ceil(K / 4)`, measured to keep the iterations growing
      about as `K^0.6` (diffusion–sorption, 51 x 512, K = 8 to 64), where one mode grows as
      `K^1.7`.
    - `inner`: how each Gauss–Newton system is solved. `"cg"`: preconditioned conjugate
      gradients on the experts' blocks (per expert and parallel, the `(K N)^2` matrix never
      formed); `"direct"`: that matrix assembled from the experts' local blocks (the
      Jacobian is still never formed) and factorised, exact, `O((K N)^3)`; `"auto"`
      (default): `"direct"` up to `K N = 512` unknowns without a mesh, `"cg"` otherwise.
    - `rtol`: relative residual at which each inner conjugate-gradient solve stops
      (default 1e-10).
    - `inner_max_steps`: the most conjugate-gradient iterations per inner solve (default 200).

    `Solution.stats` are per expert (its own rows' residual and condition error); the solve's
    steps and convergence are repeated for every expert, with `inner_steps` and
    `coupling_residual` of the last Gauss–Newton system.
    """

    mesh: Mesh | None = eqx.field(default=None, static=True)
    preconditioner: str = eqx.field(default="two-level", static=True)
    rtol: float = eqx.field(default=1e-10, static=True)
    inner_max_steps: int = eqx.field(default=200, static=True)
    coarse_modes: int | None = eqx.field(default=None, static=True)
    inner: str = eqx.field(default="auto", static=True)

    @property
    def label(self) -> str:
        return "coupled"

    def __check_init__(self):
        from ._coupled import INNER, PRECONDITIONERS

        if self.inner not in INNER:
            raise ValueError(f"inner: expected one of {INNER}; got {self.inner!r}.")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(
                f"preconditioner: expected one of {PRECONDITIONERS}; got {self.preconditioner!r}."
            )
        if (
            isinstance(self.rtol, bool)
            or not isinstance(self.rtol, (int, float))
            or not (0 < self.rtol < 1)
        ):
            raise ValueError(f"rtol: expected a number in (0, 1); got {self.rtol!r}.")
        steps = self.inner_max_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"inner_max_steps: expected a positive int; got {steps!r}.")
        modes = self.coarse_modes
        if modes is not None and (
            isinstance(modes, bool) or not isinstance(modes, int) or modes < 1
        ):
            raise ValueError(f"coarse_modes: expected a positive int or None; got {modes!r}.")
        if self.mesh is not None:
            from ._sharding import check_mesh

            check_mesh(self.mesh)

    def solve(
        self,
        basis,
        pde,
        partition,
        grid,
        data,
        *,
        key,
        init,
        solver,
        rows,
        adjoint,
        max_steps,
        dtype,
        throw,
    ) -> Solution:
        from ._coupled import solve_coupled

        if adjoint is not None:
            raise ValueError(
                "adjoint: hcmoe.Coupled differentiates by its own implicit adjoint (the "
                "block-preconditioned solve); got "
                f"{type(adjoint).__name__}. Leave adjoint=None, or use hcmoe.Joint()."
            )
        if pde.linear and solver is not None and not isinstance(solver, eqx.Module):
            solver = None
        return solve_coupled(
            basis,
            pde,
            partition,
            grid,
            data,
            key=key,
            init=init,
            solver=solver,
            rows=rows,
            max_steps=max_steps,
            dtype=dtype,
            throw=throw,
            preconditioner=self.preconditioner,
            rtol=self.rtol,
            inner_max_steps=self.inner_max_steps,
            coarse=self.coarse_modes,
            inner=self.inner,
            mesh=self.mesh,
        )


COUPLINGS = {"independent": Independent, "joint": Joint, "coupled": Coupled}


def as_coupling(coupling) -> AbstractCoupling:
    """A coupling object from `solve`'s `coupling` argument (an `AbstractCoupling`, or the
    shorthands `"independent"` / `"joint"` for their defaults)."""
    if isinstance(coupling, AbstractCoupling):
        return coupling
    if isinstance(coupling, str) and coupling in COUPLINGS:
        return COUPLINGS[coupling]()
    raise ValueError(
        "coupling: expected hcmoe.Independent(...), hcmoe.Joint(...), hcmoe.Coupled(...) or one of "
        f"{tuple(COUPLINGS)}; got {coupling!r}."
    )
