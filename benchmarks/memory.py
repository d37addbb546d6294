"""Peak memory (and time) of a gradient step: implicit adjoint vs unrolled solves, vs points.

The gradient of a fixed linear read-out of `u` with respect to the basis is compiled with

- `hcmoe`: the default (`adjoint=None`): hcmoe's implicit adjoint in field form
  (`hcmoe._adjoint`), one linear solve with the Hessian at the solution whose right-hand side
  goes through each expert's field, not through the operator stacks;
- `implicit`: `optimistix.ImplicitAdjoint()` (hcmoe's default before 2026-12-04): the same
  equation, differentiated through the operator stacks; nothing stored per iteration;
- `unrolled`: `optimistix.RecursiveCheckpointAdjoint()`: backpropagation through the LM
  iterations with optimistix's default binomial checkpointing (about log(max_steps) stored
  iterates, the rest recomputed);
- `unrolled_all`: `RecursiveCheckpointAdjoint(checkpoints=max_steps)`: every iterate stored.

Memory is XLA's static buffer assignment of the compiled gradient (`memory_analysis()`:
temporaries + arguments + outputs), deterministic and available on CPU and GPU. The gradients of
the three variants are timed interleaved, and their values compared.

    python benchmarks/memory.py --quick
    python benchmarks/memory.py
    python benchmarks/memory.py --problem ds --points 20000 80000 --adjoints hcmoe implicit
"""

from __future__ import annotations

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optimistix as optx

import _common as common


MAX_STEPS = 50
ADJOINTS = {
    "hcmoe": lambda: None,
    "implicit": lambda: optx.ImplicitAdjoint(),
    "unrolled": lambda: optx.RecursiveCheckpointAdjoint(),
    "unrolled_all": lambda: optx.RecursiveCheckpointAdjoint(checkpoints=MAX_STEPS),
}
SIZES = {
    "smoke": {"ds": dict(grid=dict(nt=11, nx=64, n_basis=8), points=[64], experts=[1]), "ns": None},
    "quick": {
        "ds": dict(grid=dict(), points=[100, 1000, 10_000], experts=[1, 4]),
        "ns": dict(grid=dict(nt=16, n=32, n_basis=16), points=[100, 1000, 10_000], experts=[1]),
    },
    "full": {
        "ds": dict(grid=dict(), points=[100, 1000, 10_000, 100_000], experts=[1, 4]),
        "ns": dict(grid=dict(), points=[100, 1000, 10_000, 100_000], experts=[1, 4]),
    },
}


def measure(problem, points: int, experts: int, args) -> dict:
    basis, key = problem.basis(), jr.key(0)
    partition = problem.partition(experts)
    per_expert = max(points // experts, 1)
    record = {
        "points_total": points,
        "experts": experts,
        "points_per_expert": per_expert,
        "adjoints": {},
    }
    calls, grads = {}, {}
    chosen = {name: ADJOINTS[name] for name in args.adjoints}
    for name, adjoint in chosen.items():
        options = common.solve_kwargs(per_expert, adjoint=adjoint(), max_steps=MAX_STEPS)
        _, grad = common.solve_and_grad(problem, partition, **options)
        compiled = common.compile_fn(grad, basis, key)
        record["adjoints"][name] = {"memory": compiled.memory, "compile_s": compiled.compile_s}
        calls[name] = compiled.call
        grads[name] = np.asarray(compiled.call())
    timing = common.time_interleaved(
        calls, repeats=common.repeats(args, quick=3, full=5), budget_s=common.budget(args)
    )
    reference = grads[args.adjoints[0]]
    scale = float(np.linalg.norm(reference))
    record["gradient_reference"] = args.adjoints[0]
    for name in chosen:
        entry = record["adjoints"][name]
        entry["gradient"] = timing[name]
        entry["gradient_norm"] = float(np.linalg.norm(grads[name]))
        entry["gradient_finite"] = bool(np.all(np.isfinite(grads[name])))
        entry["gradient_relative_difference_vs_reference"] = float(
            np.linalg.norm(grads[name] - reference) / scale
        )
    peak = {name: record["adjoints"][name]["memory"].get("peak_bytes") for name in chosen}
    temp = {name: record["adjoints"][name]["memory"].get("temp_bytes") for name in chosen}
    if {"hcmoe", "implicit"} <= set(chosen) and None not in peak.values():
        record["peak_ratio_implicit_over_hcmoe"] = peak["implicit"] / peak["hcmoe"]
        record["time_ratio_implicit_over_hcmoe"] = common.ratio(timing, "implicit", "hcmoe")
    if {"implicit", "unrolled", "unrolled_all"} <= set(chosen) and None not in peak.values():
        record["peak_ratio_unrolled_over_implicit"] = peak["unrolled"] / peak["implicit"]
        record["peak_ratio_unrolled_all_over_implicit"] = peak["unrolled_all"] / peak["implicit"]
        record["temp_ratio_unrolled_over_implicit"] = temp["unrolled"] / max(temp["implicit"], 1)
        record["time_ratio_unrolled_over_implicit"] = common.ratio(timing, "unrolled", "implicit")
        record["time_ratio_unrolled_all_over_implicit"] = common.ratio(
            timing, "unrolled_all", "implicit"
        )
    times = ", ".join(f"{n} {timing[n]['median_s'] * 1e3:.1f} ms" for n in chosen)
    print(
        f"  P={points:<7d} K={experts}: peak "
        + ", ".join(f"{n} {common.fmt_bytes(b)}" for n, b in peak.items() if b is not None)
        + f"; gradient {times}",
        flush=True,
    )
    return record


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in ("diffusion_sorption", "navier_stokes") if s in payload]
    fig, axes = plt.subplots(1, len(sections), figsize=(6 * len(sections), 4.2), squeeze=False)
    for ax, section in zip(axes[0], sections):
        records = payload[section]["results"]
        for experts in sorted({r["experts"] for r in records}):
            rs = sorted(
                (r for r in records if r["experts"] == experts), key=lambda r: r["points_total"]
            )
            x = [r["points_total"] for r in rs]
            for name, style in (
                ("hcmoe", "D-"),
                ("implicit", "o-"),
                ("unrolled", "s--"),
                ("unrolled_all", "^:"),
            ):
                if name not in rs[0]["adjoints"]:
                    continue
                y = [r["adjoints"][name]["memory"].get("peak_bytes", np.nan) / 2**20 for r in rs]
                ax.plot(x, y, style, label=f"{name}, K={experts}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("constrained points (total)")
        ax.set_ylabel("peak MiB of a gradient (XLA buffer assignment)")
        ax.set_title(section)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"adjoints ({payload['mode']}): {common.describe_machine()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--problem", choices=["ds", "ns", "both"], default="both")
    p.add_argument("--points", type=int, nargs="+", help="total constrained points to sweep")
    p.add_argument(
        "--adjoints",
        nargs="+",
        choices=list(ADJOINTS),
        default=list(ADJOINTS),
        help="which adjoints to compile and time (the first is the gradients' reference)",
    )
    args = p.parse_args()
    mode = common.mode(args)
    payload = {"mode": mode, "max_steps": MAX_STEPS}
    for key, make in (("ds", common.diffusion_sorption), ("ns", common.navier_stokes)):
        size = SIZES[mode][key]
        if size is None or args.problem not in ("both", key):
            continue
        if args.points:
            size = size | {"points": args.points}
        problem = make(**size["grid"])
        print(problem.name, flush=True)
        payload[problem.name] = {
            "problem": problem.describe(),
            "results": [
                measure(problem, p, k, args) for k in size["experts"] for p in size["points"]
            ],
        }
    name = common.output_name("memory", args)
    common.write_json(args, name, payload)
    if not args.no_plot:
        plot(payload, common.plot_path(args, name))


if __name__ == "__main__":
    jnp.zeros(())
    main()
