"""A Flax NNX backbone under the hard constraint, trained with plain NNX code.

```
python examples/flax_nnx_backbone.py      # under a minute on a CPU
```

`hcmoe.constrain` returns an `nnx.Module` when given one, so `nnx.Optimizer`, `nnx.jit` and
`nnx.value_and_grad` work unchanged; only the backbone's `nnx.Param`s are trained. The problem
is the heat equation `u_t = kappa u_xx` (shipped, with an exact solution), trained on the
physics loss only, with one hard-constrained expert (PI-HC) on every grid point.
"""

from __future__ import annotations

import argparse

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import hcmoe  # noqa: E402
from hcmoe.models import grid_input  # noqa: E402
from hcmoe.problems import heat  # noqa: E402


class ConvBasis(nnx.Module):
    """Two convolutions over `(t, x)`: `(batch, nt, nx, 3) -> (batch, nt, nx, n_basis)`."""

    def __init__(self, n_basis: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Conv(3, 32, kernel_size=(5, 5), rngs=rngs)
        self.out = nnx.Conv(32, n_basis, kernel_size=(5, 5), rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.gelu(self.hidden(x)))


def physics_loss(u, data, pde, grid):
    """The PDE residual over the whole grid plus the IC/BC terms (no solution data)."""
    one = lambda u, d: (
        hcmoe.losses.residual_loss(u, pde, grid, d) + hcmoe.losses.condition_loss(u, pde, grid, d)
    )
    return jnp.mean(jax.vmap(one)(u, data))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)

    pde, grid = heat.Heat(), heat.make_grid(nt=17, nx=33)
    u0 = heat.sample_initial_conditions(jr.key(0), 80, grid)
    solution = jax.vmap(lambda c: heat.reference_solution(c, grid))(u0)
    inputs = jax.vmap(lambda c: grid_input(grid, c))(u0)  # coordinates + u0 over time
    train, test = slice(0, 64), slice(64, 80)

    model = hcmoe.constrain(ConvBasis(8, rngs=nnx.Rngs(0)), pde, None, grid=grid)
    optimizer = nnx.Optimizer(model, hcmoe.training.paper_optimizer(), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, data, key):
        def loss_fn(model):
            return physics_loss(model(x, data, key=key).u, data, pde, grid)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    for i in range(args.steps):
        batch = np.asarray(jr.choice(jr.fold_in(jr.key(1), i), 64, (8,), replace=False))
        loss = step(model, optimizer, inputs[train][batch], {"u0": u0[train][batch]}, jr.key(i))
        if i % 25 == 0 or i == args.steps - 1:
            print(f"step {i:4d}  loss {float(loss):.3e}")

    prediction = model(inputs[test], {"u0": u0[test]}, key=jr.key(0)).u
    errors = hcmoe.losses.relative_l2(prediction, solution[test], batch_ndim=1)
    print(f"held-out relative L2 error: {100 * errors.mean():.2f}% ± {100 * errors.std():.2f}%")
    return errors


if __name__ == "__main__":
    main()
