"""Experts fitted jointly: the windows and the windowed basis of the `Joint` coupling.

With `coupling=hcmoe.Joint()` the prediction keeps the mixture's form,
`u = u_p + sum_k T(phi_k B) w_k` (the experts' windows `phi_k` of the partition: its smooth
partition of unity with `overlap`, else the indicator of each block), but the `K x N` weights
minimise the residual of that blended field together, instead of each expert minimising the
residual of its own field `u_p + T(B) w_k` on its block. Neighbours then agree where their
windows overlap because the joint optimum makes them, not by luck of independent solves.

It is PI-HC on the windowed basis `[phi_1 B, ..., phi_K B]` (`K N` functions), with the
experts' PDE points (`K x points_per_expert`, the paper's count) drawn over the whole domain.
The cost is one `K N`-unknown solve (its Gauss–Newton matrix `(K N)^2`) per sample, on one
device (`Joint(mesh=...)` splits only a batch).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._grid import Grid
from ._partition import AbstractPartition


def windows(partition: AbstractPartition, grid: Grid) -> np.ndarray:
    """Each expert's window on `grid`, shape `(K, *grid.shape)`: the partition of unity of an
    overlapping `Partition`, else the indicator of each expert's block. They sum to one."""
    phi = partition.blend(grid)
    return partition.owned(grid).astype(np.float64) if phi is None else np.asarray(phi)


def windowed_basis(basis: Array, partition: AbstractPartition, grid: Grid) -> Array:
    """`[phi_1 B, ..., phi_K B]` along the basis axis: shape `(*grid.shape, K * n_basis)`,
    expert-major (columns `k * n_basis ... (k + 1) * n_basis - 1` belong to expert `k`)."""
    phi = jnp.asarray(windows(partition, grid), basis.dtype)
    stacked = phi[..., None] * basis[None]  # (K, *grid, n)
    return jnp.moveaxis(stacked, 0, -2).reshape(*basis.shape[:-1], -1)


def joint_init(init, num_experts: int, n: int):
    """Initial weights of the joint solve, `(K * n,)`, from `solve`'s `init` (None: ones)."""
    if init is None:
        return None
    init = jnp.asarray(init)
    if init.shape == (n,):
        return jnp.tile(init, num_experts)
    if init.shape == (num_experts, n):
        return init.reshape(-1)
    raise ValueError(
        f"init: expected shape ({n},) or ({num_experts}, {n}); got {tuple(init.shape)}."
    )
