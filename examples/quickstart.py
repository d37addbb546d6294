"""Quickstart: PI-SC vs PI-HC vs PI-HC-MoE on a small diffusion–sorption problem.

    python examples/quickstart.py                 # a few minutes on a laptop CPU

Trains one small FNO on the physics loss alone (no solution data) as PI-SC (soft constraint),
PI-HC (one hard-constrained expert) and PI-HC-MoE (four blended experts along x, fitted together)
on 64 cached trajectories (26 t x 64 x); prints the errors on 32 held-out ones and writes figures,
`results.json` and `results.md` to `--out`. `examples/diffusion_sorption.py` has a flag for every
other setting (`--steps 300 --n-train 64 --n-test 32 --decay-every 60` train the same runs).
"""

import argparse
import time
from pathlib import Path

import jax


jax.config.update("jax_enable_x64", True)  # the constraint solves run in float64

import jax.random as jr  # noqa: E402

import hcmoe  # noqa: E402
from hcmoe import methods, plotting, training  # noqa: E402
from hcmoe.problems import diffusion_sorption as ds  # noqa: E402


FIXED = dict(n_train=64, n_test=32, batch_size=8, overlap=0.3, formulation="hcmoe")
TINY = dict(n_train=8, n_test=4, points_per_expert=16)  # and a tiny FNO


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
    return args


def run(kind, args, train, test, grid) -> dict:
    """Train one method, evaluate it on the held-out split, save its figure; a results row."""
    tiny_fno = dict(width=8, n_layers=1, modes=3, fc_width=16) if args.tiny else {}
    method = methods.make_method(
        kind,
        hcmoe.models.FNO.diffusion_sorption_small(jr.key(args.seed), **tiny_fno),  # same init
        ds.formulation("hcmoe"),
        grid,
        hcmoe.Partition(t=1, x=args.experts, overlap=args.overlap),
        residual_weight=ds.T_FINAL,  # time in units of the 500 s horizon
        rows=hcmoe.Rows(points_per_expert=args.points_per_expert),
        **({"coupling": hcmoe.Joint()} if kind == "moe" else {}),  # experts fitted together
    )
    print(f"\n== {method.name} ==", flush=True)
    test_data = {"u0": test["u0"]}
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
    model = result.model
    evaluation = methods.evaluate(model, test_data, test["u"], num_predictions=args.n_test)
    path = args.out / f"prediction_{kind}.png"
    style = dict(grid=grid, labels=model.labels(), title=method.name, path=path)
    plotting.plot_prediction(evaluation.predictions[0], test["u"][0], **style)
    return methods.result_row(model, evaluation, result.history) | dict(
        physics_loss=methods.physics_loss(model, test_data, evaluation.predictions),
        reference_physics_loss=methods.physics_loss(model, test_data, test["u"]),
    )


def main(argv=None) -> list[dict]:
    args, start = parse_args(argv), time.perf_counter()
    grid, options = ds.grid("small"), dict(seed=args.seed, cache_dir=args.out / "data")
    train = ds.make_dataset("train", args.n_train, "small", progress=args.progress, **options)
    test = ds.make_dataset("test", args.n_test, "small", progress=args.progress, **options)
    print(f"diffusion-sorption: {args.n_train} train / {args.n_test} test trajectories on {grid}")
    rows = [run(kind, args, train, test, grid) for kind in args.methods]
    total, reference_loss = time.perf_counter() - start, rows[0]["reference_physics_loss"]
    record = dict(grid=list(grid.shape), reference_physics_loss=reference_loss, total_seconds=total)
    title = "diffusion-sorption (quickstart)"
    table = methods.write_results(
        args.out, rows, title=title, argv=argv, **record, options=vars(args)
    )
    losses = ", ".join(f"{r['method']} {r['physics_loss']:.3g}" for r in rows)
    print(
        f"\nHeld-out relative L2 error ({args.n_test} trajectories), {total:.0f} s in all:\n"
        f"{table}\nphysics loss of the reference solutions: {reference_loss:.3g}; of the "
        f"predictions: {losses}\nfigures and results in {args.out}/"
    )
    return rows


if __name__ == "__main__":
    main()
