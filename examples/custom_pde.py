"""A PDE that hcmoe does not ship, in ~20 lines: advection–diffusion on a periodic interval.

```
python examples/custom_pde.py            # about a minute on a CPU
```

`u_t + c u_x = nu u_xx` on `x in [0, 1)` (periodic), `t in [0, 1]`, `u(0, x) = u0(x)`. A PDE is its
linear operators (here a finite difference in t and spectral derivatives in x), a pointwise
residual, and its conditions; `linear = True` makes every constraint solve a single
least-squares solve. Random Fourier initial conditions have an exact solution (each mode
travels at speed c and decays like exp(-nu k^2 t)), so the trained models are checked against
it. The training uses only the physics loss; PI-SC and PI-HC are compared. (Experts split in
t or x would each lack the information entering their block — an initial condition for later
time blocks, the inflow for x blocks — so this transport problem suits one expert.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import hcmoe  # noqa: E402
from hcmoe import methods, ops, plotting, training  # noqa: E402
from hcmoe.models import FNO  # noqa: E402


# -- the PDE: everything hcmoe needs to know ---------------------------------------------------
class AdvectionDiffusion(hcmoe.AbstractPDE):
    """`u_t + c u_x - nu u_xx = 0` on a periodic axis `x`, with `u(t0, x) = data["u0"]`."""

    c: float = 1.0
    nu: float = 0.01
    linear = True

    def operators(self):
        return {
            "u_t": ops.FiniteDifference("t"),
            "u_x": ops.Spectral("x"),
            "u_xx": ops.Spectral("x", order=2),
        }

    def residual(self, values, coords, data):
        return values["u_t"] + self.c * values["u_x"] - self.nu * values["u_xx"]

    def conditions(self, grid, data):
        return (hcmoe.initial(data["u0"]),)  # periodic in x: no boundary conditions


# -- data with an exact solution ---------------------------------------------------------------
def exact_solutions(key, n: int, grid: hcmoe.Grid, pde: AdvectionDiffusion, modes: int = 3):
    """`u0 = sum_m a_m sin(2 pi m x) + b_m cos(2 pi m x)` and the exact `u(t, x)`."""
    a, b = jr.normal(key, (2, n, modes)) / np.arange(1, modes + 1).reshape(1, 1, modes)
    k = 2 * np.pi * np.arange(1, modes + 1)
    t, x = grid.coords("t")[:, None, None], grid.coords("x")[None, :, None]
    phase = k * (x - pde.c * t)
    decay = np.exp(-pde.nu * k**2 * t)
    u = jnp.einsum("txm,nm->ntx", decay * np.sin(phase), a)
    u = u + jnp.einsum("txm,nm->ntx", decay * np.cos(phase), b)
    return {"u0": u[:, 0]}, u


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("outputs/custom_pde"))
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.steps < 1:  # checked before any work, as a one-line argparse error
        parser.error(f"--steps: expected a positive integer; got {args.steps}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: expected a directory; {args.out} is a file")

    pde = AdvectionDiffusion()
    grid = hcmoe.uniform_grid(t=(0.0, 1.0, 21), x=(0.0, 1.0, 48), periodic=("x",))
    train_data, _ = exact_solutions(jr.key(0), 64, grid, pde)
    test_data, test_solutions = exact_solutions(jr.key(1), 16, grid, pde)
    rows = []
    for kind in ("sc", "hc"):
        backbone = FNO(3, 8, ndim=2, width=16, modes=6, n_layers=3, fc_width=32, key=jr.key(2))
        method = methods.make_method(kind, backbone, pde, grid)
        print(f"\n== {method.name} ==")
        result = methods.train(
            method,
            train_data,
            steps=args.steps,
            batch_size=8,
            key=jr.key(3),
            optimizer=training.paper_optimizer(decay_every=max(1, args.steps // 4)),
            progress=args.progress,
        )
        evaluation = methods.evaluate(result.model, test_data, test_solutions)
        rows.append(methods.result_row(result.model, evaluation, result.history))
        plotting.plot_prediction(
            evaluation.predictions[0],
            test_solutions[0],
            grid=grid,
            labels=result.model.labels(),
            title=method.name,
            path=args.out / f"prediction_{kind}.png",
        )
    print("\nRelative L2 error against the exact solution (16 held-out initial conditions):")
    print(methods.results_table(rows))
    print(f"figures in {args.out}/")
    return rows


if __name__ == "__main__":
    main()
