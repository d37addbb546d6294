"""Experts and batches across devices and hosts: the only module that knows about devices.

Everything here is plain `jax.sharding`: a `Mesh` with the axes `("batch", "experts")`, and
`NamedSharding` constraints that split the expert-stacked problems over `"experts"` and a batch
over `"batch"`; XLA's partitioner then runs each device's slab of the vmapped solves (the
LAPACK/cuSOLVER calls are batch-partitionable, the solver loop only all-reduces its stopping
test). Across hosts the same code runs under `jax.distributed.initialize()` with a mesh over
`jax.devices()` (every process's devices); JAX's multi-process runtime moves the data.

Why constraints rather than `jax.shard_map`: lineax (inside optimistix's solvers) compares
array structures that, inside a `shard_map`, carry the manual mesh on one side only, and
fails with "pytree does not match out_structure" (lineax issue #185).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


EXPERTS = "experts"
BATCH = "batch"


def expert_mesh(
    num_devices: int | None = None,
    *,
    batch: int = 1,
    # `jax.Device` is the public name of the device class; pyright sees the re-export
    # `Device = _xc.Device` as a variable.
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
) -> Mesh:
    """A `Mesh` with axes `("batch", "experts")` for `hcmoe.Independent(mesh=...)`.

    The devices are laid out as a `(batch, num_devices // batch)` grid: the samples of a batch
    are split over the first axis, the experts of each sample over the second. Any number of
    experts and any batch size fit any mesh: copies of a real expert (or sample) fill the
    last devices and are dropped from the results.

    **Arguments:**

    - `num_devices`: how many devices to use; default all of `devices`.
    - `batch`: size of the `"batch"` axis; must divide `num_devices`. Default 1 (every device
      on `"experts"`).
    - `devices`: where to take them from; default `jax.devices()`, which after
      `jax.distributed.initialize()` lists every process's devices (a global mesh).

    **Returns:** a `jax.sharding.Mesh` of shape `{"batch": batch, "experts": num_devices //
    batch}`.

    **Raises:** `ValueError` when `num_devices` or `batch` is not a positive int, when more
    devices are asked for than there are, or when `batch` does not divide `num_devices`.

    !!! example

        ```python
        mesh = hcmoe.expert_mesh()          # all devices on "experts"
        mesh = hcmoe.expert_mesh(batch=2)   # 2 sample groups x (devices / 2) expert slabs
        sol = hcmoe.solve(basis, pde, hcmoe.Partition(x=8), grid, data,
                           coupling=hcmoe.Independent(mesh=mesh))
        ```
    """
    pool = list(jax.devices() if devices is None else devices)
    if num_devices is None:
        num_devices = len(pool)
    _check_positive(num_devices, "num_devices")
    _check_positive(batch, "batch")
    if num_devices > len(pool):
        raise ValueError(
            f"num_devices: asked for {num_devices} devices but only {len(pool)} are available. "
            "On CPU, fake more with XLA_FLAGS=--xla_force_host_platform_device_count=N set "
            "before jax starts."
        )
    if num_devices % batch:
        raise ValueError(
            f"batch: the batch axis size must divide num_devices={num_devices}; got {batch}."
        )
    layout = np.empty(num_devices, dtype=object)
    layout[:] = pool[:num_devices]
    return Mesh(layout.reshape(batch, num_devices // batch), (BATCH, EXPERTS))


def _check_positive(value, name: str):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int; got {value!r}.")


def check_mesh(mesh, axis: str = EXPERTS) -> Mesh:
    """`mesh` itself, or a `ValueError` naming the missing axis and listing the mesh's axes."""
    if not isinstance(mesh, Mesh):
        raise ValueError(
            "mesh: expected a jax.sharding.Mesh (e.g. hcmoe.expert_mesh()); got "
            f"{type(mesh).__name__}."
        )
    if axis not in mesh.axis_names:
        raise ValueError(
            f"mesh: needs an axis named {axis!r} to shard over; this mesh has axes "
            f"{tuple(mesh.axis_names)}. Build one with hcmoe.expert_mesh(), or name the axes "
            f"({BATCH!r}, {EXPERTS!r})."
        )
    return mesh


def axis_size(mesh: Mesh, name: str) -> int:
    """The size of `mesh`'s axis `name`, 1 when the mesh has no such axis."""
    return int(dict(mesh.shape).get(name, 1))


def _auto(mesh: Mesh) -> Mesh:
    # Sharding constraints may only name Auto axes; `jax.make_mesh` makes Explicit ones.
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)


def padded_size(size: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `size`."""
    return -(-size // multiple) * multiple


def leading_size(tree: Any) -> int:
    """The leading axis size shared by every array leaf of `tree`."""
    sizes = {jnp.shape(x)[0] for x in jtu.tree_leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"expected one shared leading axis size; got sizes {sorted(sizes)}.")
    return sizes.pop()


def pad_leading(tree: Any, total: int) -> Any:
    """Grow every leaf's leading axis to `total` by repeating entry 0.

    A copy of a real entry is an inert filler: it solves exactly as the original does (no
    singular all-zero problem, no NaN), and `take_leading` drops it, so it receives a zero
    cotangent and adds nothing to gradients.
    """
    size = leading_size(tree)
    if size == total:
        return tree
    index = np.concatenate([np.arange(size), np.zeros(total - size, dtype=np.int64)])
    return jtu.tree_map(lambda x: jnp.take(x, index, axis=0), tree)


def take_leading(tree: Any, size: int) -> Any:
    """Drop padding: the first `size` entries of every leaf's leading axis."""
    return jtu.tree_map(lambda x: x if x.shape[0] == size else x[:size], tree)


def constrain_to(tree: Any, mesh: Mesh, spec: P) -> Any:
    """`jax.lax.with_sharding_constraint` of every array leaf to `NamedSharding(mesh, spec)`."""
    sharding = NamedSharding(_auto(mesh), spec)
    return jtu.tree_map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def sharded_expert_map(fn: Callable, mesh: Mesh, problems: Any, init: Any) -> Any:
    """`jax.vmap(fn)(problems, init)` with the experts split over `mesh`'s `"experts"` axis.

    `problems` and `init` are expert-stacked (leading axis `K`). They are padded to a multiple
    `K'` of the axis size `D` with copies of expert 0, constrained to
    `NamedSharding(mesh, P("experts"))` so each device holds and solves `K' / D` experts, and
    the padding is dropped. What `fn` closes over (the PDE, per-sample data, the solver) is
    replicated. Other mesh axes replicate the work, unless an enclosing
    `jax.vmap(..., spmd_axis_name="batch")` (see `batch_map`) maps a batch onto them.

    The solves are the same vmapped `optimistix`/`lineax` calls as without a mesh, so results
    and implicit gradients match the single-device ones to rounding; works under `jit`, `grad`
    and `vmap`.

    **Returns:** `fn`'s outputs stacked over the `K` experts; sharded on `"experts"` when `D`
    divides `K`, else replicated over the mesh (arrays cannot be split unevenly).

    **Raises:** `ValueError` for a mesh without an `"experts"` axis.
    """
    check_mesh(mesh, EXPERTS)
    num_experts = leading_size((problems, init))
    total = padded_size(num_experts, axis_size(mesh, EXPERTS))
    padded = constrain_to(pad_leading((problems, init), total), mesh, P(EXPERTS))
    outputs = constrain_to(jax.vmap(fn)(*padded), mesh, P(EXPERTS))
    if total == num_experts:
        return outputs
    # Replicated, as documented: left to XLA, the slice of the padded experts can come out
    # tiled in a way that jax 0.9.2 cannot express on the mesh (IndivisibleError when the
    # jitted call returns; K = 6 on 4 devices).
    return constrain_to(take_leading(outputs, num_experts), mesh, P())


def batch_map(fn: Callable, mesh: Mesh, *args: Any) -> Any:
    """`jax.vmap(fn)(*args)` with the batch split over `mesh`'s `"batch"` axis.

    With a `"batch"` axis of size 1 (or none) this is a plain `vmap`. Otherwise the batch is
    padded to a multiple of the axis size with copies of sample 0, constrained to
    `P("batch")`, and vmapped with `spmd_axis_name="batch"` so every sharding constraint
    inside (the experts' `P("experts")`) becomes `P("batch", "experts")`; the padding is
    dropped.

    The mesh's `"experts"` axis, if any, is the coupling's business (`Independent` shards
    each sample's experts over it).
    """
    if axis_size(mesh, BATCH) == 1:
        return jax.vmap(fn)(*args)
    size = leading_size(args)
    padded = pad_leading(args, padded_size(size, axis_size(mesh, BATCH)))
    padded = constrain_to(padded, mesh, P(BATCH))
    return take_leading(jax.vmap(fn, spmd_axis_name=BATCH)(*padded), size)
