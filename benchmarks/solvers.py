"""Before/after of the constraint layer's linear algebra, timed interleaved in one run.

Nonlinear PDEs (diffusion–sorption, Navier–Stokes), three Levenberg–Marquardt variants with the
same trust-region search and termination:

- `optx_qr`: `optimistix.LevenbergMarquardt(rtol, atol)`, the previous default: each step
  materialises the Jacobian (N Jacobian-vector products) and factorises the damped
  (m + N) x N system by QR;
- `optx_normal`: the same with `linear_solver=lineax.Normal(lineax.Cholesky())`;
- `hcmoe`: the current default (`hcmoe.LevenbergMarquardt`): the Gram matrix J^T J and J^T r
  formed once per accepted iterate from a Jacobian built from the operator stacks, Cholesky per
  step.

Linear PDE (heat): the single least-squares solve with the default `lineax.QR()` vs
`solver=lineax.Normal(lineax.Cholesky())` (both on the Jacobian built from the stacks).

Accuracy: normal equations square the condition number, so the script also solves the
diffusion–sorption problem to tight tolerances with QR and with the default and reports the
difference of the weights and of the residual norms.

Schedules (`--section schedules`): the experts' solves batched
(`coupling=hcmoe.Independent(schedule="vmap")`, one loop that runs until the slowest expert
stops) against one after the other (`schedule="map"`, each stops at its own count),
diffusion–sorption with K = 4 on the quickstart grid (26 x 64) and the paper grid (101 x 1024),
forward and forward + backward: the measurement behind `schedule="auto"`.

Initial damping (`--section damping`): the default solver from `λ = 1` (optimistix's start,
`hcmoe.LevenbergMarquardt(initial_damping=1.0)`, the default before 2026-12-03) against the
default `λ = 1e-6`, diffusion–sorption and Navier–Stokes: LM steps, the difference of the
solutions, and the time of both, interleaved.

    python benchmarks/solvers.py --quick
    python benchmarks/solvers.py
    python benchmarks/solvers.py --quick --section schedules
    python benchmarks/solvers.py --section damping
"""

from __future__ import annotations

import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optimistix as optx

import _common as common
import hcmoe


TOL = 1e-4
VARIANTS = {
    "optx_qr": lambda: dict(solver=optx.LevenbergMarquardt(rtol=TOL, atol=TOL)),
    "optx_normal": lambda: dict(
        solver=optx.LevenbergMarquardt(rtol=TOL, atol=TOL, linear_solver=lx.Normal(lx.Cholesky()))
    ),
    "hcmoe": lambda: {},
}
SCHEDULE_VARIANTS = {
    "vmap": lambda: dict(coupling=hcmoe.Independent(schedule="vmap")),
    "map": lambda: dict(coupling=hcmoe.Independent(schedule="map")),
}
DAMPING_VARIANTS = {"lambda_1": lambda: dict(lm=dict(initial_damping=1.0)), "default": lambda: {}}
# A linear PDE is one least-squares solve, by a lineax solver (default lineax.QR()).
LINEAR_VARIANTS = {
    "qr": lambda: {},
    "normal_cholesky": lambda: dict(solver=lx.Normal(lx.Cholesky())),
}

SIZES = {
    "smoke": {
        "ds": dict(grid=dict(nt=11, nx=64, n_basis=8), configs=[(64, 1)]),
        "ns": None,
        "heat": dict(grid=dict(nt=11, nx=64, n_basis=8), configs=[(64, 1)]),
        "accuracy": dict(grid=dict(nt=11, nx=64, n_basis=8), configs=[(64, 1)]),
        "schedules": [dict(grid=dict(nt=11, nx=64, n_basis=8), configs=[(256, 4)])],
        "damping": [("ds", dict(nt=11, nx=64, n_basis=8), [(256, 4)])],
    },
    "quick": {
        "ds": dict(grid=dict(), configs=[(1000, 1), (10_000, 1), (10_000, 4)]),
        "ns": dict(grid=dict(nt=16, n=32, n_basis=16), configs=[(1000, 1), (10_000, 4)]),
        "heat": dict(grid=dict(), configs=[(1000, 1), (10_000, 1)]),
        "accuracy": dict(grid=dict(), configs=[(10_000, 1), (10_000, 4)]),
        "schedules": [
            dict(grid=dict(nt=26, nx=64, n_basis=8), configs=[(1600, 4)]),
            dict(grid=dict(nt=26, nx=64, n_basis=16), configs=[(1600, 4)]),
            dict(grid=dict(n_basis=8), configs=[(20_000, 4)]),
            dict(grid=dict(), configs=[(80_000, 4)]),
        ],
        "damping": [
            ("ds", dict(nt=26, nx=64, n_basis=16), [(1600, 1), (1600, 4)]),
            ("ds", dict(), [(10_000, 1), (100_000, 1), (10_000, 4), (100_000, 4)]),
            ("ns", dict(nt=16, n=32, n_basis=16), [(1000, 1), (4000, 4)]),
        ],
    },
    "full": {
        "ds": dict(
            grid=dict(), configs=[(1000, 1), (10_000, 1), (100_000, 1), (10_000, 4), (80_000, 4)]
        ),
        "ns": dict(grid=dict(), configs=[(1000, 1), (20_000, 1), (80_000, 4)]),
        "heat": dict(grid=dict(), configs=[(1000, 1), (10_000, 1), (100_000, 1)]),
        "accuracy": dict(grid=dict(), configs=[(10_000, 1), (10_000, 4), (100_000, 1)]),
        "schedules": [
            dict(grid=dict(nt=26, nx=64, n_basis=8), configs=[(1600, 4)]),
            dict(grid=dict(nt=26, nx=64, n_basis=16), configs=[(1600, 4)]),
            dict(grid=dict(n_basis=8), configs=[(20_000, 4)]),
            dict(grid=dict(), configs=[(10_000, 4), (20_000, 4), (80_000, 4), (100_000, 4)]),
        ],
        "damping": [
            ("ds", dict(nt=26, nx=64, n_basis=16), [(1600, 1), (1600, 4)]),
            ("ds", dict(), [(10_000, 1), (100_000, 1), (10_000, 4), (100_000, 4)]),
            ("ns", dict(nt=16, n=32, n_basis=16), [(1000, 1), (4000, 4)]),
            ("ns", dict(nt=16, n=32, n_basis=64), [(1000, 1), (4000, 4)]),
        ],
    },
}


def compare(problem, points: int, experts: int, variants: dict, args) -> dict:
    """Compile every variant, check its solution, time them interleaved."""
    basis, key = problem.basis(), jr.key(0)
    partition = problem.partition(experts)
    record = {
        "points_total": points,
        "experts": experts,
        "points_per_expert": max(points // experts, 1),
        "variants": {},
    }
    calls, weights, fields = {}, {}, {}
    for name, extra in variants.items():
        options = common.solve_kwargs(record["points_per_expert"], **extra())
        forward, grad = common.solve_and_grad(problem, partition, **options)
        fwd = common.compile_fn(forward, basis, key)
        bwd = common.compile_fn(grad, basis, key)
        solution = fwd.call()
        weights[name] = np.asarray(solution.weights)
        fields[name] = np.asarray(solution.u)
        stats = solution.stats
        record["variants"][name] = {
            "compile_forward_s": fwd.compile_s,
            "compile_gradient_s": bwd.compile_s,
            "lm_steps": np.asarray(stats.num_steps).tolist(),
            "converged_fraction": float(np.mean(np.asarray(stats.converged))),
            "residual_norm": np.asarray(stats.residual_norm).tolist(),
            "memory_gradient_peak_bytes": bwd.memory.get("peak_bytes"),
        }
        calls[f"{name}/forward"], calls[f"{name}/gradient"] = fwd.call, bwd.call
    reference = next(iter(variants))
    for name in variants:
        record["variants"][name]["max_weight_difference_vs_" + reference] = float(
            np.max(np.abs(weights[name] - weights[reference]))
        )
        record["variants"][name]["max_u_difference_vs_" + reference] = float(
            np.max(np.abs(fields[name] - fields[reference]))
        )
    timing = common.time_interleaved(
        calls, repeats=common.repeats(args), budget_s=common.budget(args)
    )
    for name in variants:
        for part in ("forward", "gradient"):
            record["variants"][name][part] = timing[f"{name}/{part}"]
            record["variants"][name][f"{part}_speedup_vs_{reference}"] = common.ratio(
                timing, f"{reference}/{part}", f"{name}/{part}"
            )
    line = ", ".join(
        f"{name} {v['forward']['median_s'] * 1e3:.0f}/{v['gradient']['median_s'] * 1e3:.0f} ms"
        for name, v in record["variants"].items()
    )
    print(f"  P={points} K={experts}: {line} (forward/gradient)", flush=True)
    return record


def accuracy(problem, points: int, experts: int) -> dict:
    """Tight tolerances: QR vs the default, same problem."""
    basis, key = problem.basis(), jr.key(0)
    partition = problem.partition(experts)
    out = {}
    for name, solver in (
        ("optx_qr", optx.LevenbergMarquardt(rtol=1e-10, atol=1e-10)),
        ("hcmoe", hcmoe.LevenbergMarquardt(rtol=1e-10, atol=1e-10)),
    ):
        options = common.solve_kwargs(max(points // experts, 1), solver=solver, max_steps=200)
        forward, _ = common.solve_and_grad(problem, partition, **options)
        sol = common.compile_fn(forward, basis, key).call()
        out[name] = sol
    qr, new = out["optx_qr"], out["hcmoe"]
    scale = float(jnp.max(jnp.abs(qr.weights)))
    return {
        "points_total": points,
        "experts": experts,
        "tolerance": 1e-10,
        "lm_steps": {k: np.asarray(v.stats.num_steps).tolist() for k, v in out.items()},
        "converged": {k: np.asarray(v.stats.converged).tolist() for k, v in out.items()},
        "max_abs_weight_difference": float(jnp.max(jnp.abs(qr.weights - new.weights))),
        "max_abs_weight": scale,
        "max_abs_u_difference": float(jnp.max(jnp.abs(qr.u - new.u))),
        "residual_norm": {k: np.asarray(v.stats.residual_norm).tolist() for k, v in out.items()},
    }


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in ("diffusion_sorption", "navier_stokes", "heat") if s in payload]
    fig, axes = plt.subplots(1, len(sections), figsize=(5.5 * len(sections), 4), squeeze=False)
    for ax, section in zip(axes[0], sections):
        records = payload[section]["results"]
        labels = [f"P={r['points_total']:g}\nK={r['experts']}" for r in records]
        names = list(records[0]["variants"])
        width = 0.8 / (2 * len(names))
        x = np.arange(len(records))
        for i, name in enumerate(names):
            for j, part in enumerate(("forward", "gradient")):
                values = [r["variants"][name][part]["median_s"] for r in records]
                ax.bar(
                    x + (2 * i + j) * width - 0.4 + width / 2,
                    values,
                    width,
                    label=f"{name} {part}",
                    color=f"C{i}",
                    edgecolor="black",
                    hatch="//" if part == "gradient" else None,
                )
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (median)")
        ax.set_title(section)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"LM linear algebra, before/after ({payload['mode']}): {common.describe_machine()}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def schedules(sizes: list[dict], args) -> list[dict]:
    """vmap against map on diffusion–sorption (see the module docstring)."""
    out = []
    for size in sizes:
        problem = common.diffusion_sorption(**size["grid"])
        print(
            f"schedules: {problem.name} {problem.describe()['grid']} N={problem.n_basis}",
            flush=True,
        )
        for points, experts in size["configs"]:
            record = compare(problem, points, experts, SCHEDULE_VARIANTS, args)
            record["problem"] = problem.describe()
            out.append(record)
    return out


def damping(sizes: list, args) -> list[dict]:
    """`initial_damping` 1 against the default (see the module docstring)."""
    out = []
    for name, grid, configs in sizes:
        make = common.diffusion_sorption if name == "ds" else common.navier_stokes
        problem = make(**grid)
        print(
            f"damping: {problem.name} {problem.describe()['grid']} N={problem.n_basis}", flush=True
        )
        for points, experts in configs:
            record = compare(problem, points, experts, DAMPING_VARIANTS, args)
            record["problem"] = problem.describe()
            steps = {k: v["lm_steps"] for k, v in record["variants"].items()}
            print(f"    LM steps {steps}", flush=True)
            out.append(record)
    return out


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--section",
        choices=["all", "solvers", "schedules", "damping"],
        default="all",
        help="the LM variants and accuracy, the expert schedules, both, or the "
        "damping comparison alone",
    )
    args = p.parse_args()
    mode = common.mode(args)
    sizes = SIZES[mode]
    payload = {"mode": mode, "tolerance": TOL}
    if args.section == "damping":
        payload["damping"] = damping(sizes["damping"], args)
        common.write_json(args, "solvers_damping", payload)
        return
    if args.section in ("all", "schedules"):
        payload["schedules_diffusion_sorption"] = schedules(sizes["schedules"], args)
    if args.section == "schedules":
        common.write_json(args, "solvers_schedules", payload)
        return
    for key, make, variants in (
        ("ds", common.diffusion_sorption, VARIANTS),
        ("ns", common.navier_stokes, VARIANTS),
        ("heat", common.heat, LINEAR_VARIANTS),
    ):
        if sizes[key] is None:
            continue
        problem = make(**sizes[key]["grid"])
        print(problem.name, flush=True)
        payload[problem.name] = {
            "problem": problem.describe(),
            "results": [compare(problem, p, k, variants, args) for p, k in sizes[key]["configs"]],
        }
    problem = common.diffusion_sorption(**sizes["accuracy"]["grid"])
    payload["accuracy_diffusion_sorption"] = [
        accuracy(problem, p, k) for p, k in sizes["accuracy"]["configs"]
    ]
    for row in payload["accuracy_diffusion_sorption"]:
        print(
            f"  accuracy P={row['points_total']} K={row['experts']}: max |dw| "
            f"{row['max_abs_weight_difference']:.2e} (max |w| {row['max_abs_weight']:.2e})"
        )
    common.write_json(args, "solvers", payload)
    if not args.no_plot:
        plot(payload, common.plot_path(args, "solvers"))


if __name__ == "__main__":
    main()
