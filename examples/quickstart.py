"""Quickstart: PI-SC vs PI-HC vs PI-HC-MoE on a small diffusion–sorption problem.

    python examples/quickstart.py                 # a few minutes on a laptop CPU

Trains one small FNO on the physics loss alone (no solution data) as PI-SC (soft constraint),
PI-HC (one hard-constrained expert) and PI-HC-MoE (four blended experts along x, fitted together)
on 64 cached trajectories (26 t x 64 x); prints the errors on 32 held-out ones and writes figures,
`results.json` and `results.md` to `--out`. The research script trains the same three runs with a
flag for every other setting: `examples/diffusion_sorption.py --steps 300 --n-train 64 --n-test 32
--decay-every 60`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax


jax.config.update("jax_enable_x64", True)  # the constraint solves run in float64

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import hcmoe  # noqa: E402
from hcmoe import losses, methods, plotting, training  # noqa: E402
from hcmoe.problems import diffusion_sorption as ds  # noqa: E402


PDE = ds.formulation("hcmoe")  # the problem, and the physics loss, of every method
WEIGHTED = methods.WeightedResidual(PDE, ds.T_FINAL)  # time in units of the 500 s horizon
FIXED = dict(n_train=64, n_test=32, batch_size=8, overlap=0.3, formulation="hcmoe")
TINY = dict(n_train=8, n_test=4, overlap=0.1)  # --tiny: and a 6 x 16 grid, a tiny FNO


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per method")
    parser.add_argument("--experts", type=int, default=4, help="PI-HC-MoE blocks along x")
    parser.add_argument("--points-per-expert", type=int, default=400, help="PDE rows per solve")
    parser.add_argument("--methods", nargs="+", choices=methods.KINDS, default=list(methods.KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    for name in ("steps", "experts", "points_per_expert"):
        if (value := getattr(args, name)) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive int; got {value}")
    vars(args).update(FIXED | (TINY if args.tiny else {}))
    if args.tiny:
        args.points_per_expert = min(args.points_per_expert, 16)
    return args


def make_data(args):
    """Train and test splits, `{"u0": (n, nx), "u": (n, nt, nx)}`, and their grid."""
    if args.tiny:  # reference solutions on a coarse grid, not cached
        grid = ds.make_grid(nt=6, nx=16)
        u0 = ds.sample_initial_conditions(jr.key(args.seed), args.n_train + args.n_test, grid)
        u = jax.vmap(lambda v: ds.reference_solution(v, grid, max_dt=25.0))(u0)
        both, n = {"u0": u0.astype("float32"), "u": u.astype("float32")}, args.n_train
        return {k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()}, grid
    options = dict(seed=args.seed, cache_dir=args.out / "data", progress=args.progress)
    return (
        ds.make_dataset("train", args.n_train, "small", **options),
        ds.make_dataset("test", args.n_test, "small", **options),
        ds.grid("small"),
    )


def physics_loss(grid, data, u) -> float:
    """Mean physics loss (PDE residual + conditions: the training loss) of fields `u`."""

    def one(d, v):
        v = jnp.asarray(v, "float64")
        return losses.residual_loss(v, WEIGHTED, grid, d) + losses.condition_loss(
            v, WEIGHTED, grid, d
        )

    return float(jnp.mean(jax.jit(jax.vmap(one))(data, u)))


def run_method(kind, args, train, test, grid) -> dict:
    """Train one method, evaluate it on the held-out split, save its figure; a results row."""
    size = dict(width=8, n_layers=2, modes=3, fc_width=16) if args.tiny else {}
    method = methods.make_method(
        kind,
        hcmoe.models.FNO.diffusion_sorption_small(jr.key(args.seed), **size),  # same init
        PDE,
        grid,
        hcmoe.Partition(t=1, x=args.experts, overlap=args.overlap),
        residual_weight=ds.T_FINAL,
        rows=hcmoe.Rows(points_per_expert=args.points_per_expert),
        **({"coupling": hcmoe.Joint()} if kind == "moe" else {}),
    )
    print(f"\n== {method.name} ==", flush=True)
    start, test_data = time.perf_counter(), {"u0": test["u0"]}
    result = methods.train(
        method,
        {"u0": train["u0"]},
        steps=args.steps,
        batch_size=args.batch_size,
        key=jr.key(args.seed + 1),
        eval_data=(test_data, test["u"]),
        optimizer=training.paper_optimizer(decay_every=max(1, args.steps // 5)),
        eval_every=max(1, args.steps // 3),
        run_dir=args.out / "runs" / kind,
        resume=False,
        progress=args.progress,
    )
    evaluation = methods.evaluate(result.model, test_data, test["u"], num_predictions=args.n_test)
    plotting.plot_prediction(
        evaluation.predictions[0],
        test["u"][0],
        grid=grid,
        labels=result.model.labels(),
        title=method.name,
        path=args.out / f"prediction_{kind}.png",
    )
    return methods.result_row(result.model, evaluation, result.history) | dict(
        train_seconds=time.perf_counter() - start,
        physics_loss=physics_loss(grid, test_data, evaluation.predictions),
    )


def main(argv=None) -> list[dict]:
    args, start = parse_args(argv), time.perf_counter()
    train, test, grid = make_data(args)
    print(f"diffusion-sorption: {args.n_train} train / {args.n_test} test trajectories on {grid}")
    reference_loss = physics_loss(grid, {"u0": test["u0"]}, test["u"])
    rows = [run_method(kind, args, train, test, grid) for kind in args.methods]
    table, total = methods.results_table(rows), time.perf_counter() - start
    print(f"\nHeld-out relative L2 error ({args.n_test} trajectories), {total:.0f} s in all:")
    print(
        f"{table}\nphysics loss of the reference solutions: {reference_loss:.3g}; of the "
        "predictions: " + ", ".join(f"{r['method']} {r['physics_loss']:.3g}" for r in rows)
    )
    plotting.plot_method_comparison(
        {row["method"]: row["rel_l2"] for row in rows},
        title="diffusion-sorption (quickstart)",
        path=args.out / "comparison.png",
    )
    record = dict(
        command=" ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        machine=f"{jax.devices()[0].device_kind}, jax {jax.__version__}",
        grid=list(grid.shape),
        reference_physics_loss=reference_loss,
        total_seconds=total,
        options={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        results=rows,
    )
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    (args.out / "results.md").write_text(table + "\n")
    print(f"figures and results in {args.out}/")
    return rows


if __name__ == "__main__":
    main()
