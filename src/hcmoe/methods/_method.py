"""The three methods as one model type: `Method`, `make_method`, the backbone input, the
residual weighting, and `predict` on a batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from .._constrain import constrain
from .._grid import Grid
from .._partition import AbstractPartition, as_partition
from .._pde import AbstractPDE, ansatz
from .._results import Solution
from ..models.fno import fno_input


KINDS = ("sc", "hc", "moe")
NAMES = {"sc": "PI-SC", "hc": "PI-HC", "moe": "PI-HC-MoE"}


class InitialConditionInput(eqx.Module):
    """The paper's backbone input: `hcmoe.models.fno_input(grid, data[name])`, i.e. the grid
    coordinates (normalised to `[0, 1]`) and the initial condition broadcast over time.

    **Arguments:**

    - `name`: the entry of the PDE data holding the initial condition (e.g. `"u0"`, `"w0"`).
      None: the data's only entry.
    - `extents`: fixed `(low, high)` per axis name for the normalisation, e.g.
      `{"t": (0.0, 500.0)}`, so that grids covering different spans (train on `t <= 400`,
      predict up to 500) see the same coordinates for the same physical point. Axes not named
      are normalised over the grid's own extent.
    """

    name: str | None = eqx.field(static=True, default=None)
    extents: tuple[tuple[str, tuple[float, float]], ...] = eqx.field(static=True, default=())

    def __init__(self, name: str | None = None, extents=None):
        self.name = name
        self.extents = tuple(
            (str(k), (float(lo), float(hi))) for k, (lo, hi) in dict(extents or {}).items()
        )

    def __call__(self, grid: Grid, data: Mapping[str, ArrayLike]) -> Array:
        name = self.name
        if name is None:
            if not isinstance(data, Mapping) or len(data) != 1:
                got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
                raise ValueError(
                    "inputs: InitialConditionInput() takes the initial condition from data "
                    f"with a single entry; got {got}. Pass InitialConditionInput('u0') to name it."
                )
            (name,) = data
        if name not in data:
            raise ValueError(f"inputs: data has no entry {name!r}; got {sorted(data)}.")
        x = fno_input(grid, data[name])
        for axis_name, (low, high) in self.extents:
            axis = grid.axis(axis_name)
            own_low, own_high = grid.extent(axis_name)
            physical = x[..., axis] * (own_high - own_low) + own_low
            x = x.at[..., axis].set((physical - low) / (high - low))
        return x


class WeightedResidual(AbstractPDE):
    """`pde` with its residual multiplied by `weight`; operators, conditions and ansatz unchanged.

    The weight balances the PDE rows against the condition rows in the constraint solve and
    the residual term against the condition term in the loss. E.g. diffusion–sorption on
    `t in [0, 500]` has residuals of order 1e-3 next to IC/BC residuals of order 1;
    `weight=500` measures time in units of the horizon instead.
    """

    pde: AbstractPDE
    weight: float

    @property
    def linear(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.pde.linear

    def operators(self):
        return self.pde.operators()

    def residual(self, values, coords, data):
        return self.weight * self.pde.residual(values, coords, data)

    def conditions(self, grid, data):
        return self.pde.conditions(grid, data)

    def particular(self, grid, data):
        return self.pde.particular(grid, data)

    def transform_basis(self, basis, grid, data):
        return self.pde.transform_basis(basis, grid, data)

    def residual_mask(self, grid):
        return self.pde.residual_mask(grid)


class Method(eqx.Module):
    """A backbone turned into a PDE solver by PI-SC, PI-HC or PI-HC-MoE (see the module
    docstring). Build it with `make_method`; it is an `eqx.Module` whose only trainable arrays
    are the backbone's.

    `method(data, key=key)` maps one sample's PDE data (e.g. `{"u0": (nx,)}`) to a `Solution`
    on `method.grid`; `grid=` evaluates on another grid (the backbone input is rebuilt there and
    a coordinate `Partition` applies at any resolution). For `"sc"`, `Solution.stats` is None
    and `weights` are the fixed ones.
    """

    kind: str = eqx.field(static=True)
    model: Any
    pde: AbstractPDE
    grid: Grid
    inputs: Callable[[Grid, Any], Array]

    def __call__(
        self,
        data: Any,
        *,
        key: PRNGKeyArray | None = None,
        grid: Grid | None = None,
        **options,
    ) -> Solution:
        """The prediction for one sample's `data` on `grid` (default: the training grid).
        `**options`: solve options for this call only (`hcmoe.solve`'s, e.g.
        `rows=hcmoe.Rows()` to impose the PDE at every point); PI-SC solves nothing and
        takes none."""
        grid = self.grid if grid is None else grid
        x = self.inputs(grid, data)
        if self.kind == "sc":
            if options:
                raise ValueError(
                    f"options: PI-SC ('sc') solves nothing, so solve options do not apply; got "
                    f"{sorted(options)}."
                )
            return self._soft(self.model(x), grid, data)
        return self.model(x, data, key=key, grid=grid, **options)

    def _soft(self, basis: Array, grid: Grid, data: Any) -> Solution:
        grid.check_field(basis, "backbone output", trailing=1)
        transformed, particular, _ = ansatz(self.pde, basis, grid, data)  # exact conditions too
        u = jnp.sum(transformed, axis=-1)
        if particular is not None:
            u = u + jnp.asarray(particular, u.dtype)
        weights = jnp.ones((1, basis.shape[-1]), basis.dtype)
        return Solution(u, weights, None)

    @property
    def name(self) -> str:
        """The paper's name of the method: PI-SC, PI-HC or PI-HC-MoE; "PI-HC-MoE (joint)"
        when the experts' weights are fitted together (`coupling=hcmoe.Joint()`)."""
        options = getattr(self.model, "options", None) or {}
        label = getattr(options.get("coupling"), "label", "")
        return NAMES[self.kind] + (f" ({label})" if self.kind == "moe" and label else "")

    @property
    def backbone(self):
        """The network that outputs the basis functions."""
        return self.model if self.kind == "sc" else self.model.model

    @property
    def partition(self) -> AbstractPartition | None:
        """The experts' partition (None for PI-SC, which solves nothing)."""
        return None if self.kind == "sc" else self.model.partition

    def labels(self, grid: Grid | None = None) -> np.ndarray | None:
        """The expert label of every grid point (None for PI-SC), e.g. for plotting."""
        partition = self.partition
        return None if partition is None else partition.labels(self.grid if grid is None else grid)


def make_method(
    kind: str,
    backbone,
    pde: AbstractPDE,
    grid: Grid,
    partition: AbstractPartition | np.ndarray | None = None,
    *,
    inputs: Callable[[Grid, Any], Array] | None = None,
    residual_weight: float = 1.0,
    **solve_options,
) -> Method:
    """Build PI-SC (`"sc"`), PI-HC (`"hc"`) or PI-HC-MoE (`"moe"`) around a backbone.

    `"hc"` is `hcmoe.constrain(backbone, pde, None)` (one expert) and `"moe"` is
    `hcmoe.constrain(backbone, pde, partition)`; `"sc"` uses the backbone's output directly
    (`u = u_p + T(B) 1`). `partition` and `solve_options` are used only where they apply, so
    one call site can build all three methods with the same arguments.

    **Arguments:**

    - `kind`: `"sc"`, `"hc"` or `"moe"`.
    - `backbone`: an Equinox module mapping `inputs(grid, data)` to basis functions of shape
      `(*grid.shape, n_basis)` (e.g. `hcmoe.models.FNO`).
    - `pde`: an `hcmoe.AbstractPDE`.
    - `grid`: the training grid.
    - `partition`: the experts of `"moe"` (required there; e.g. `hcmoe.Partition(t=1, x=4)`).
      Ignored by `"sc"` and `"hc"`.
    - `inputs`: `inputs(grid, data) -> x`, the backbone input of one sample; default
      `InitialConditionInput()` (the paper's: coordinates and the initial condition).
    - `residual_weight`: multiplies the PDE residual, in the solve and in the loss (see
      `WeightedResidual`); 1 keeps the PDE as it is.
    - `**solve_options`: options of `hcmoe.solve` (`rows`, `solver`, `coupling`,
      `max_steps`, ...) for `"hc"` and `"moe"`; ignored by `"sc"`.

    **Raises:** `ValueError` for an unknown `kind`, a backbone that is not an Equinox module,
    `"moe"` without a partition, or an unknown solve option.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}; got {kind!r}.")
    if not isinstance(backbone, eqx.Module):
        raise ValueError(
            f"backbone: expected an Equinox module; got {type(backbone).__name__}. For Flax "
            "backbones use hcmoe.constrain directly (see examples/flax_nnx_backbone.py)."
        )
    if not isinstance(grid, Grid):
        raise ValueError(f"grid: expected an hcmoe.Grid; got {type(grid).__name__}.")
    if not isinstance(pde, AbstractPDE):
        raise ValueError(f"pde: expected an hcmoe.AbstractPDE; got {type(pde).__name__}.")
    inputs = InitialConditionInput() if inputs is None else inputs
    if residual_weight != 1.0:
        pde = WeightedResidual(pde, float(residual_weight))
    if kind == "sc":
        return Method(kind, backbone, pde, grid, inputs)
    if kind == "moe" and partition is None:
        raise ValueError(
            "partition: 'moe' needs the experts' partition, e.g. hcmoe.Partition(t=1, x=4); "
            "got None (a single expert is 'hc')."
        )
    experts = None if kind == "hc" else as_partition(partition)
    model = constrain(backbone, pde, experts, grid=grid, **solve_options)
    return Method(kind, model, pde, grid, inputs)


def _batch_size(data) -> int:
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jtu.tree_leaves(data)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "data: expected PDE data whose arrays share a leading batch axis; got leading "
            f"sizes {sorted(map(str, sizes))}."
        )
    return cast(int, sizes.pop())  # the one size, not None (checked above)


def predict(
    method: Method,
    data: Any,
    *,
    key: PRNGKeyArray | None = None,
    grid: Grid | None = None,
    **options,
) -> Solution:
    """`method` on a batch of PDE data (leading batch axis); the key is split per sample.
    `**options`: solve options for these calls (see `Method.__call__`)."""
    keys = jr.split(jr.key(0) if key is None else key, _batch_size(data))
    return jax.vmap(lambda d, k: method(d, key=k, grid=grid, **options))(data, keys)
