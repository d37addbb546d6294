"""Quickstart: PI-SC vs PI-HC vs PI-HC-MoE on a small diffusion–sorption problem.

```
python examples/quickstart.py                 # a few minutes on a laptop CPU
python examples/quickstart.py --steps 1000    # longer, better converged
```

Generates (and caches) a small diffusion–sorption dataset with the JAX finite-volume reference
solver, trains the same small FNO three ways — soft constraint (PI-SC), one hard-constrained
expert (PI-HC) and four experts along x (PI-HC-MoE) — with the same physics loss (PDE residual
plus IC/BC terms, no solution data), prints a comparison table on the held-out split and saves
figures (prediction, reference and error with the expert boundaries) to `--out`.

The problem is posed as `diffusion_sorption.FORMULATIONS["hcmoe"]` (the flags below change one
piece at a time): the initial condition exact by construction, boundary rows where the
finite-volume reference puts them (t > t0), weight 10, given to every expert, PDE rows from the
second time level on; PI-HC-MoE experts overlap by 0.3 in x, are blended by a C1 partition
of unity, and their weights are fitted together (`--coupling joint`: they minimise the residual
of the blended field; `--coupling independent` solves each expert alone, as the paper does).
`examples/results/README.md` has the measurements behind each choice.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax


jax.config.update("jax_enable_x64", True)  # the constraint solves run in float64

import jax.random as jr  # noqa: E402

import hcmoe  # noqa: E402
from hcmoe import methods, plotting, training  # noqa: E402
from hcmoe.models import FNO  # noqa: E402
from hcmoe.problems import diffusion_sorption  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=64, help="training trajectories")
    parser.add_argument("--n-test", type=int, default=32, help="held-out trajectories")
    parser.add_argument("--points-per-expert", type=int, default=400)
    parser.add_argument("--experts", type=int, default=4, help="PI-HC-MoE blocks along x")
    parser.add_argument("--overlap", type=float, default=0.3,
                        help="PI-HC-MoE blending half-width in x (0: piecewise, the paper's)")
    # Formulation flags: unset ones take diffusion_sorption.FORMULATIONS["hcmoe"]'s values.
    parser.add_argument("--scope", choices=("global", "owned"),
                        help="which experts get the IC/BC rows")
    parser.add_argument("--exact-ic", action=argparse.BooleanOptionalAction,
                        help="build the initial condition into the ansatz")
    parser.add_argument("--ic-weight", type=float)
    parser.add_argument("--bc-weight", type=float)
    parser.add_argument("--initial-layer", type=float,
                        help="impose the PDE only at t > t0 + this (s)")
    parser.add_argument("--balance", choices=("mean", "sum"), default="mean")
    parser.add_argument("--ridge", type=float, default=1e-4)
    parser.add_argument("--max-steps", type=int, default=50, help="LM iteration cap")
    parser.add_argument("--initial-damping", type=float,
                        help="LM damping of the first step (default: the library's, 1e-6; "
                        "1 reproduces results from before 2026-12-03)")
    parser.add_argument("--termination", choices=("objective", "cauchy"),
                        help="when LM stops (default: the library's, objective: once the "
                        "objective has converged, or at optimistix's Cauchy test; cauchy: that "
                        "test alone, which reproduces results from before 2026-12-06)")
    parser.add_argument("--warm-start", action="store_true",
                        help="start LM from one Gauss-Newton step")
    parser.add_argument("--time-derivative", choices=("central", "backward"))
    parser.add_argument("--boundary", choices=("ghost", "cell"),
                        help="boundary rows as the finite-volume reference poses them (ghost) "
                        "or on the outermost cell centres (cell)")
    parser.add_argument("--coupling", choices=("joint", "independent"), default="joint",
                        help="PI-HC-MoE experts' weights fitted together (default) or each "
                        "expert on its own (the paper)")
    parser.add_argument("--total-points", action="store_true",
                        help="give PI-HC the points of all experts together (equal total points)")
    parser.add_argument("--methods", nargs="+", choices=methods.KINDS, default=list(methods.KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
    parser.add_argument(
        "--tiny", action="store_true", help="a seconds-long smoke run (tests, CI): tiny grid"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    default = diffusion_sorption.formulation("hcmoe")
    for name, field in _FORMULATION_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, getattr(default, field))
    for name in ("steps", "batch_size", "n_train", "n_test", "points_per_expert", "experts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive int; got "
                         f"{getattr(args, name)}")
    for name in ("overlap", "ic_weight", "bc_weight", "initial_layer"):
        value = getattr(args, name)
        if not value >= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a non-negative number; got {value}")
    return args


def make_data(args):
    """Train and test splits, `{"u0": (n, nx), "u": (n, nt, nx)}`, and their grid."""
    if args.tiny:
        # A coarse grid for smoke tests: reference solutions on it directly (not cached).
        grid = diffusion_sorption.make_grid(nt=6, nx=16)
        n = args.n_train + args.n_test
        u0 = diffusion_sorption.sample_initial_conditions(jr.key(args.seed), n, grid)
        u = jax.vmap(lambda v: diffusion_sorption.reference_solution(v, grid, max_dt=25.0))(u0)
        both = {"u0": u0.astype("float32"), "u": u.astype("float32")}
        train = {name: value[: args.n_train] for name, value in both.items()}
        test = {name: value[args.n_train :] for name, value in both.items()}
        return train, test, grid
    options = dict(
        size="small", seed=args.seed, cache_dir=args.out / "data", progress=args.progress
    )
    train = diffusion_sorption.make_dataset("train", args.n_train, **options)
    test = diffusion_sorption.make_dataset("test", args.n_test, **options)
    return train, test, diffusion_sorption.grid("small")


def backbone(args, key):
    if args.tiny:
        return FNO.diffusion_sorption_small(key, width=8, n_layers=2, modes=3, fc_width=16)
    return FNO.diffusion_sorption_small(key)


RESIDUAL_WEIGHT = diffusion_sorption.T_FINAL  # time in units of the horizon (training and loss)
_FORMULATION_FLAGS = {  # flag -> DiffusionSorption field
    "scope": "scope",
    "exact_ic": "exact_initial",
    "ic_weight": "initial_weight",
    "bc_weight": "boundary_weight",
    "initial_layer": "initial_layer",
    "boundary": "boundary",
    "time_derivative": "time_derivative",
}


def pde(args):
    """The diffusion–sorption PDE as every method poses it (same for all three)."""
    return diffusion_sorption.formulation(
        "hcmoe", **{field: getattr(args, name) for name, field in _FORMULATION_FLAGS.items()}
    )


def physics_loss(pde_, grid, data, u):
    """Mean physics loss (PDE residual + conditions, the training loss) of fields `u`."""
    weighted = methods.WeightedResidual(pde_, RESIDUAL_WEIGHT)

    def one(d, v):
        v = jax.numpy.asarray(v, "float64")
        return hcmoe.losses.residual_loss(v, weighted, grid, d) + hcmoe.losses.condition_loss(
            v, weighted, grid, d)

    return float(jax.numpy.mean(jax.jit(jax.vmap(one))(data, u)))


def run_method(kind, args, train, test, grid):
    """Train one method, evaluate it on the held-out split, save its figure; a results row."""
    points = args.points_per_expert
    if kind == "hc" and args.total_points:
        points *= args.experts
    method = methods.make_method(
        kind,
        backbone(args, jr.key(args.seed)),  # the same initial backbone for every method
        pde(args),
        grid,
        hcmoe.Partition(t=1, x=args.experts, overlap=args.overlap),
        # Time in units of the 500 s horizon: the PDE rows would otherwise be ~1e-3 next to
        # the IC/BC rows, in the solve and in the loss.
        residual_weight=RESIDUAL_WEIGHT,
        points_per_expert=points,
        balance=args.balance,
        ridge=args.ridge,
        max_steps=args.max_steps,
        warm_start=args.warm_start,
        initial_damping=args.initial_damping,  # None: the library's default
        termination=args.termination,  # None: the library's default
        **({"coupling": args.coupling} if kind == "moe" else {}),
    )
    print(f"\n== {method.name} ==", flush=True)
    start = time.perf_counter()
    result = methods.train(
        method,
        {"u0": train["u0"]},
        steps=args.steps,
        batch_size=min(args.batch_size, len(train["u0"])),
        key=jr.key(args.seed + 1),
        optimizer=training.paper_optimizer(decay_every=max(1, args.steps // 5)),
        eval_data=({"u0": test["u0"]}, test["u"]),
        eval_every=max(1, args.steps // 3),
        run_dir=args.out / "runs" / kind,
        resume=False,
        progress=args.progress,
    )
    train_seconds = time.perf_counter() - start
    evaluation = methods.evaluate(
        result.model, {"u0": test["u0"]}, test["u"], num_predictions=len(test["u0"])
    )
    predictions = evaluation.predictions
    labels = result.model.labels()
    seams = None
    if labels is not None and kind == "moe":
        # Largest cell-to-cell change across each interface, over the test set: prediction
        # against the reference (whose change there is the physics).
        def jumps(fields):
            per = [hcmoe.losses.interface_jumps(jax.numpy.asarray(u), labels) for u in fields]
            return {f"{a}-{b}": float(max(p[(a, b)] for p in per)) for (a, b) in per[0]}

        seams = {"prediction": jumps(predictions), "reference": jumps(test["u"])}
    plotting.plot_prediction(
        evaluation.predictions[0],
        test["u"][0],
        grid=grid,
        labels=result.model.labels(),
        title=method.name,
        path=args.out / f"prediction_{kind}.png",
    )
    return {
        "method": method.name,
        "kind": kind,
        "rel_l2_mean": evaluation.mean,
        "rel_l2_std": evaluation.std,
        "rel_l2": evaluation.errors.tolist(),
        "seconds_per_step": methods.seconds_per_step(result.history),
        "train_seconds": train_seconds,
        "solver_steps": evaluation.solver_steps,
        "non_converged": evaluation.non_converged,
        "steps": result.step,
        "physics_loss": physics_loss(pde(args), grid, {"u0": test["u0"]}, predictions),
        "interface_jumps": seams,
    }


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.tiny:
        args.n_train, args.n_test = min(args.n_train, 8), min(args.n_test, 4)
        args.points_per_expert = min(args.points_per_expert, 16)
        args.overlap = min(args.overlap, 0.1)
    start = time.perf_counter()
    train, test, grid = make_data(args)
    print(
        f"diffusion-sorption: {len(train['u0'])} train / {len(test['u0'])} test trajectories "
        f"on {grid} ({time.perf_counter() - start:.0f} s)"
    )
    reference_loss = physics_loss(pde(args), grid, {"u0": test["u0"]}, test["u"])
    rows = [run_method(kind, args, train, test, grid) for kind in args.methods]
    table = methods.results_table(rows)
    total = time.perf_counter() - start
    print(f"\nHeld-out relative L2 error ({len(test['u0'])} trajectories), {total:.0f} s in all:")
    print(table)
    print(f"physics loss of the reference solutions: {reference_loss:.3g}; of the predictions: "
          + ", ".join(f"{r['method']} {r['physics_loss']:.3g}" for r in rows))
    for row in rows:
        if row["interface_jumps"]:
            pred, ref = row["interface_jumps"]["prediction"], row["interface_jumps"]["reference"]
            print("largest change across each interface (prediction / reference): "
                  + ", ".join(f"{k}: {pred[k]:.3f} / {ref[k]:.3f}" for k in pred))
    plotting.plot_method_comparison(
        {row["method"]: row["rel_l2"] for row in rows},
        title="diffusion-sorption (quickstart)",
        path=args.out / "comparison.png",
    )
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}".strip(),
        "grid": list(grid.shape),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "reference_physics_loss": reference_loss,
        "total_seconds": total,
        "results": rows,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    (args.out / "results.md").write_text(table + "\n")
    print(f"figures and results in {args.out}/")
    return rows


if __name__ == "__main__":
    main()
