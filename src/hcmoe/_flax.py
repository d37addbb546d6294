"""Flax adapters for `hcmoe.constrain` (imported only when a Flax model is wrapped)."""

from __future__ import annotations

from typing import Any

import flax.linen as linen
from flax import nnx

from ._grid import Grid
from ._results import Solution
from ._solve import call_options, constrained_solve


class ConstrainedNNX(nnx.Module):
    """A Flax NNX backbone wrapped by the hard-constraint layer.

    `m(x, data, key=k, **options)` returns an `hcmoe.Solution` (call-time solve options
    override the wrap-time ones; the solve is compiled once per configuration, the backbone
    runs as Flax runs it). The backbone is the attribute `model`, so `nnx.grad`, `nnx.jit` and
    `nnx.Optimizer(m, ...)` see exactly its parameters.
    """

    def __init__(self, model: nnx.Module, pde, partition, grid: Grid | None, options: dict):
        self.model = model
        self.pde = nnx.static(pde)
        self.partition = nnx.static(partition)
        self.grid = nnx.static(grid)
        self.options = nnx.static(options)

    def __call__(self, x, data=None, *, key=None, grid: Grid | None = None, **options) -> Solution:
        basis = self.model(x)
        grid = self.grid if grid is None else grid
        options = call_options(self.options, options)
        return constrained_solve(basis, self.pde, self.partition, grid, data, key, options)


class ConstrainedLinen(linen.Module):
    """A Flax Linen backbone wrapped by the hard-constraint layer.

    `params = m.init(rng, x, data)`; `m.apply(params, x, data, key=k, **options)` returns an
    `hcmoe.Solution` (call-time solve options override the wrap-time ones). The parameters are
    the backbone's, under the name `backbone`.
    """

    backbone: linen.Module
    pde: Any
    partition: Any
    grid: Any
    options: Any

    @linen.compact
    def __call__(self, x, data=None, *, key=None, grid: Grid | None = None, **options) -> Solution:
        basis = self.backbone(x)
        grid = self.grid if grid is None else grid
        options = call_options(self.options, options)
        return constrained_solve(basis, self.pde, self.partition, grid, data, key, options)
