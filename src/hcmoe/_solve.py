"""`hcmoe.solve`, the public entry point, and the jitted solve behind `hcmoe.constrain`.

Tracing a solve (operator stacks, the optimistix loop, the implicit adjoint) takes seconds, so
an eager call must not trace it again. Both entry points are `equinox.filter_jit`-ed: array
leaves (the basis, the data, the key, `init`) are traced; everything else (the PDE's constants,
the grid, the partition, the solver, the rows, the coupling) is static and part of the cache
key, so the second eager call with the same configuration costs about what a jitted one does.
Inside an outer `jit`, `vmap` or `grad` the inner jit is simply inlined.

Both also wrap the data in `PDEData`, so a PDE reading a missing `data[key]` gets an error that
names the PDE and the key.
"""

from __future__ import annotations

import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optimistix as optx
from jaxtyping import Array, Float, PRNGKeyArray

from ._coupling import AbstractCoupling, as_coupling
from ._grid import Grid
from ._jaxlib_check import warn_if_hang_prone
from ._partition import AbstractPartition, as_partition
from ._pde import AbstractPDE
from ._pdedata import wrap_data
from ._results import Solution
from ._rows import Rows


_PRECISIONS = (None, "float64", "float32", "input")

# The keyword options of `solve` (besides `key`) and their defaults, which `constrain` and the
# methods pass on.
_DEFAULTS = dict(
    init=None,
    solver=None,
    rows=Rows(),
    coupling=as_coupling("independent"),
    adjoint=None,
    max_steps=50,
    precision=None,
    throw=False,
)
SOLVE_OPTIONS = tuple(_DEFAULTS)

# Options of hcmoe 0.1, and where they went (a clear error instead of "unknown option").
MOVED_OPTIONS = {
    **{
        name: f"solver=hcmoe.LevenbergMarquardt({name}=...)"
        for name in ("rtol", "atol", "initial_damping", "termination")
    },
    **{
        name: f"rows=hcmoe.Rows({name}=...)"
        for name in ("points_per_expert", "ridge", "ridge_toward", "balance", "condition_scope")
    },
    "schedule": "coupling=hcmoe.Independent(schedule=...)",
    "mesh": "coupling=hcmoe.Independent(mesh=...) (or hcmoe.Joint(mesh=...))",
    "warm_start": "solver=hcmoe.WarmStart(hcmoe.LevenbergMarquardt())",
    "linear_solver": "adjoint=optimistix.ImplicitAdjoint(linear_solver) (and, for a linear "
    "PDE's least-squares solve, solver=<a lineax solver>)",
}


def solve_dtype(precision: str | None, basis_dtype) -> jnp.dtype:
    """The dtype of the constraint solve (see `solve`'s `precision`)."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision: expected one of {_PRECISIONS}; got {precision!r}.")
    x64 = bool(getattr(jax.config, "jax_enable_x64"))
    if precision == "float64" and not x64:
        raise ValueError(
            "precision='float64' needs 64-bit JAX, which is off. Enable it at start-up with "
            "`jax.config.update('jax_enable_x64', True)` or the environment variable "
            "JAX_ENABLE_X64=1, or pass precision='float32' (less accurate constraints)."
        )
    if precision == "float32":
        return jnp.dtype(jnp.float32)
    if precision == "input":
        return jnp.dtype(basis_dtype)
    if not x64:
        _warn_float32_fallback()
    return jnp.dtype(jnp.float64 if x64 else jnp.float32)


class PrecisionWarning(UserWarning):
    """The constraint solve runs in float32 because 64-bit JAX is off."""


_WARNED_FLOAT32 = []


def _warn_float32_fallback() -> None:
    if _WARNED_FLOAT32:
        return
    _WARNED_FLOAT32.append(True)
    warnings.warn(
        "hcmoe.solve: 64-bit JAX is off, so the constraint solve runs in float32 (less "
        "accurate constraints, usually more solver iterations; measured on a user's Burgers "
        "problem: 6.2% vs 5.9% error, 16 LM iterations instead of 6, 3x the time). Enable it "
        "at start-up with jax.config.update('jax_enable_x64', True) or JAX_ENABLE_X64=1, or "
        "pass precision='float32' to choose float32 and silence this warning. Shown once per "
        "process.",
        PrecisionWarning,
        stacklevel=2,
    )


def _check_basis(basis, grid: Grid):
    if not hasattr(basis, "shape") or not hasattr(basis, "dtype"):
        raise ValueError(f"basis: expected an array; got {type(basis).__name__}.")
    grid.check_field(basis, "basis", trailing=1)
    if not jnp.issubdtype(basis.dtype, jnp.floating):
        raise ValueError(f"basis: expected a floating-point array; got dtype {basis.dtype}.")


def _check_options(pde: AbstractPDE, solver, rows, max_steps) -> None:
    if not isinstance(rows, Rows):
        raise ValueError(f"rows: expected an hcmoe.Rows(...); got {type(rows).__name__}.")
    if (
        isinstance(max_steps, bool)
        or not isinstance(max_steps, (int, np.integer))
        or (max_steps < 1)
    ):
        raise ValueError(f"max_steps: expected a positive int; got {max_steps!r}.")
    if solver is None:
        return
    if isinstance(solver, lx.AbstractLinearSolver):
        if not pde.linear:
            raise ValueError(
                f"solver: a lineax solver ({type(solver).__name__}) solves a linear PDE's "
                f"least-squares problem, but {type(pde).__name__} is nonlinear; pass an "
                "optimistix least-squares solver (e.g. hcmoe.LevenbergMarquardt()) or None."
            )
    elif not isinstance(solver, optx.AbstractLeastSquaresSolver):
        raise ValueError(
            "solver: expected an optimistix least-squares solver (e.g. "
            "hcmoe.LevenbergMarquardt(rtol, atol)), a lineax solver for a linear PDE, or "
            f"None; got {type(solver).__name__}."
        )


def _solve(
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
    coupling,
    adjoint,
    max_steps,
    precision,
    throw,
) -> Solution:
    """`solve` without the jit: checks the arguments and dispatches on the coupling."""
    warn_if_hang_prone()
    _check_basis(basis, grid)
    partition = as_partition(partition)
    coupling = as_coupling(coupling)
    _check_options(pde, solver, rows, max_steps)
    dtype = solve_dtype(precision, basis.dtype)
    return coupling.solve(
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
        max_steps=int(max_steps),
        dtype=dtype,
        throw=throw,
    )


@eqx.filter_jit
def _solve_jit(basis, pde, partition, grid, data, key, init, options) -> Solution:
    return _solve(basis, pde, partition, grid, wrap_data(data, pde), key=key, init=init, **options)


def solve(
    basis: Float[Array, "*grid n_basis"],
    pde: AbstractPDE,
    partition: AbstractPartition | np.ndarray | None,
    grid: Grid,
    data: Any = None,
    *,
    key: PRNGKeyArray | None = None,
    init: Array | None = None,
    solver: optx.AbstractLeastSquaresSolver | lx.AbstractLinearSolver | None = None,
    rows: Rows = Rows(),
    coupling: AbstractCoupling | str = "independent",
    adjoint: optx.AbstractAdjoint | None = None,
    max_steps: int = 50,
    precision: str | None = None,
    throw: bool = False,
) -> Solution:
    r"""Make the basis combination satisfy the PDE on every expert's block.

    By default (`coupling="independent"`) each expert `k` solves

    $$w_k = \arg\min_w \|F(A_{k,1} w + c_{k,1}, \dots) \|^2 + \|\text{conditions}\|^2
    + \|\text{ridge}\, w\|^2$$

    where `A_{k,j}` are the rows of `L_j T(B)` at the expert's (sampled) points, and `u =
    u_p + T(B) w_k` on block `k` (blended, `u = u_p + sum_k phi_k T(B) w_k`, for a
    `Partition(..., overlap=...)`). Conditions with `exact=True` are part of the ansatz
    `u_p + T(B) w` (see `hcmoe.Condition`); the others are rows. Gradients with respect to
    `basis` (and `data`, PDE parameters, ...) flow through the solve by the implicit function
    theorem, in forward and reverse mode.

    Settings live on the objects that own them: the solver's tolerances and damping on
    `solver`, the rows' sampling, ridge and weighting on `rows`, how the experts are fitted
    and on which devices on `coupling` (the docs' how-to-choose.md#coupling compares them).

    **Arguments:**

    - `basis`: the backbone's basis functions, shape `(*grid.shape, n_basis)`.
    - `pde`: an `hcmoe.AbstractPDE`.
    - `partition`: `hcmoe.Partition(...)`, an integer label array of `grid.shape`, or None for
      a single expert (PI-HC).
    - `grid`: the `hcmoe.Grid` the basis lives on.
    - `data`: per-sample data for the PDE's residual and conditions (e.g. `{"u0": ...}`).
      Entries shaped like the grid reach `residual` gathered at the sampled points.
    - `key`: PRNG key, needed when `rows.points_per_expert` samples points.
    - `init`: initial weights, shape `(n_basis,)` or `(K, n_basis)`; default ones (paper).
    - `solver`: any optimistix least-squares solver. Default None: `hcmoe.LevenbergMarquardt()`
      in float64 (normal-equation steps, rtol = atol = 1e-4), `optimistix.LevenbergMarquardt`
      (QR) in float32. `hcmoe.WarmStart(solver)` starts it from a Gauss–Newton step. For a
      linear PDE (`pde.linear`: one least-squares solve, no iterations) a lineax solver may
      be given instead (default `lineax.QR()`); an optimistix solver is then not used.
    - `rows`: an `hcmoe.Rows`: PDE points per expert, ridge, condition weighting and scope.
    - `coupling`: `hcmoe.Independent(schedule, mesh)` (default, the paper: each expert its
      own problem, sharded over a mesh's `"experts"` axis) or `hcmoe.Joint(mesh)` (one
      problem for all experts' weights); the strings `"independent"` and `"joint"` stand for
      their defaults.
    - `adjoint`: None (default): hcmoe's implicit adjoint for nonlinear PDEs, the same
      equation as `optimistix.ImplicitAdjoint` taken through each expert's field
      `T(B) w + u_p`, so the gradient never holds the `points x n_basis` operator stacks
      (gradients agree with optimistix's to rounding); lineax's differentiable solve for
      linear PDEs. Otherwise an optimistix adjoint, used as given (e.g.
      `optimistix.ImplicitAdjoint(lineax.LU())`).
    - `max_steps`: iteration cap of the nonlinear solve (paper: 50).
    - `precision`: dtype of the solve. None (default): float64 when x64 is on, else float32;
      `"float64"`: float64, an error if x64 is off; `"float32"`; `"input"`: the basis dtype.
      The solution is cast back to the basis dtype.
    - `throw`: raise (via `equinox.error_if`, under jit too) when an expert does not converge.
      By default failures are only reported in `Solution.stats` (`stats.messages()`).

    **Returns:** a `Solution` with `u`, `weights` (`(K, n_basis)`) and `stats`.

    **Raises:** `ValueError` at trace time for a basis whose shape does not match the grid, an
    unknown partition axis, more experts than points, missing data, an option of the wrong
    type, or float64 without x64. At run time (`equinox.error_if`) for a non-finite basis,
    and with `throw=True` for a non-converged expert.

    **Warns:** `hcmoe.JaxlibHangWarning`, once per process, on CPU with a jaxlib whose batched
    linear algebra can hang (0.10.0-0.11.0).

    **Compilation:** `solve` is jitted (`equinox.filter_jit`) and caches its compilation per
    configuration (PDE constants, grid, partition, options, array shapes), so calling it
    eagerly in a loop compiles once. Under an outer `jit` / `vmap` / `grad` it is inlined.
    """
    options = dict(
        solver=solver,
        rows=rows,
        coupling=as_coupling(coupling),
        adjoint=adjoint,
        max_steps=max_steps,
        precision=precision,
        throw=throw,
    )
    return _solve_jit(basis, pde, as_partition(partition), grid, data, key, init, options)


def check_options(options: dict, where: str, drop_defaults: bool = True) -> dict:
    """The solve options of `constrain` / the methods, checked: an unknown name is an error
    (naming the new home of an hcmoe 0.1 option), and the coupling string becomes its
    object. Options equal to the defaults are dropped (one configuration, one compilation)."""
    for name in options:
        if name in MOVED_OPTIONS:
            raise ValueError(
                f"{where}: the option {name!r} moved in hcmoe 0.2: pass "
                f"{MOVED_OPTIONS[name]} (see CHANGELOG.md, 'Migration')."
            )
    unknown = sorted(set(options) - set(SOLVE_OPTIONS))
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {unknown}; expected any of {list(SOLVE_OPTIONS)}."
        )
    checked = dict(options)
    if "coupling" in checked:
        checked["coupling"] = as_coupling(checked["coupling"])
    if "rows" in checked and not isinstance(checked["rows"], Rows):
        raise ValueError(
            f"{where}: rows: expected an hcmoe.Rows(...); got {type(checked['rows']).__name__}."
        )
    if not drop_defaults:
        return checked
    return {name: value for name, value in checked.items() if not _same(value, _DEFAULTS[name])}


def _same(value, default) -> bool:
    if value is default:
        return True
    if isinstance(value, jax.Array) or isinstance(default, jax.Array):
        return False
    try:
        return type(value) is type(default) and bool(value == default)
    except (TypeError, ValueError):  # an object whose == is not a plain bool (arrays inside)
        return False


def call_options(defaults: dict, overrides: dict) -> dict:
    """The wrap-time options updated by those given at call time (checked the same way)."""
    if not overrides:
        return dict(defaults)  # a plain dict (Linen freezes its attributes): one cache key
    # An override equal to a default still replaces the wrap-time value (e.g. `rows=Rows()`,
    # every point, over a wrap-time `Rows(points_per_expert=...)`).
    merged = {**defaults, **check_options(overrides, "call", drop_defaults=False)}
    return check_options(merged, "call")


@eqx.filter_jit
def constrained_solve(
    basis, pde, partition, grid: Grid | None, data, key, options: dict
) -> Solution:
    """Solve for one sample, or for a batch when `basis` has one extra leading axis.

    A batched basis `(batch, *grid.shape, N)` is vmapped over its leading axis; every array
    leaf of `data` must then carry the same leading batch axis, and `key` is split per sample.
    With a coupling's `mesh`, the batch is split over its `"batch"` axis. Jitted, so the
    constrained wrappers compile once per configuration.
    """
    if not isinstance(grid, Grid):
        raise ValueError(
            f"grid: expected an hcmoe.Grid (pass grid=... to constrain or to the call); "
            f"got {type(grid).__name__}."
        )
    full = {**_DEFAULTS, **options}
    init = full.pop("init")

    def one(b, d, k):
        return _solve(b, pde, partition, grid, d, key=k, init=init, **full)

    if basis.ndim == grid.ndim + 1:
        return one(basis, wrap_data(data, pde), key)
    if basis.ndim != grid.ndim + 2:
        raise ValueError(
            f"backbone output: expected shape {grid.shape} + (n_basis,) or a batch of those "
            f"(batch, *{grid.shape}, n_basis); got {tuple(basis.shape)}."
        )
    batch = basis.shape[0]
    for leaf in jax.tree_util.tree_leaves(data):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
            raise ValueError(
                f"data: the backbone returned a batch of {batch} bases, so every data entry "
                f"needs a leading batch axis of {batch}; got an entry of shape {jnp.shape(leaf)}."
            )
    keys = None if key is None else jr.split(key, batch)
    data = wrap_data(data, pde)
    mesh = full["coupling"].mesh
    if mesh is None:
        return jax.vmap(one)(basis, data, keys)
    from ._sharding import batch_map

    return batch_map(one, mesh, basis, data, keys)
