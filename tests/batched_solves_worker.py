"""Run by tests/test_batched_solves.py in a subprocess: a jitted, vmapped joint PI-HC-MoE solve
(4 experts x 8 basis functions: 32 unknowns) over 64 samples, three times, then "done"."""

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import hcmoe  # noqa: E402
from hcmoe.problems import diffusion_sorption  # noqa: E402


def main():
    grid = diffusion_sorption.make_grid(nt=26, nx=64)
    # The formulation that was DiffusionSorption()'s default before hcmoe 0.2 (the IC as
    # least-squares rows), the default when this guard was written.
    pde = diffusion_sorption.DiffusionSorption(exact_initial=False, boundary_weight=1.0)
    partition = hcmoe.Partition(t=1, x=4, overlap=0.3)
    samples = 64
    basis = 0.1 * jr.normal(jr.key(0), (samples, *grid.shape, 8))
    u0 = jnp.full((samples, grid.shape[1]), 0.1)

    def one(b, u):
        return hcmoe.solve(
            b,
            pde,
            partition,
            grid,
            {"u0": u},
            coupling="joint",
            key=jr.key(1),
            rows=hcmoe.Rows(points_per_expert=100),
        ).u

    solve = jax.jit(jax.vmap(one))
    for _ in range(3):
        u = jax.block_until_ready(solve(basis, u0))
    assert u.shape == (samples, *grid.shape)
    print("done", flush=True)


if __name__ == "__main__":
    main()
