"""Shared pieces of the benchmarks: problems, bases, timing, compile time, memory, output.

Every benchmark uses hcmoe as a user would (public API only) and is device-agnostic: it runs
on the default JAX backend (CPU here, a GPU when one is visible) and records which one.

Timing follows one rule because shared machines are noisy: functions that are compared are
timed *interleaved* in the same run (round robin, alternating order), after a warm-up call, each
call closed with `jax.block_until_ready`; we report the median and the interquartile range of
every function and, for a comparison, the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax


jax.config.update("jax_enable_x64", True)  # the constraint solve runs in float64 (paper)

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import hcmoe  # noqa: E402
from hcmoe.problems import (  # noqa: E402
    diffusion_sorption as ds,
    heat as heat_problem,
    navier_stokes as ns,
)


RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------
# Command line and output
# --------------------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick", action="store_true", help="small sizes: a few minutes on a laptop CPU"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and one repeat, only to check that the script runs",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed calls per configuration")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="stop repeating a configuration after this many seconds (>= 3 calls)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    return p


def output_name(base: str, args) -> str:
    """`base`, or `base_<problem>` when `--problem` picked one problem (so runs of different
    problems do not overwrite each other)."""
    problem = getattr(args, "problem", "both")
    return base if problem in (None, "both") else f"{base}_{problem}"


def mode(args) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def repeats(args, quick: int = 5, full: int = 10) -> int:
    if args.repeats is not None:
        return args.repeats
    return {"smoke": 1, "quick": quick, "full": full}[mode(args)]


def budget(args, quick: float = 20.0, full: float = 120.0) -> float:
    if args.budget is not None:
        return args.budget
    return {"smoke": 0.0, "quick": quick, "full": full}[mode(args)]


def write_json(args, name: str, payload: dict) -> Path:
    """Write `{name}[_quick|_smoke].json` atomically, with the machine description."""
    suffix = {"full": "", "quick": "_quick", "smoke": "_smoke"}[mode(args)]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}{suffix}.json"
    payload = {
        "benchmark": name,
        "mode": mode(args),
        "machine": machine(),
        "device_peak_bytes_since_start": device_peak_bytes(),
    } | payload
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def plot_path(args, name: str) -> Path:
    suffix = {"full": "", "quick": "_quick", "smoke": "_smoke"}[mode(args)]
    return args.out / f"{name}{suffix}.png"


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine() -> dict:
    """What the numbers were measured on."""
    devices = jax.devices()
    versions = {}
    for package in ("jax", "jaxlib", "equinox", "optimistix", "lineax", "hcmoe"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        "cpu": _cpu_model(),
        "cpu_cores": cores,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": versions,
        "x64": bool(jax.config.jax_enable_x64),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def describe_machine() -> str:
    m = machine()
    return f"{m['backend']} ({m['cpu']}, {m['cpu_cores']} cores), jax {m['versions']['jax']}"


# --------------------------------------------------------------------------------------------
# Timing, compile time, memory
# --------------------------------------------------------------------------------------------


def summarize(times: list[float]) -> dict:
    times = np.asarray(times, dtype=float)
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return {
        "median_s": float(median),
        "iqr_s": float(q3 - q1),
        "min_s": float(times.min()),
        "n": int(times.size),
        "times_s": times.round(6).tolist(),
    }


def time_interleaved(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, budget_s: float = 0.0
) -> dict[str, dict]:
    """Time several zero-argument functions in round robin (alternating order per round).

    Each call is closed by `jax.block_until_ready`. After `warmup` untimed rounds, runs
    `repeats` rounds, or stops early once `budget_s` seconds have passed and 3 rounds are done.
    Returns `{name: summarize(times)}` plus, under `"_rounds"`, the raw per-round times.
    """
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(max(repeats, 1)):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - t0)
        if budget_s and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: summarize(ts) for name, ts in times.items()}


def ratio(timing: dict, numerator: str, denominator: str) -> float:
    """Median over rounds of `numerator / denominator` (both timed interleaved)."""
    a = np.asarray(timing[numerator]["times_s"])
    b = np.asarray(timing[denominator]["times_s"])
    n = min(a.size, b.size)
    return float(np.median(a[:n] / b[:n]))


@dataclasses.dataclass
class Compiled:
    """A jitted function compiled for given arguments, with its compile time and memory."""

    call: Callable[[], Any]
    lower_s: float
    compile_s: float
    memory: dict


def compile_fn(fn: Callable, *args) -> Compiled:
    """`jax.jit(fn).lower(*args).compile()`, timed, and its memory analysis.

    Arguments and outputs may be pytrees with non-array leaves (Equinox modules): those are
    static, as with `equinox.filter_jit`; only array outputs are returned.
    """
    dynamic, static = eqx.partition(args, eqx.is_array)

    def arrays_only(dynamic):
        return eqx.filter(fn(*eqx.combine(dynamic, static)), eqx.is_array)

    t0 = time.perf_counter()
    lowered = jax.jit(arrays_only).lower(dynamic)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return Compiled(lambda: compiled(dynamic), t1 - t0, t2 - t1, memory_of(compiled))


def memory_of(compiled) -> dict:
    """XLA's static memory analysis of a compiled function (deterministic, any backend).

    `peak_bytes` = temporaries + arguments + outputs - aliased: the buffers live at once
    according to XLA's buffer assignment, an upper bound of the peak for one call.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception as error:  # backends without the analysis: record why
        return {"error": repr(error)}
    if stats is None:
        return {"error": "memory_analysis() returned None on this backend"}
    fields = (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    out = {f.removesuffix("_size_in_bytes") + "_bytes": int(getattr(stats, f)) for f in fields}
    out["peak_bytes"] = (
        out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    )
    return out


def device_peak_bytes() -> int | None:
    """The allocator's peak since the process started, where the backend reports it (GPU),
    else None. Process-wide, so only an upper bound for any one configuration."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


# --------------------------------------------------------------------------------------------
# Problems and bases
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """A benchmark problem: PDE, grid, one sample's data, the number of basis functions."""

    name: str
    pde: hcmoe.AbstractPDE
    grid: hcmoe.Grid
    data: dict
    n_basis: int
    blocks: Callable[[int], dict]

    def partition(self, experts: int) -> hcmoe.Partition:
        return hcmoe.Partition(**self.blocks(experts))

    def basis(self, seed: int = 0, dtype=jnp.float64) -> jax.Array:
        return smooth_basis(jr.key(seed), self.grid, self.n_basis, dtype=dtype)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "grid": dict(zip(self.grid.names, self.grid.shape)),
            "grid_points": self.grid.size,
            "n_basis": self.n_basis,
        }


def _ds_blocks(experts: int) -> dict:
    return {"x": experts}  # paper: 1 (t) x 4 (x)


def _ns_blocks(experts: int) -> dict:
    """Paper: 1 (t) x 2 (x) x 2 (y); more experts split t next."""
    x = 2 if experts >= 2 else 1
    y = 2 if experts >= 4 else 1
    t = max(experts // (x * y), 1)
    if t * x * y != experts:
        raise ValueError(f"Navier-Stokes benchmark: {experts} experts is not 1, 2 or 4 t-blocks")
    return {"t": t, "x": x, "y": y}


def diffusion_sorption(nt: int = 101, nx: int = 1024, n_basis: int = 16) -> Problem:
    """Paper grid 101 (t) x 1024 (x), N = 16, u0 = 0.1 everywhere."""
    grid = ds.make_grid(nt=nt, nx=nx)
    data = {"u0": jnp.full((nx,), 0.1)}
    return Problem("diffusion_sorption", ds.DiffusionSorption(), grid, data, n_basis, _ds_blocks)


def navier_stokes(nt: int = 64, n: int = 64, n_basis: int = 64) -> Problem:
    """Paper grid 64 (t) x 64 x 64, N = 64, a Gaussian-random-field initial vorticity."""
    grid = ns.make_grid(nt=nt, n=n)
    w0 = ns.sample_initial_conditions(jr.key(1), 1, grid)[0]
    return Problem("navier_stokes", ns.NavierStokes(), grid, {"w0": w0}, n_basis, _ns_blocks)


def heat(nt: int = 101, nx: int = 1024, n_basis: int = 16) -> Problem:
    """A linear problem (one least-squares solve, no iterations) on the diffusion-sorption
    grid size: u_t = 0.05 u_xx, u0 = sin(pi x), zero ends."""
    grid = heat_problem.make_grid(nt=nt, nx=nx)
    data = {"u0": jnp.sin(np.pi * jnp.asarray(grid.coords("x")))}
    return Problem("heat", heat_problem.Heat(), grid, data, n_basis, _ds_blocks)


def _axis_features(grid: hcmoe.Grid, name: str, modes: int) -> np.ndarray:
    """Smooth functions of one axis on [0, 1]: cosines, or a Fourier basis if periodic."""
    low, high = grid.extent(name)
    s = (grid.coords(name) - low) / (high - low)
    if grid.is_periodic(name):
        waves = [np.ones_like(s)]
        for k in range(1, modes):
            waves.append(np.cos(2 * np.pi * k * s) if k % 2 else np.sin(2 * np.pi * k * s))
    else:
        waves = [np.cos(np.pi * k * s) for k in range(modes)]
    return np.stack(waves, axis=-1) / (1.0 + np.arange(modes))  # decaying amplitudes


def smooth_basis(key, grid: hcmoe.Grid, n_basis: int, modes: int = 4, dtype=jnp.float64):
    """`n_basis` random smooth fields: random combinations of `modes`^d tensor-product waves
    (cosines in time, Fourier modes on periodic axes), plus a constant. The constraint layer's
    cost does not depend on training, so a random smooth basis stands in for the FNO output."""
    coef = jr.normal(key, (modes,) * grid.ndim + (n_basis,), dtype=dtype)
    fields = coef
    for name in grid.names:  # contract one axis at a time: (modes, ...) -> (..., n_points)
        features = jnp.asarray(_axis_features(grid, name, modes), dtype)
        fields = jnp.tensordot(fields, features, axes=([0], [1]))
    fields = jnp.moveaxis(fields, 0, -1)  # (n_basis, *grid.shape) -> (*grid.shape, n_basis)
    return (0.1 * fields + 0.05).astype(dtype)


def solve_kwargs(
    points: int | None, *, lm: dict | None = None, rows: dict | None = None, **extra
) -> dict:
    """The paper's solver settings as `hcmoe.solve`'s keywords: `hcmoe.LevenbergMarquardt`
    with rtol = atol = 1e-4, <= 50 steps, ridge 1e-4 and `points` PDE points per expert.
    `lm`, `rows`: more fields of the solver and of `hcmoe.Rows`; `extra`: other keywords of
    `hcmoe.solve` (`solver`, `coupling`, `adjoint`, `max_steps`, ...), which replace these."""
    return (
        dict(
            solver=hcmoe.LevenbergMarquardt(rtol=1e-4, atol=1e-4, **(lm or {})),
            max_steps=50,
            rows=hcmoe.Rows(points_per_expert=points, ridge=1e-4, **(rows or {})),
        )
        | extra
    )


def solve_settings(options: dict) -> dict:
    """What a result file records of `solve_kwargs`' options, read from the objects:
    `points_per_expert`, `rtol`, `atol`, `max_steps`, `ridge`."""
    rows, solver = options["rows"], options["solver"]
    return {
        "points_per_expert": rows.points_per_expert,
        "rtol": solver.rtol,
        "atol": solver.atol,
        "max_steps": options["max_steps"],
        "ridge": rows.ridge,
    }


def solve_and_grad(problem: Problem, partition, **options):
    """`forward(basis, key) -> Solution` and `grad(basis, key) -> d loss / d basis` with a
    fixed random linear read-out loss (what a training step differentiates)."""
    pde, grid, data = problem.pde, problem.grid, problem.data
    readout = jr.normal(jr.key(7), grid.shape)

    def forward(basis, key):
        return hcmoe.solve(basis, pde, partition, grid, data, key=key, **options)

    def loss(basis, key):
        return jnp.sum(forward(basis, key).u * readout) / grid.size

    return forward, jax.grad(loss)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
