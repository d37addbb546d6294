"""PDEs as linear operators plus a pointwise residual, and their conditions."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from ._grid import Grid
from ._operators import AbstractOperator, FiniteDifference, Identity


class Condition(eqx.Module):
    """`(L u)(points) = target` on one face of the grid (an initial or a boundary condition).

    The face is the set of grid points whose coordinate along `axis` has index `index`
    (0 for the low end, -1 for the high end). `target` broadcasts to the face's shape, i.e.
    `grid.shape` with `axis` removed.

    How a condition is honoured:

    - `exact=True` (only for value conditions, `initial` and `dirichlet`): satisfied by
      construction. The ansatz becomes `u <- u + (1 - d) (g - u|face)` with `d` the normalised
      distance to the face (0 on it, 1 at the far end) and `u|face` the trace extended across
      the axis, so `u = g` on the face for every `w` (exact to rounding), in PI-SC, PI-HC and
      PI-HC-MoE alike. Several exact faces compose; each stays exact where their targets agree
      at shared corners (otherwise the later condition wins on the shared points).
    - otherwise, least-squares rows in the constraint solve: `weight * (L u - target)` at every
      face point. `scope="owned"` gives each row only to the expert(s) whose PDE rows hold that
      point; `scope="global"` gives every expert every row of the condition (the paper's
      release for diffusion–sorption), so an expert whose block touches no boundary still meets
      the conditions with its own weights. `hcmoe.Rows(condition_scope=...)` overrides it.

    `weight` has one meaning everywhere: the objective is
    `mean_pde(F^2) + sum_c weight_c^2 mean_face_c((L_c u - g_c)^2)`, in every expert's solve
    (over its rows; see `solve`'s `balance`) and in `hcmoe.losses` (over the whole grid).
    `weight` may be an array broadcasting to the face (per-point weights).

    Build one with `hcmoe.initial`, `hcmoe.dirichlet`, `hcmoe.neumann` or `hcmoe.robin`.
    """

    axis: str = eqx.field(static=True)
    index: int = eqx.field(static=True)
    operator: AbstractOperator
    target: ArrayLike
    weight: ArrayLike = 1.0
    name: str = eqx.field(static=True, default="condition")
    scope: str = eqx.field(static=True, default="owned")
    exact: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"{self.name}: scope must be one of {SCOPES}; got {self.scope!r}.")
        if self.exact and not isinstance(self.operator, Identity):
            raise ValueError(
                f"{self.name}: exact=True is available for value conditions (initial, "
                "dirichlet) only; derivative conditions are least-squares rows."
            )

    def weight_on_face(self, grid: Grid) -> Array:
        """`weight` broadcast to the face (per-point weights)."""
        return self._on_face(grid, self.weight, "weight must be a scalar or")

    def face_shape(self, grid: Grid) -> tuple[int, ...]:
        axis = grid.axis(self.axis)
        return grid.shape[:axis] + grid.shape[axis + 1 :]

    def face_index(self, grid: Grid) -> int:
        return grid.boundary_index(self.axis, self.index)

    def target_on_face(self, grid: Grid) -> Array:
        """`target` broadcast to the face, with a clear error when it does not fit."""
        return self._on_face(grid, self.target, "target must")

    def _on_face(self, grid: Grid, value, requirement: str) -> Array:
        shape = self.face_shape(grid)
        value = jnp.asarray(value)
        try:
            return jnp.broadcast_to(value, shape)
        except ValueError:
            raise ValueError(
                f"{self.name} on axis {self.axis!r}: {requirement} broadcast to the face shape "
                f"{shape}; got shape {value.shape}."
            ) from None


SCOPES = ("owned", "global")


def _side_index(side) -> int:
    """The face index of `side`: `"low"` (0), `"high"` (-1), or an int index; anything else
    (e.g. `"right"`) is a clear error rather than a face of its own."""
    if isinstance(side, str):
        if side not in ("low", "high"):
            raise ValueError(
                f"side: expected 'low', 'high' or an int index of the axis; got {side!r}."
            )
        return {"low": 0, "high": -1}[side]
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)):
        raise ValueError(f"side: expected 'low', 'high' or an int index of the axis; got {side!r}.")
    return int(side)


def initial(
    target: ArrayLike,
    *,
    axis: str = "t",
    weight: ArrayLike = 1.0,
    scope: str = "owned",
    exact: bool = False,
) -> Condition:
    """`u(t=t_0, ...) = target` (shape: the grid without its time axis, or broadcastable).

    `exact=True` builds it into the ansatz (satisfied by construction); see `Condition`."""
    return Condition(
        axis, 0, Identity(), target, weight, name="initial condition", scope=scope, exact=exact
    )


def dirichlet(
    axis: str,
    side,
    value: ArrayLike,
    *,
    weight: ArrayLike = 1.0,
    scope: str = "owned",
    exact: bool = False,
) -> Condition:
    """`u = value` on the `side` (`"low"`/`"high"`) face of `axis`; `exact=True`: by
    construction (see `Condition`)."""
    return Condition(
        axis,
        _side_index(side),
        Identity(),
        value,
        weight,
        name="Dirichlet condition",
        scope=scope,
        exact=exact,
    )


def neumann(
    axis: str, side, value: ArrayLike, *, weight: ArrayLike = 1.0, scope: str = "owned"
) -> Condition:
    """`du/d(axis) = value` on a face (one-sided differences at the edge)."""
    op = FiniteDifference(axis)
    return Condition(
        axis, _side_index(side), op, value, weight, name="Neumann condition", scope=scope
    )


def robin(
    axis: str,
    side,
    a: float,
    b: float,
    value: ArrayLike,
    *,
    weight: ArrayLike = 1.0,
    scope: str = "owned",
) -> Condition:
    """`a u + b du/d(axis) = value` on a face."""
    op = a * Identity() + b * FiniteDifference(axis)
    return Condition(
        axis, _side_index(side), op, value, weight, name="Robin condition", scope=scope
    )


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
      no `u_p`, `T` = identity). Conditions with `exact=True` are built in on top of it.
    - `residual_mask(grid)` (optional): a boolean NumPy array of `grid.shape`, where the PDE
      is imposed (PDE rows are drawn from there and `hcmoe.losses` measure the residual
      there); None (default) means everywhere. E.g. leave out an initial layer that the grid
      does not resolve.

    Physical constants are fields with defaults, so `MyPDE(nu=1e-3)` changes them.
    """

    linear: ClassVar[bool] = False

    @abc.abstractmethod
    def operators(self) -> dict[str, AbstractOperator]:
        """The linear operators whose values `residual` needs, by name."""

    @abc.abstractmethod
    def residual(self, values: dict[str, Array], coords: dict[str, Array], data: Any) -> Array:
        """The pointwise PDE residual at a set of points (see the class docstring).

        Everything it sees is a point array: `values[name]` holds `L u` at the sampled points
        (shape `(m,)`), `coords[axis]` their coordinates, and `data` entries shaped like the
        grid arrive gathered at the same points. Other entries arrive as given (scalars,
        parameter vectors); one shaped like a field over only some grid axes (e.g. `(nx,)` on
        a `(nt, nx)` grid) is an error at trace time, since it cannot line up with the
        points: broadcast it to the grid's shape first."""

    def conditions(self, grid: Grid, data: Any) -> tuple[Condition, ...]:
        """Initial and boundary conditions; none by default."""
        return ()

    def particular(self, grid: Grid, data: Any) -> Array | None:
        """A known part `u_p` of the solution on the grid, or None (the default)."""
        return None

    def transform_basis(self, basis: Array, grid: Grid, data: Any) -> Array:
        """A linear map of the basis (shape `(*grid.shape, n_basis)`); identity by default."""
        return basis

    def residual_mask(self, grid: Grid):
        """Where the PDE is imposed (boolean NumPy array of `grid.shape`), or None: everywhere."""
        return None


def residual_mask(pde: AbstractPDE, grid: Grid) -> np.ndarray | None:
    """`pde.residual_mask(grid)`, checked (concrete boolean array of `grid.shape`, not empty)."""
    mask = pde.residual_mask(grid)
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != grid.shape or mask.dtype != bool:
        raise ValueError(
            f"{type(pde).__name__}.residual_mask(grid): expected a boolean NumPy array of shape "
            f"{grid.shape}; got dtype {mask.dtype} and shape {mask.shape}."
        )
    if not mask.any():
        raise ValueError(f"{type(pde).__name__}.residual_mask(grid) excludes every grid point.")
    return mask


def _face_distance(grid: Grid, cond: Condition) -> np.ndarray:
    """Normalised distance to the condition's face along its axis: 0 on it, 1 at the far end;
    shaped `(1, .., n_axis, .., 1)` to broadcast against fields of `grid.shape`."""
    axis = grid.axis(cond.axis)
    x = grid.coords(cond.axis)
    d = np.abs(x - x[cond.face_index(grid)])
    d = d / d.max()
    shape = [1] * grid.ndim
    shape[axis] = d.size
    return d.reshape(shape)


def ansatz(pde: AbstractPDE, basis: Array, grid: Grid, data: Any):
    """The affine ansatz `u = particular + transformed @ w` with the exact conditions built in.

    Returns `(transformed, particular, conditions)`: `T(B)` (shape of `basis`), `u_p` (grid
    shape, or None) and every condition of the PDE (those without `exact` remain
    least-squares rows).
    """
    transformed = pde.transform_basis(basis, grid, data)
    grid.check_field(transformed, "pde.transform_basis(basis)", trailing=1)
    particular = pde.particular(grid, data)
    if particular is not None:
        grid.check_field(particular, "pde.particular()", trailing=0)
        particular = jnp.asarray(particular, basis.dtype)
    conditions = tuple(pde.conditions(grid, data))
    for cond in conditions:
        if not isinstance(cond, Condition):
            raise ValueError(
                f"{type(pde).__name__}.conditions(): expected hcmoe.Condition objects (from "
                f"hcmoe.initial, dirichlet, neumann, robin); got {type(cond).__name__}."
            )
        if not cond.exact:
            continue
        axis, face = grid.axis(cond.axis), cond.face_index(grid)
        ramp = jnp.asarray(1.0 - _face_distance(grid, cond), basis.dtype)
        target = jnp.expand_dims(cond.target_on_face(grid).astype(basis.dtype), axis)
        trace = jnp.take(transformed, jnp.array([face]), axis=axis)
        transformed = transformed - ramp[..., None] * trace
        if particular is None:
            particular = jnp.zeros(grid.shape, basis.dtype)
        trace = jnp.take(particular, jnp.array([face]), axis=axis)
        particular = particular + ramp * (target - trace)
    return transformed, particular, conditions


def require(data: Any, key: str, pde: AbstractPDE):
    """`data[key]`, or a clear error naming the PDE and the missing entry."""
    if not isinstance(data, dict) or key not in data:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"data: {type(pde).__name__} needs data[{key!r}]; got {got}. Pass it as "
            f"`data={{{key!r}: ...}}`."
        )
    return data[key]
