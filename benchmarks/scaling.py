"""Time of the constraint layer vs constrained points and vs experts; compile time; LM steps.

Two sweeps per problem, every configuration jitted once (compile time recorded), warmed up,
then timed with the other configurations of its sweep point interleaved (same rounds):

- `points`: total constrained PDE points P = 10^2 .. 10^5, split evenly over K experts
  (PI-HC: K = 1, PI-HC-MoE: K = 2, 4, 8; `points_per_expert = P / K`), so every K imposes
  the same number of constraints. Reports HC-MoE / HC time ratios from the same rounds.
- `experts`: K = 1 .. 16 at a fixed number of points per expert (the work grows with K).

For each configuration: median/IQR time of the forward solve and of forward + backward
(gradient of a fixed linear read-out of `u` with respect to the basis), lowering and compile
time of both, XLA's memory estimate, LM steps per expert, the fraction of experts that
converged and their residual norms.

    python benchmarks/scaling.py --quick            # a few minutes on a laptop CPU
    python benchmarks/scaling.py                    # paper sizes (GPU recommended)
    python benchmarks/scaling.py --problem ds --points 100 1000 --experts 1 4
    python benchmarks/scaling.py --problem ds --points 10000 100000 --experts 1 4 \
        --sweep-experts 1 --seeds 0 1 2          # MoE vs HC on three random bases

`--seeds` repeats the sweeps on several random bases (seed s: basis `s`, point draw `s`): the LM
iteration counts, and so the MoE / HC ratios, depend on the basis (benchmarks/README.md,
section 11). `--termination` picks the solver's stopping rule, `--schedule` how the experts
run and `--condition-scope` which condition rows each expert holds (defaults: the library's;
section 15 compares them at 10^4 points).
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import jax.random as jr
import numpy as np

import _common as common
import hcmoe


SIZES = {
    "smoke": {
        "ds": dict(
            grid=dict(nt=11, nx=64, n_basis=8),
            points=[64],
            experts=[1, 2],
            sweep_experts=[],
            per_expert=32,
        ),
        "ns": dict(
            grid=dict(nt=4, n=8, n_basis=4),
            points=[64],
            experts=[1, 2],
            sweep_experts=[],
            per_expert=32,
        ),
    },
    "quick": {
        "ds": dict(
            grid=dict(),
            points=[100, 1000, 10_000],
            experts=[1, 4],
            sweep_experts=[1, 2, 4, 8],
            per_expert=1000,
        ),
        "ns": dict(
            grid=dict(nt=16, n=32, n_basis=16),
            points=[100, 1000, 10_000],
            experts=[1, 4],
            sweep_experts=[1, 2, 4, 8],
            per_expert=1000,
        ),
    },
    "full": {
        "ds": dict(
            grid=dict(),
            points=[100, 1000, 10_000, 100_000],
            experts=[1, 2, 4, 8],
            sweep_experts=[1, 2, 4, 8, 16],
            per_expert=5000,
        ),
        "ns": dict(
            grid=dict(),
            points=[100, 1000, 10_000, 100_000],
            experts=[1, 2, 4, 8],
            sweep_experts=[1, 2, 4, 8, 16],
            per_expert=5000,
        ),
    },
}


def make_problem(name: str, grid_options: dict) -> common.Problem:
    if name == "ds":
        return common.diffusion_sorption(**grid_options)
    return common.navier_stokes(**grid_options)


def solve_stats(solution) -> dict:
    stats = solution.stats
    steps = np.asarray(stats.num_steps)
    return {
        "lm_steps": steps.tolist(),
        "lm_steps_mean": float(steps.mean()),
        "lm_steps_max": int(steps.max()),
        "converged_fraction": float(np.mean(np.asarray(stats.converged))),
        "residual_norm": np.asarray(stats.residual_norm).tolist(),
    }


def run_group(problem, configs: list[dict], args, skip: dict, seed: int = 0) -> list[dict]:
    """Compile, check and time a group of configurations interleaved, on basis `seed` (and
    point draw `seed`). `skip` maps K to the reason larger configurations of that K are
    skipped (a call over the time limit)."""
    basis = problem.basis(seed)
    key = jr.key(seed)
    records, calls = [], {}
    for config in configs:
        experts, points = config["experts"], config["points_per_expert"]
        record = dict(config) | {"seed": seed}
        if experts in skip:
            record["skipped"] = skip[experts]
            records.append(record)
            continue
        partition = problem.partition(experts)
        forward, grad = common.solve_and_grad(problem, partition, **solve_options(points, args))
        fwd = common.compile_fn(forward, basis, key)
        bwd = common.compile_fn(grad, basis, key)
        start = time.perf_counter()
        solution = fwd.call()
        first_call = time.perf_counter() - start
        record |= {
            "compile_forward": {"lower_s": fwd.lower_s, "compile_s": fwd.compile_s},
            "compile_gradient": {"lower_s": bwd.lower_s, "compile_s": bwd.compile_s},
            "memory_forward": fwd.memory,
            "memory_gradient": bwd.memory,
            "first_forward_s": first_call,
        } | solve_stats(solution)
        if first_call > args.max_call_seconds:
            skip[experts] = (
                f"a forward call took {first_call:.0f} s at "
                f"{points} points per expert (> --max-call-seconds)"
            )
            record["timing_skipped"] = skip[experts]
        else:
            calls[f"{experts}/forward"] = fwd.call
            calls[f"{experts}/gradient"] = bwd.call
        records.append(record)
        print(
            f"  K={experts:<3d} m={points:<7d} "
            f"compile {fwd.compile_s:5.1f}+{bwd.compile_s:5.1f} s  "
            f"steps {record['lm_steps_mean']:5.1f}  converged "
            f"{record['converged_fraction']:.2f}",
            flush=True,
        )
    if calls:
        timing = common.time_interleaved(
            calls, repeats=common.repeats(args), budget_s=common.budget(args)
        )
        for record in records:
            for part in ("forward", "gradient"):
                name = f"{record['experts']}/{part}"
                if name in timing:
                    record[part] = timing[name]
                    if "1/" + part in timing:
                        record[f"{part}_speedup_vs_hc"] = common.ratio(timing, "1/" + part, name)
    return records


def solve_extra(args) -> dict:
    """Solve options set on the command line (none: the library's defaults)."""
    options = {
        "termination": args.termination,
        "schedule": args.schedule,
        "condition_scope": args.condition_scope,
    }
    return {name: value for name, value in options.items() if value is not None}


def solve_options(points: int | None, args) -> dict:
    """`hcmoe.solve`'s keywords: the paper's settings (`common.solve_kwargs`) with the ones
    set on the command line on the objects that own them."""
    extra = solve_extra(args)
    coupling = (
        {"coupling": hcmoe.Independent(schedule=extra["schedule"])} if "schedule" in extra else {}
    )
    return common.solve_kwargs(
        points,
        lm={k: v for k, v in extra.items() if k == "termination"},
        rows={k: v for k, v in extra.items() if k == "condition_scope"},
        **coupling,
    )


def sweep_points(problem, size: dict, args) -> list[dict]:
    results = []
    for seed in args.seeds:
        skip = {}
        for total in size["points"]:
            print(f"{problem.name}: {total} constrained points, basis {seed}", flush=True)
            configs = [
                {
                    "sweep": "points",
                    "experts": k,
                    "points_total": total,
                    "points_per_expert": max(total // k, 1),
                }
                for k in size["experts"]
            ]
            results += run_group(problem, configs, args, skip, seed)
    return results


def sweep_experts(problem, size: dict, args) -> list[dict]:
    if not size["sweep_experts"]:
        return []
    per_expert = size["per_expert"]
    results = []
    for seed in args.seeds:
        print(f"{problem.name}: {per_expert} points per expert, basis {seed}", flush=True)
        configs = [
            {
                "sweep": "experts",
                "experts": k,
                "points_total": k * per_expert,
                "points_per_expert": per_expert,
            }
            for k in size["sweep_experts"]
        ]
        results += run_group(problem, configs, args, {}, seed)
    return results


def print_ratios(results: list[dict]) -> None:
    """PI-HC / PI-HC-MoE time ratios of the points sweep (> 1: the MoE is faster)."""
    for r in results:
        if r["sweep"] == "points" and r["experts"] != 1 and "forward_speedup_vs_hc" in r:
            print(
                f"  basis {r['seed']}, {r['points_total']} points, K = {r['experts']}: "
                f"HC / MoE forward {r['forward_speedup_vs_hc']:.2f}x, fwd+bwd "
                f"{r['gradient_speedup_vs_hc']:.2f}x (steps {r['lm_steps']})",
                flush=True,
            )


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(payload["problems"])
    fig, axes = plt.subplots(len(problems), 3, figsize=(15, 4.2 * len(problems)), squeeze=False)
    for row, name in zip(axes, problems):
        records = payload["problems"][name]["results"]
        first = records[0].get("seed", 0) if records else 0
        records = [r for r in records if r.get("seed", 0) == first]  # one basis per curve
        points = [r for r in records if r["sweep"] == "points" and "forward" in r]
        for k in sorted({r["experts"] for r in points}):
            rs = sorted((r for r in points if r["experts"] == k), key=lambda r: r["points_total"])
            label = "PI-HC (K=1)" if k == 1 else f"PI-HC-MoE (K={k})"
            x = [r["points_total"] for r in rs]
            row[0].plot(x, [r["forward"]["median_s"] for r in rs], "o-", label=label)
            row[1].plot(x, [r["gradient"]["median_s"] for r in rs], "o-", label=label)
        experts = sorted(
            (r for r in records if r["sweep"] == "experts" and "forward" in r),
            key=lambda r: r["experts"],
        )
        if experts:
            x = [r["experts"] for r in experts]
            row[2].plot(x, [r["forward"]["median_s"] for r in experts], "o-", label="forward")
            row[2].plot(
                x, [r["gradient"]["median_s"] for r in experts], "s-", label="forward + backward"
            )
            row[2].set_title(f"{name}: {experts[0]['points_per_expert']} points per expert")
        row[0].set_title(f"{name}: forward")
        row[1].set_title(f"{name}: forward + backward")
        for ax in row[:2]:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("constrained points (total)")
        row[2].set_xlabel("experts K")
        row[2].set_xscale("log", base=2)
        for ax in row:
            ax.set_ylabel("seconds (median)")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"hcmoe constraint layer ({payload['mode']}): {common.describe_machine()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--problem", choices=["ds", "ns", "both"], default="both")
    p.add_argument("--points", type=int, nargs="+", help="total constrained points to sweep")
    p.add_argument("--experts", type=int, nargs="+", help="expert counts of the points sweep")
    p.add_argument("--sweep-experts", type=int, nargs="+", help="expert counts, fixed points")
    p.add_argument("--per-expert", type=int, help="points per expert of the experts sweep")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="random bases (and point draws) to repeat the sweeps on",
    )
    p.add_argument(
        "--termination",
        choices=("objective", "cauchy"),
        default=None,
        help="the solver's stopping rule (default: the library's)",
    )
    p.add_argument(
        "--schedule",
        choices=("auto", "vmap", "map"),
        default=None,
        help="how the experts run (default: the library's, 'auto')",
    )
    p.add_argument(
        "--condition-scope",
        choices=("owned", "global"),
        default=None,
        help="which condition rows each expert holds (default: each condition's "
        "own scope; the paper's diffusion-sorption MoE: global)",
    )
    p.add_argument(
        "--max-call-seconds",
        type=float,
        default=None,
        help="skip larger configurations of a K once one forward call is slower",
    )
    args = p.parse_args()
    mode = common.mode(args)
    if args.max_call_seconds is None:
        args.max_call_seconds = {"smoke": 60.0, "quick": 30.0, "full": 600.0}[mode]
    names = ["ds", "ns"] if args.problem == "both" else [args.problem]
    payload = {"mode": mode, "settings": vars(args) | {"out": str(args.out)}, "problems": {}}
    for name in names:
        size = dict(SIZES[mode][name])
        for option in ("points", "experts", "sweep_experts", "per_expert"):
            if getattr(args, option) is not None:
                size[option] = getattr(args, option)
        problem = make_problem(name, size["grid"])
        results = sweep_points(problem, size, args) + sweep_experts(problem, size, args)
        print_ratios(results)
        payload["problems"][problem.name] = {
            "problem": problem.describe(),
            "solver": common.solve_settings(solve_options(None, args))
            | solve_extra(args)
            | {"solver": "hcmoe default"},
            "results": results,
        }
    name = common.output_name("scaling", args)
    common.write_json(args, name, payload)
    if not args.no_plot:
        plot(payload, common.plot_path(args, name))


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
