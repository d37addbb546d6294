"""Time the reference solvers and measure the PDE residual of their solutions.

For diffusion–sorption and Navier–Stokes at the `small` and `paper` dataset sizes:

- seconds per trajectory, jit-compiled, after a warm-up call: one trajectory at a time, and
  per trajectory when a batch is solved together (vmapped, as `make_dataset` does);
- the PDE residual of the reference solution, evaluated with the problem's own `hcmoe`
  operators on every grid point (RMS and median, and relative to the RMS of the time
  derivative).

    python benchmarks/reference_solvers.py                      # both sizes
    python benchmarks/reference_solvers.py --sizes small --batch 8

Writes `benchmarks/results/reference_solvers_<platform>.json` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr

from hcmoe.problems import diffusion_sorption as ds, navier_stokes as ns


jax.config.update("jax_enable_x64", True)


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up: compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def residual_summary(pde, u, grid, time_derivative: str, late_from: float | None = None):
    values = {name: op(u, grid) for name, op in pde.operators().items()}
    residual = pde.residual(values, grid.mesh(), None)
    scale = float(jnp.sqrt(jnp.mean(values[time_derivative] ** 2)))
    summary = {
        "rms": float(jnp.sqrt(jnp.mean(residual**2))),
        "median_abs": float(jnp.median(jnp.abs(residual))),
        "max_abs": float(jnp.max(jnp.abs(residual))),
        "rms_time_derivative": scale,
    }
    summary["relative_rms"] = summary["rms"] / scale
    if late_from is not None:
        # Away from the initial layer where the initial level meets the boundary value.
        late = grid.coords("t") >= late_from
        late_rms = float(jnp.sqrt(jnp.mean(residual[late] ** 2)))
        late_scale = float(jnp.sqrt(jnp.mean(values[time_derivative][late] ** 2)))
        summary[f"rms_t>={late_from:g}"] = late_rms
        summary[f"relative_rms_t>={late_from:g}"] = late_rms / late_scale
    return summary


def cases(sizes):
    for size in sizes:
        grid = ds.grid(size)
        yield {
            "problem": "diffusion_sorption",
            "size": size,
            "split": "train/test",
            "grid": grid,
            "pde": ds.DiffusionSorption(),
            "sample": lambda key, n, grid=grid: ds.sample_initial_conditions(key, n, grid),
            "solve": lambda v, grid=grid, s=size: ds.reference_solution(
                v, grid, max_dt=ds.SIZES[s]["max_dt"]
            ),
            "time_derivative": "u_t",
            "late_from": 100.0,
            "settings": {"max_dt": ds.SIZES[size]["max_dt"], "method": "FV + SDIRK2/Newton"},
        }
        for split in ("train", "test") if size == "paper" else ("train",):
            grid = ns.grid(size, split)
            yield {
                "problem": "navier_stokes",
                "size": size,
                "split": split if size == "paper" else "train/test",
                "grid": grid,
                "pde": ns.NavierStokes(),
                "sample": lambda key, n, grid=grid: ns.sample_initial_conditions(key, n, grid),
                "solve": lambda v, grid=grid, s=size: ns.reference_solution(
                    v, grid, max_dt=ns.SIZES[s]["max_dt"]
                ),
                "time_derivative": "w_t",
                "late_from": None,
                "settings": {
                    "max_dt": ns.SIZES[size]["max_dt"],
                    "method": "pseudo-spectral 2/3, CN + Heun",
                },
            }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "paper"])
    parser.add_argument("--batch", type=int, default=8, help="trajectories per vmapped batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = jax.devices()[0]
    results = {
        "device": f"{device.platform}: {device.device_kind}",
        "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "x64": True,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "cases": [],
    }
    key = jr.key(0)
    for case in cases(args.sizes):
        grid, solve = case["grid"], case["solve"]
        big = grid.size > 1_000_000  # the 256^2 test grid: one repeat, batch of 2
        repeats = 1 if big else args.repeats
        batch = min(args.batch, 2) if big else args.batch
        initial = case["sample"](key, batch)
        single = best_time(jax.jit(solve), initial[0], repeats=repeats)
        batched = best_time(jax.jit(jax.vmap(solve)), initial, repeats=repeats) / batch
        u = jax.jit(solve)(initial[0])
        entry = {
            "problem": case["problem"],
            "size": case["size"],
            "split": case["split"],
            "grid": dict(zip(grid.names, grid.shape)),
            **case["settings"],
            "seconds_per_trajectory": single,
            "seconds_per_trajectory_batched": batched,
            "batch": batch,
            "finite": bool(jnp.all(jnp.isfinite(u))),
            "residual": residual_summary(
                case["pde"], u, grid, case["time_derivative"], case["late_from"]
            ),
        }
        results["cases"].append(entry)
        print(json.dumps(entry), flush=True)

    out = (
        args.out or Path(__file__).parent / "results" / f"reference_solvers_{device.platform}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
