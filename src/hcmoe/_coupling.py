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


COUPLINGS = {"independent": Independent, "joint": Joint}


def as_coupling(coupling) -> AbstractCoupling:
    """A coupling object from `solve`'s `coupling` argument (an `AbstractCoupling`, or the
    shorthands `"independent"` / `"joint"` for their defaults)."""
    if isinstance(coupling, AbstractCoupling):
        return coupling
    if isinstance(coupling, str) and coupling in COUPLINGS:
        return COUPLINGS[coupling]()
    raise ValueError(
        "coupling: expected hcmoe.Independent(...), hcmoe.Joint(...) or one of "
        f"{tuple(COUPLINGS)}; got {coupling!r}."
    )
