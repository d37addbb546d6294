"""Compile once: the jitted entry points behind `hcmoe.solve` and every `hcmoe.constrain` wrapper.

Tracing a solve (operator stacks, the optimistix loop, the implicit adjoint) takes seconds, so
an eager call must not trace it again. Both entry points are `equinox.filter_jit`-ed: array
leaves (the basis, the data, the key, `init`) are traced; everything else (the PDE's constants,
the grid, the partition, the solver, `points_per_expert`, the mesh) is static and part of the
cache key, so the second eager call with the same configuration costs about what a jitted one
does. Inside an outer `jit`, `vmap` or `grad` the inner jit is simply inlined.

Both also wrap the data in `PDEData`, so a PDE reading a missing `data[key]` gets an error that
names the PDE and the key.
"""

from __future__ import annotations

import functools
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from . import _experts
from ._grid import Grid
from ._partition import as_partition
from ._pdedata import wrap_data
from ._solve import Solution


# The keyword-only options of the core solve (except `key`), read from its signature so the
# wrappers accept exactly what `_experts.solve` does.
SOLVE_OPTIONS = frozenset(
    name
    for name, parameter in inspect.signature(_experts.solve).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "key"
)


_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(_experts.solve).parameters.items()
    if name in SOLVE_OPTIONS
}


def _is_default(name: str, value) -> bool:
    default = _DEFAULTS[name]
    if value is default:
        return True
    plain = (bool, int, float, str)
    return type(value) is type(default) and isinstance(value, plain) and value == default


def check_options(options: dict, where: str) -> dict:
    """The solve options, with a clear error for an unknown name, an unknown schedule or a
    mesh without experts.

    Options equal to the solve's defaults are dropped, so `points_per_expert=None` and no
    option at all are one configuration (one compilation)."""
    unknown = sorted(set(options) - SOLVE_OPTIONS)
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {unknown}; expected any of {sorted(SOLVE_OPTIONS)}."
        )
    if "schedule" in options:
        _experts.resolve_schedule(options["schedule"])  # an unknown schedule fails here
    if options.get("mesh") is not None:
        from ._sharding import check_mesh

        check_mesh(options["mesh"])  # a mesh without an "experts" axis fails here, not later
    return {name: value for name, value in options.items() if not _is_default(name, value)}


def call_options(defaults: dict, overrides: dict) -> dict:
    """The wrap-time options updated by those given at call time (checked the same way)."""
    if not overrides:
        return dict(defaults)  # a plain dict (Linen freezes its attributes): one cache key
    check_options(overrides, "call")
    merged = {**defaults, **overrides}
    return {name: value for name, value in merged.items() if not _is_default(name, value)}


@eqx.filter_jit
def _solve(basis, pde, partition, grid, data, key, options) -> Solution:
    return _experts.solve(basis, pde, partition, grid, wrap_data(data, pde), key=key, **options)


@functools.wraps(_experts.solve)
def solve(basis, pde, partition, grid, data=None, *, key=None, **options) -> Solution:
    options = check_options(options, "solve")
    return _solve(basis, pde, as_partition(partition), grid, data, key, options)


solve.__doc__ = (_experts.solve.__doc__ or "") + """
    **Compilation:** `solve` is jitted (`equinox.filter_jit`) and caches its compilation per
    configuration (PDE constants, grid, partition, options, array shapes), so calling it
    eagerly in a loop compiles once. Under an outer `jit` / `vmap` / `grad` it is inlined.
"""
solve.__module__ = "hcmoe"


@eqx.filter_jit
def constrained_solve(basis, pde, partition, grid: Grid, data, key, options: dict) -> Solution:
    """Solve for one sample, or for a batch when `basis` has one extra leading axis.

    A batched basis `(batch, *grid.shape, N)` is vmapped over its leading axis; every array
    leaf of `data` must then carry the same leading batch axis, and `key` is split per sample.
    Jitted, so the constrained wrappers compile once per configuration.
    """
    if not isinstance(grid, Grid):
        raise ValueError(
            f"grid: expected an hcmoe.Grid (pass grid=... to constrain or to the call); "
            f"got {type(grid).__name__}."
        )
    if basis.ndim == grid.ndim + 1:
        return _experts.solve(basis, pde, partition, grid, wrap_data(data, pde), key=key, **options)
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

    def one(b, d, k):
        return _experts.solve(b, pde, partition, grid, d, key=k, **options)

    data = wrap_data(data, pde)
    mesh = options.get("mesh")
    if mesh is None:
        return jax.vmap(one)(basis, data, keys)
    from ._sharding import batch_map

    return batch_map(one, mesh, basis, data, keys)
