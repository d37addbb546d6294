"""Eager calls compile once: an eager call against the same call under the user's own jit.

For each entry point a user calls eagerly (the public `hcmoe.solve`, and `hcmoe.constrain`
around an Equinox, a Flax NNX and a plain-function backbone), on the README's Burgers problem
(32 x 64 grid, 4 experts, 200 points per expert, the CPU FNO preset), this records

- `first_call_s`: the first eager call (tracing and compilation included);
- `eager`: later eager calls, and `jitted`: the same call wrapped in `eqx.filter_jit` /
  `nnx.jit` / `jax.jit` by the user, timed interleaved in the same rounds;
- `ratio`: median eager / median jitted (the acceptance bound is "a few times").

    python benchmarks/eager.py --quick
    python benchmarks/eager.py --smoke --no-plot      # seconds, only checks that it runs
"""

from __future__ import annotations

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import _common as common
import hcmoe
from hcmoe import ops


class Burgers(hcmoe.AbstractPDE):
    nu: float = 0.01

    def operators(self):
        return {
            "u": ops.Identity(),
            "u_t": ops.FiniteDifference("t"),
            "u_x": ops.FiniteDifference("x"),
            "u_xx": ops.FiniteDifference("x", order=2),
        }

    def residual(self, v, coords, data):
        return v["u_t"] + v["u"] * v["u_x"] - self.nu * v["u_xx"]

    def conditions(self, grid, data):
        return [
            hcmoe.initial(data["u0"]),
            hcmoe.dirichlet("x", "low", 0.0),
            hcmoe.dirichlet("x", "high", 0.0),
        ]


SIZES = {
    "smoke": dict(nt=8, nx=16, points=32),
    "quick": dict(nt=32, nx=64, points=200),
    "full": dict(nt=32, nx=64, points=200),
}


def _cases(size: dict) -> dict[str, tuple]:
    """`name -> (eager_fn, jitted_fn)`, both zero-argument and returning `u`."""
    grid = hcmoe.uniform_grid(t=(0.0, 1.0, size["nt"]), x=(-1.0, 1.0, size["nx"]))
    u0 = -jnp.sin(jnp.pi * grid.coords("x"))
    data, key, pde = {"u0": u0}, jr.key(1), Burgers()
    partition = hcmoe.Partition(t=1, x=4)
    options = dict(grid=grid, rows=hcmoe.Rows(points_per_expert=size["points"]))
    grid_input = getattr(hcmoe.models, "grid_input", None) or hcmoe.models.fno_input  # old name
    x = grid_input(grid, u0)
    backbone = hcmoe.models.FNO.diffusion_sorption_small(jr.key(0))
    basis = backbone(x)
    cases = {}

    def solve(b):
        return hcmoe.solve(
            b,
            pde,
            partition,
            grid,
            data,
            key=key,
            rows=hcmoe.Rows(points_per_expert=size["points"]),
        ).u

    jitted_solve = eqx.filter_jit(solve)
    cases["hcmoe.solve"] = (lambda: solve(basis), lambda: jitted_solve(basis))

    model = hcmoe.constrain(backbone, pde, partition, **options)
    jitted_model = eqx.filter_jit(lambda m, x: m(x, data, key=key).u)
    cases["constrain(equinox)"] = (
        lambda: model(x, data, key=key).u,
        lambda: jitted_model(model, x),
    )

    def fn(params, x):
        return jnp.tanh(x @ params)  # (*grid, 3) @ (3, N) -> (*grid, N)

    params = 0.5 * jr.normal(jr.key(2), (x.shape[-1], 8))
    constrained_fn = hcmoe.constrain(fn, pde, partition, **options)
    jitted_fn = jax.jit(lambda p, x: constrained_fn(p, x, data, key=key).u)
    cases["constrain(function)"] = (
        lambda: constrained_fn(params, x, data, key=key).u,
        lambda: jitted_fn(params, x),
    )
    try:
        from flax import nnx
    except ImportError:
        return cases
    nnx_backbone = nnx.Linear(x.shape[-1], 8, rngs=nnx.Rngs(0))
    nnx_model = hcmoe.constrain(nnx_backbone, pde, partition, **options)
    jitted_nnx = nnx.jit(lambda m, x: m(x, data, key=key).u)
    cases["constrain(nnx)"] = (
        lambda: nnx_model(x, data, key=key).u,
        lambda: jitted_nnx(nnx_model, x),
    )
    return cases


def main():
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    size = SIZES[common.mode(args)]
    results = {}
    for name, (eager, jitted) in _cases(size).items():
        start = time.perf_counter()
        jax.block_until_ready(eager())
        first = time.perf_counter() - start
        timings = common.time_interleaved(
            {"eager": eager, "jitted": jitted},
            repeats=common.repeats(args, 10, 20),
            budget_s=common.budget(args, 30.0, 60.0),
        )
        ratio = timings["eager"]["median_s"] / timings["jitted"]["median_s"]
        results[name] = {"first_call_s": first, **timings, "ratio": ratio}
        eager_ms, jitted_ms = (1e3 * timings[k]["median_s"] for k in ("eager", "jitted"))
        print(
            f"{name:22s} first call {first:7.3f} s   eager {eager_ms:8.2f} ms   "
            f"jitted {jitted_ms:8.2f} ms   ratio {ratio:5.2f}"
        )
    common.write_json(args, "eager", {"size": size, "results": results})


if __name__ == "__main__":
    main()
