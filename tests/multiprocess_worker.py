"""One process of the multi-process test (`tests/test_sharding.py::test_two_processes`).

Run as `python -m tests.multiprocess_worker PROCESS_ID NUM_PROCESSES PORT OUT.npz` from the
repository root with `XLA_FLAGS=--xla_force_host_platform_device_count=2`: it joins the JAX
distributed runtime on 127.0.0.1:PORT (gloo CPU collectives), builds a global mesh over every
process's devices, and process 0 writes the gathered results. The test imports `results` to
compute the same numbers unsharded in one process.
"""

import sys

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.experimental import multihost_utils

import hcmoe

from .helpers import ForcedHeat, basis_with_exact, data_for, small_grid


BATCH = 3  # samples; padded to 4 on a 2-process "batch" axis
EXPERTS = 3  # experts; padded to 4 on a 4-device "experts" axis (devices on both processes)


def _fetch(x) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))  # a collective


def results(mesh, batch_mesh) -> dict[str, np.ndarray]:
    """One solve and one batched `constrain`, values and gradients, as host arrays."""
    grid = small_grid()
    keys = jr.split(jr.key(0), BATCH + 2)
    basis = basis_with_exact(grid, keys[0]) + 0.05 * jr.normal(keys[1], grid.shape + (5,))
    bases = jnp.stack([basis_with_exact(grid, k) for k in keys[2:]])
    data = data_for(grid)
    batch_data = {"u0": jnp.stack([data["u0"]] * BATCH)}
    partition, pde = hcmoe.Partition(x=EXPERTS), ForcedHeat()

    def solve_loss(b):
        sol = hcmoe.solve(b, pde, partition, grid, data, coupling=hcmoe.Independent(mesh=mesh))
        return jnp.sum(sol.u**2) + jnp.sum(sol.weights**2), sol

    model = hcmoe.constrain(
        lambda s, x: s * x, pde, partition, grid=grid, coupling=hcmoe.Independent(mesh=batch_mesh)
    )

    def batch_loss(scale):
        sol = model(scale, bases, batch_data)
        return jnp.sum(sol.u**2), sol

    (_, sol), grad = jax.jit(jax.value_and_grad(solve_loss, has_aux=True))(basis)
    (_, batch_sol), batch_grad = jax.jit(jax.value_and_grad(batch_loss, has_aux=True))(1.2)
    out = dict(
        u=sol.u,
        weights=sol.weights,
        grad=grad,
        batch_u=batch_sol.u,
        batch_weights=batch_sol.weights,
        batch_grad=batch_grad,
    )
    return {name: _fetch(value) for name, value in out.items()}


def join(process_id: int, num_processes: int, port: int) -> None:
    """Float64 on, and this process joined to the others on 127.0.0.1:`port` (gloo CPU
    collectives, bounded timeouts)."""
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    assert jax.process_count() == num_processes
    assert jax.device_count() == num_processes * jax.local_device_count()


def main(process_id: int, num_processes: int, port: int, path: str):
    join(process_id, num_processes, port)
    mesh = hcmoe.expert_mesh()  # every device of every process on "experts"
    batch_mesh = hcmoe.expert_mesh(batch=num_processes)  # one "batch" row per process
    out = results(mesh, batch_mesh)
    if process_id == 0:
        np.savez(path, **out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
