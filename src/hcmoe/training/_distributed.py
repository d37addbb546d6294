"""Where `fit` puts its state and batches: one device, or a `("batch", "experts")` mesh over
the devices of one or several processes (`jax.distributed`).

On a mesh, the model and the optimizer state are replicated (`P()`: every device holds all
of them, as data parallelism does), each step's batch is split over `"batch"` (`P("batch")`),
and every process loads only the rows its own devices hold
(`jax.make_array_from_process_local_data`). The step is one jitted SPMD program: XLA reduces
the loss and the gradients over the batch's devices itself. Files, progress bars and figures
are process 0's business (`is_main_process`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .._sharding import BATCH, _auto, axis_size, check_mesh


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes files and shows progress."""
    return jax.process_index() == 0


def check_fit_mesh(mesh, batch_size: int, data_is_function: bool) -> Mesh | None:
    """`mesh` for `fit` (with Auto axes), or `ValueError` naming what does not fit."""
    if mesh is None:
        if jax.process_count() > 1:
            raise ValueError(
                f"mesh: fit runs in {jax.process_count()} processes (jax.distributed); pass "
                "mesh=hcmoe.expert_mesh(batch=...) so that they split the batch instead of "
                "each training its own copy."
            )
        return None
    mesh = _auto(check_mesh(mesh, BATCH))
    groups = axis_size(mesh, BATCH)
    if not data_is_function and batch_size % groups:
        raise ValueError(
            f"batch_size: must be a multiple of the mesh's {BATCH!r} axis size {groups} (each "
            f"group of devices takes an equal part of the batch); got {batch_size}."
        )
    return mesh


def placement(mesh: Mesh | None):
    """The sharding of the model and optimizer state: replicated over `mesh`, or the
    default device."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh | None):
    """`tree`'s arrays on every device of `mesh` (the same values in every process)."""
    if mesh is None:
        return tree
    sharding = placement(mesh)

    def one(x):
        # The same sharding, not an equivalent one (on one device, a SingleDeviceSharding):
        # the step's compilation cache tells them apart, and its outputs are NamedShardings.
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jr.wrap_key_data(one(jr.key_data(x)), impl=jr.key_impl(x))
        value = np.asarray(x)  # a host copy: `device_put` cannot reach other processes
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jtu.tree_map(lambda x: one(x) if _is_array(x) else x, tree)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def local_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
    """The rows of a global batch of `batch_size` that this process's devices hold."""
    sharding = NamedSharding(mesh, P(BATCH))
    indices = sharding.addressable_devices_indices_map((batch_size,)).values()
    rows = {row for index in indices if index for row in range(*index[0].indices(batch_size))}
    return np.asarray(sorted(rows), dtype=np.int64)


def global_batch(local, mesh: Mesh, batch_size: int | None):
    """The global batch, split over `"batch"`, from this process's rows `local`
    (`batch_size=None`: inferred, every process holding as many rows)."""
    sharding = NamedSharding(mesh, P(BATCH))

    def one(x):
        x = np.asarray(x)
        shape = None if batch_size is None else (batch_size, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jtu.tree_map(one, local)


def agreed_signal(received: int | None) -> int | None:
    """The signal that stops every process: the largest one any process received (SIGTERM
    before SIGINT), so that all of them finish the same step and checkpoint it together."""
    if jax.process_count() == 1:
        return received
    every = multihost_utils.process_allgather(np.int32(received or 0))
    return int(np.max(every)) or None


def constrain_replicated(tree, mesh: Mesh):
    """Inside `jit`: `tree`'s arrays replicated over `mesh`."""
    sharding = placement(mesh)
    return jtu.tree_map(
        lambda x: jax.lax.with_sharding_constraint(x, sharding) if isinstance(x, jax.Array) else x,
        tree,
    )
