"""PDEs as linear operators plus a pointwise residual, and their conditions."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from ._grid import Grid
from ._ops import AbstractOperator, FiniteDifference, Identity


class Condition(eqx.Module):
    """`(L u)(points) = target` on one face of the grid (an initial or a boundary condition).

    The face is the set of grid points whose coordinate along `axis` has index `index`
    (0 for the low end, -1 for the high end). `target` broadcasts to the face's shape, i.e.
    `grid.shape` with `axis` removed. The rows of a condition belong to the expert whose block
    holds each face point.

    Build one with `hcmoe.initial`, `hcmoe.dirichlet`, `hcmoe.neumann` or `hcmoe.robin`.
    """

    axis: str = eqx.field(static=True)
    index: int = eqx.field(static=True)
    operator: AbstractOperator
    target: ArrayLike
    weight: float = 1.0
    name: str = eqx.field(static=True, default="condition")

    def face_shape(self, grid: Grid) -> tuple[int, ...]:
        axis = grid.axis(self.axis)
        return grid.shape[:axis] + grid.shape[axis + 1 :]

    def face_index(self, grid: Grid) -> int:
        return grid.boundary_index(self.axis, self.index)

    def target_on_face(self, grid: Grid) -> Array:
        """`target` broadcast to the face, with a clear error when it does not fit."""
        shape = self.face_shape(grid)
        target = jnp.asarray(self.target)
        try:
            return jnp.broadcast_to(target, shape)
        except ValueError:
            raise ValueError(
                f"{self.name} on axis {self.axis!r}: target must broadcast to the face shape "
                f"{shape}; got shape {target.shape}."
            ) from None


def _side_index(side) -> int:
    return {"low": 0, "high": -1}.get(side, side)


def initial(target: ArrayLike, *, axis: str = "t", weight: float = 1.0) -> Condition:
    """`u(t=t_0, ...) = target` (shape: the grid without its time axis, or broadcastable)."""
    return Condition(axis, 0, Identity(), target, weight, name="initial condition")


def dirichlet(axis: str, side, value: ArrayLike, *, weight: float = 1.0) -> Condition:
    """`u = value` on the `side` (`"low"`/`"high"`) face of `axis`."""
    return Condition(axis, _side_index(side), Identity(), value, weight, name="Dirichlet condition")


def neumann(axis: str, side, value: ArrayLike, *, weight: float = 1.0) -> Condition:
    """`du/d(axis) = value` on a face (one-sided differences at the edge)."""
    op = FiniteDifference(axis)
    return Condition(axis, _side_index(side), op, value, weight, name="Neumann condition")


def robin(
    axis: str, side, a: float, b: float, value: ArrayLike, *, weight: float = 1.0
) -> Condition:
    """`a u + b du/d(axis) = value` on a face."""
    op = a * Identity() + b * FiniteDifference(axis)
    return Condition(axis, _side_index(side), op, value, weight, name="Robin condition")


class AbstractPDE(eqx.Module):
    """A PDE `F(L_1 u, ..., L_J u, coords, data) = 0` with linear `L_j` and pointwise `F`.

    Subclass it and implement:

    - `operators()`: a dict `name -> operator` of the linear operators the residual needs
      (e.g. `{"u": ops.Identity(), "u_t": ops.FiniteDifference("t")}`).
    - `residual(values, coords, data)`: the pointwise residual. `values[name]` holds `L_name u`
      at a set of points (any shape), `coords[axis]` the coordinates of those points (same
      shape), `data` the per-sample data passed to `solve`. Return an array of the points'
      shape, or with one extra trailing axis for a system of equations.
    - `conditions(grid, data)` (optional): a sequence of `Condition`s (IC and BCs).
      Periodic axes need none.
    - `linear` (class attribute, default False): True when `F` is affine in the values; the
      solve is then a single linear least-squares solve, no iterations.
    - `particular(grid, data)` and `transform_basis(basis, grid, data)` (optional): an ansatz
      `u = u_p + T(B) w` with a known part `u_p` and a linear map `T` of the basis (default:
      no `u_p`, `T` = identity).

    Physical constants are fields with defaults, so `MyPDE(nu=1e-3)` changes them.
    """

    linear: ClassVar[bool] = False

    @abc.abstractmethod
    def operators(self) -> dict[str, AbstractOperator]:
        """The linear operators whose values `residual` needs, by name."""

    @abc.abstractmethod
    def residual(self, values: dict[str, Array], coords: dict[str, Array], data: Any) -> Array:
        """The pointwise PDE residual at a set of points (see the class docstring)."""

    def conditions(self, grid: Grid, data: Any) -> tuple[Condition, ...]:
        """Initial and boundary conditions; none by default."""
        return ()

    def particular(self, grid: Grid, data: Any) -> Array | None:
        """A known part `u_p` of the solution on the grid, or None (the default)."""
        return None

    def transform_basis(self, basis: Array, grid: Grid, data: Any) -> Array:
        """A linear map of the basis (shape `(*grid.shape, n_basis)`); identity by default."""
        return basis


def require(data: Any, key: str, pde: AbstractPDE):
    """`data[key]`, or a clear error naming the PDE and the missing entry."""
    if not isinstance(data, dict) or key not in data:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"data: {type(pde).__name__} needs data[{key!r}]; got {got}. Pass it as "
            f"`data={{{key!r}: ...}}`."
        )
    return data[key]
