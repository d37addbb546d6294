"""One process of the coupled experts' multi-process test
(`tests/test_coupled.py::test_coupled_two_processes_equal_one`).

Run as `python -m tests.coupled_multiprocess_worker PROCESS_ID NUM_PROCESSES PORT OUT.npz` from
the repository root with `XLA_FLAGS=--xla_force_host_platform_device_count=2`: it joins the JAX
distributed runtime on 127.0.0.1:PORT (gloo CPU collectives), solves with
`hcmoe.Coupled(mesh=...)` on a mesh over every process's devices, and process 0 writes the
gathered values and gradient. The test imports `results` for the same numbers in one process.
"""

import sys

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import hcmoe

from .helpers import ForcedBurgers, basis_with_exact, data_for, small_grid
from .multiprocess_worker import _fetch, join


EXPERTS = 3  # padded to 4 on a 4-device "experts" axis (devices on both processes)


def results(mesh) -> dict[str, np.ndarray]:
    grid = small_grid()
    keys = jr.split(jr.key(0), 3)
    basis = basis_with_exact(grid, keys[0]) + 0.05 * jr.normal(keys[1], grid.shape + (5,))
    readout = jr.normal(keys[2], grid.shape)
    partition = hcmoe.Partition(x=EXPERTS, overlap=0.15)

    def loss(b):
        sol = hcmoe.solve(
            b, ForcedBurgers(), partition, grid, data_for(grid), coupling=hcmoe.Coupled(mesh=mesh)
        )
        return jnp.sum(sol.u * readout) + jnp.sum(sol.weights**2), sol

    (_, sol), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(basis)
    out = dict(u=sol.u, weights=sol.weights, grad=grad, steps=sol.stats.num_steps)
    return {name: _fetch(value) for name, value in out.items()}


def main(process_id: int, num_processes: int, port: int, path: str):
    join(process_id, num_processes, port)
    out = results(hcmoe.expert_mesh())
    if process_id == 0:
        np.savez(path, **out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
