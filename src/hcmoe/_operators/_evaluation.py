"""Evaluating several operators at sampled points at once: one gather-and-contract scan for
the local stencils, one real FFT shared by the Fourier multipliers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from .._grid import Grid
from ._base import AbstractOperator, _contract, flat_field
from ._spectral import _irfft, _rfft


def _contract_many(flat: Array, stencils: Sequence[tuple[Array, Array]]) -> list[Array]:
    """`_contract` of several `(neighbours, weights)` stencils (any point shapes, any widths)
    of the same field in one scan: rows concatenated, narrower stencils padded with zero
    weights. One scan means one cotangent accumulator for all of them."""
    width = max(neighbours.shape[-1] for neighbours, _ in stencils)
    rows, neighbour_rows, weight_rows = [], [], []
    for neighbours, weights in stencils:
        neighbours = jnp.reshape(neighbours, (-1, neighbours.shape[-1]))
        weights = jnp.reshape(weights, (-1, weights.shape[-1]))  # cast in `_contract`
        pad = ((0, 0), (0, width - neighbours.shape[-1]))
        neighbour_rows.append(jnp.pad(neighbours, pad))  # padded columns read row 0 ...
        weight_rows.append(jnp.pad(weights, pad))  # ... with weight 0
        rows.append(neighbours.shape[0])
    values = _contract(flat, jnp.concatenate(neighbour_rows), jnp.concatenate(weight_rows))
    pieces = jnp.split(values, np.cumsum(rows)[:-1].tolist())
    return [
        piece.reshape(neighbours.shape[:-1] + flat.shape[1:])
        for piece, (neighbours, _) in zip(pieces, stencils)
    ]


def whole_grid_values(
    requests: Sequence[tuple[AbstractOperator, ArrayLike]], field: Array, grid: Grid
) -> dict[int, Array]:
    """`{i: op(field)}` on the whole grid, flattened to `(grid.size, *trailing)`, for the
    requests whose operator is a Fourier multiplier (from one shared real FFT of `field`):
    what `evaluate_at_points(..., whole=...)` then only gathers. Computed once, it serves
    requests at other points of the same field (e.g. each expert's rows in turn).

    Other whole-grid operators (`Compose`, `Linear`) are left out on purpose: gathered right
    after they are applied, XLA fuses the two and computes only the rows gathered (measured:
    `Compose` of two x-differences, 101 x 1024 x 16, 20k rows: 15 ms with the gather, 23 ms
    for the whole grid alone); an FFT cannot be fused that way."""
    whole, spectral = {}, []
    for i, (op, _) in enumerate(requests):
        symbol = op.fourier_symbol(grid)
        if symbol is not None:
            spectral.append((i, symbol))
    if spectral:
        names = tuple(a for a in grid.names if any(a in axes for _, (axes, _) in spectral))
        spectrum = _rfft(field, grid, names)
        for i, (_, symbol) in spectral:
            whole[i] = flat_field(_irfft(spectrum, symbol, grid, names, field), grid)
    return whole


def evaluate_at_points(
    requests: Sequence[tuple[AbstractOperator, ArrayLike]],
    field: Array,
    grid: Grid,
    whole: Mapping[int, Array] | None = None,
) -> list[Array]:
    """`[op.at_points(field, grid, points) for op, points in requests]`, computed together:
    every local stencil (`point_stencil`) in one gather-and-contract pass (one cotangent
    buffer in the gradient), every Fourier multiplier from one shared real FFT of `field`
    (each then one inverse FFT, gathered), the rest applied on the whole grid and gathered.
    `whole`: `whole_grid_values` of the same field and operators, already computed; the
    requests it holds are gathered from it.
    """
    out: list[Array | None] = [None] * len(requests)
    local, spectral = [], []
    for i, (op, points) in enumerate(requests):
        if whole is not None and i in whole:
            out[i] = whole[i][jnp.asarray(points)]
            continue
        symbol = op.fourier_symbol(grid)
        if symbol is not None:
            spectral.append((i, symbol))
            continue
        stencil = op.point_stencil(grid, points)
        if stencil is None:
            out[i] = op.at_points(field, grid, points)
        else:
            local.append((i, stencil))
    if spectral:
        names = tuple(a for a in grid.names if any(a in axes for _, (axes, _) in spectral))
        spectrum = _rfft(field, grid, names)
        for i, (_, symbol) in spectral:
            values = _irfft(spectrum, symbol, grid, names, field)
            out[i] = flat_field(values, grid)[jnp.asarray(requests[i][1])]
    if local:
        values = _contract_many(flat_field(field, grid), [stencil for _, stencil in local])
        for (i, _), value in zip(local, values):
            out[i] = value
    return cast(list[Array], out)  # every request's entry is filled above


def evaluate_at_expert_points(
    requests: Sequence[tuple[AbstractOperator, ArrayLike]], fields: Array, grid: Grid
) -> list[Array]:
    """`evaluate_at_points` of each expert's requests on its own field, for every expert at
    once: `fields` has shape `(*grid.shape, K)` (expert `k`'s field in `fields[..., k]`) and
    each request's points `(K, *p)`; returns one `(K, *p)` array per request.

    Equal to `jax.vmap(evaluate_at_points)` over the experts, without its batched gathers:
    XLA:CPU expands a gather (and the scatter of its transpose) whose operand and indices
    both carry the experts' axis into index tuples built at run time (measured at 10^5
    points, K = 4: 7 of a 30 ms backward). Here the fields are flattened to
    `grid.size * K` numbers and every local stencil of every expert is read by one plain
    gather at `neighbour * K + k`; Fourier multipliers share one real FFT of all the fields,
    other operators run on the whole grid with the experts as a trailing axis."""
    num = fields.shape[-1]
    flat = jnp.reshape(fields, (-1,))
    expert = jnp.arange(num, dtype=jnp.int32)
    whole = whole_grid_values(requests, fields, grid)
    out: list[Array | None] = [None] * len(requests)
    local = []
    wide = grid.size * num >= 2**31  # flat indices into `fields` past int32
    for i, (op, points) in enumerate(requests):
        points = jnp.asarray(points)
        if wide:
            points = points.astype(jnp.int64)
        offset = expert.reshape((num,) + (1,) * (points.ndim - 1)).astype(points.dtype)
        stencil = None if i in whole else op.point_stencil(grid, points)
        if stencil is not None:
            neighbours, weights = stencil
            local.append((i, (neighbours * num + offset[..., None], weights)))
            continue
        values = whole[i] if i in whole else flat_field(op(fields, grid), grid)
        out[i] = jnp.reshape(values, (-1,))[points * num + offset]
    if local:  # one gather (one scatter in the transpose) for all of them
        values = _contract_many(flat, [stencil for _, stencil in local])
        for (i, _), value in zip(local, values):
            out[i] = value
    return cast(list[Array], out)  # every request's entry is filled above


def operators_at_points(
    operators: Mapping[str, AbstractOperator], field: Array, grid: Grid, points
) -> dict[str, Array]:
    """`{name: op.at_points(field, grid, points)}`, through `evaluate_at_points` (one pass
    for the local stencils, one real FFT shared by the Fourier multipliers)."""
    names = list(operators)
    values = evaluate_at_points([(operators[name], points) for name in names], field, grid)
    return dict(zip(names, values))
