"""Independent, dense joint and coupled experts against the number of experts `K`.

Diffusion–sorption (`DiffusionSorption()`, exact initial condition) on a 51 x 512 grid, a
random smooth basis of 16 functions, 2,000 PDE points per expert, blended experts
(`Partition(t=1, x=K, overlap=0.5 / K)`: windows overlapping by half a block). For each `K`
and coupling: the time of one forward + gradient (a fixed random read-out of `u`,
differentiated with respect to the basis; the three couplings timed interleaved), XLA's
memory estimate of that program, the physics loss of the blended prediction over the whole
grid (`hcmoe.losses.residual_loss`), LM iterations, and for the coupled mode its inner
(conjugate-gradient) iterations. `coupled` is `hcmoe.Coupled()` (its default inner solve:
the assembled blocks factorised, up to K N = 512), `coupled_cg` `hcmoe.Coupled(inner="cg")`.

    python benchmarks/coupling.py                  # K = 2, 4, 8, 16 (about 10 min, 2 cores)
    python benchmarks/coupling.py --experts 2 4 8 16 32 --repeats 5
    python benchmarks/coupling.py --smoke          # tiny, checks the script

Writes `results/coupling[_quick|_smoke].json` and a plot (time and physics loss against `K`).
"""

from __future__ import annotations

import os


# One OpenBLAS thread (before NumPy loads it): on this 2-core machine under load, OpenBLAS's
# threads made one 256 x 256 Cholesky (the dense joint's, every LM step) take 105-260 ms
# instead of 1.1 ms (measured; docs/notes/2026-12-08-coupled-experts.md). Every coupling
# runs under the same setting; pass OPENBLAS_NUM_THREADS to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.random as jr
import numpy as np

import _common as common
import hcmoe
from hcmoe import losses


COUPLINGS = {
    "independent": "independent",
    "joint": "joint",
    "coupled": hcmoe.Coupled(),  # inner="auto": the assembled blocks factorised up to K N = 512
    "coupled_cg": hcmoe.Coupled(inner="cg"),  # preconditioned CG on the blocks
}


def _partition(experts: int) -> hcmoe.Partition:
    return hcmoe.Partition(t=1, x=experts, overlap=0.5 / experts)


def run(args) -> dict:
    smoke = common.mode(args) == "smoke"
    nt, nx = (11, 64) if smoke else (args.nt, args.nx)
    problem = common.diffusion_sorption(nt=nt, nx=nx, n_basis=8 if smoke else args.n_basis)
    points = 100 if smoke else args.points
    experts = [2, 4] if smoke else args.experts
    basis = problem.basis(seed=args.seed)
    key = jr.key(args.seed)
    rows = []
    for k in experts:
        partition = _partition(k)
        calls, info = {}, {}
        for name in args.couplings:
            options = common.solve_kwargs(points, coupling=COUPLINGS[name])
            forward, grad = common.solve_and_grad(problem, partition, **options)
            compiled = common.compile_fn(grad, basis, key)
            calls[name] = compiled.call
            sol = jax.jit(forward)(basis, key)
            loss = losses.residual_loss(sol.u, problem.pde, problem.grid, problem.data)
            info[name] = {
                "physics_loss": float(loss),
                "lm_steps": int(np.max(sol.stats.num_steps)),
                "converged": bool(np.all(sol.stats.converged)),
                "inner_steps": None
                if sol.stats.inner_steps is None
                else int(np.max(sol.stats.inner_steps)),
                "coupling_residual": None
                if sol.stats.coupling_residual is None
                else float(np.max(sol.stats.coupling_residual)),
                "compile_s": compiled.compile_s,
                "memory": compiled.memory,
            }
        timing = common.time_interleaved(
            calls, repeats=common.repeats(args, 3, 5), budget_s=common.budget(args, 60, 240)
        )
        for name in args.couplings:
            info[name]["forward_and_gradient"] = timing[name]
            if name != "independent" and "independent" in timing:
                info[name]["time_ratio_to_independent"] = common.ratio(timing, name, "independent")
        rows.append({"experts": k, "couplings": info})
        line = ", ".join(
            f"{name} {info[name]['forward_and_gradient']['median_s'] * 1e3:.0f} ms "
            f"loss {info[name]['physics_loss']:.2e}"
            for name in args.couplings
        )
        print(f"K = {k}: {line}", flush=True)
    return {
        "problem": problem.describe() | {"points_per_expert": points, "seed": args.seed},
        "partition": "Partition(t=1, x=K, overlap=0.5 / K)",
        "settings": common.solve_settings(common.solve_kwargs(points)),
        "rows": rows,
    }


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    ks = [row["experts"] for row in result["rows"]]
    for name in result["rows"][0]["couplings"]:
        times = [
            row["couplings"][name]["forward_and_gradient"]["median_s"] for row in result["rows"]
        ]
        loss = [row["couplings"][name]["physics_loss"] for row in result["rows"]]
        left.plot(ks, times, "o-", label=name)
        right.plot(ks, loss, "o-", label=name)
    for ax, title in ((left, "forward + gradient (s)"), (right, "physics loss")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("experts K")
        ax.set_title(title)
    left.legend()
    fig.suptitle("diffusion–sorption 51 x 512, N = 16, 2,000 points per expert")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--couplings", nargs="+", default=list(COUPLINGS), choices=list(COUPLINGS))
    p.add_argument("--nt", type=int, default=51)
    p.add_argument("--nx", type=int, default=512)
    p.add_argument("--n-basis", type=int, default=16)
    p.add_argument("--points", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    jax.config.update("jax_enable_x64", True)
    print(common.describe_machine(), flush=True)
    result = run(args)
    common.write_json(args, "coupling", result)
    if not args.no_plot:
        plot(result, common.plot_path(args, "coupling"))


if __name__ == "__main__":
    main()
