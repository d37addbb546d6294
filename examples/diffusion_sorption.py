"""Diffusion–sorption (PDEBench, 1-D): PI-SC vs PI-HC vs PI-HC-MoE.

```
python examples/diffusion_sorption.py                          # small: CPU, all three methods
python examples/diffusion_sorption.py --method moe             # one method
python examples/diffusion_sorption.py --size paper             # the paper's setup (a GPU)
```

`--size small`: 26 t x 64 x, 256 / 64 trajectories, a small FNO (N = 8). `--size paper`: the
configuration of REFERENCE.md — 101 t x 1024 x, 8000 / 1000 trajectories, FNO2D (5 layers, width
64, 8 modes, fc 128, N = 16, GELU outputs), 20,000 points per expert, 1 x 4 experts, LM
(rtol = atol = 1e-4, <= 50 steps), batch 6, Adam with clipping 1.0, 1e-3 halved every 800 steps
(floor 1e-4), 4000 steps.

Runs are resumable: each method trains in `<out>/<size>/<method>/` and an interrupted run (Ctrl-C,
a crash, a pre-empted job) continues from its last checkpoint when the same command is run
again; a finished run is only re-evaluated. `--fresh` starts over. Every run writes
`metrics.jsonl`/`.csv`, `results.json`, `prediction.png` (prediction, reference, error, expert
boundaries) and `training.png`; `<out>/<size>/results.md` compares every method run so far.

The residual is weighted by 500 (`--residual-weight`): time measured in units of the horizon, so
the PDE rows (otherwise of order 1e-3) are not negligible next to the IC/BC rows in the constraint
solve and in the loss. `--residual-weight 1` uses the physical units.
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


CONFIGS = {
    "small": dict(
        backbone=FNO.diffusion_sorption_small, steps=1500, batch_size=8, points_per_expert=400,
        decay_every=300, eval_every=250, checkpoint_every=100, eval_batch_size=16,
    ),
    "paper": dict(
        backbone=FNO.diffusion_sorption_paper, steps=4000, batch_size=6,
        points_per_expert=20_000, decay_every=800, eval_every=500, checkpoint_every=100,
        eval_batch_size=4,
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=CONFIGS, default="small")
    parser.add_argument(
        "--method", nargs="+", choices=methods.KINDS, default=list(methods.KINDS),
        help="sc (PI-SC), hc (PI-HC), moe (PI-HC-MoE); several are run one after the other",
    )
    parser.add_argument("--steps", type=int, help="override the size's number of steps")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--points-per-expert", type=int)
    parser.add_argument("--experts", type=int, default=4, help="PI-HC-MoE blocks along x")
    parser.add_argument("--n-train", type=int, help="default: the size's (256 / 8000)")
    parser.add_argument("--n-test", type=int, help="default: the size's (64 / 1000)")
    parser.add_argument("--residual-weight", type=float, default=500.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/diffusion_sorption"))
    parser.add_argument("--data-dir", type=Path, help="dataset cache (default ~/.cache/hcmoe)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    for name, value in CONFIGS[args.size].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def run(kind: str, args, train, test, grid) -> dict:
    directory = args.out / args.size / kind
    method = methods.make_method(
        kind,
        args.backbone(jr.key(args.seed)),  # the same initial backbone for every method
        diffusion_sorption.DiffusionSorption(),
        grid,
        hcmoe.Partition(t=1, x=args.experts),
        residual_weight=args.residual_weight,
        points_per_expert=args.points_per_expert,
    )
    print(f"\n== {method.name} ({args.size}) -> {directory} ==", flush=True)
    test_data = {"u0": test["u0"]}
    result = methods.train(
        method,
        {"u0": train["u0"]},
        steps=args.steps,
        batch_size=args.batch_size,
        key=jr.key(args.seed + 1),
        optimizer=training.paper_optimizer(decay_every=args.decay_every),
        eval_data=(test_data, test["u"]),
        eval_every=args.eval_every,
        eval_batch_size=args.eval_batch_size,
        run_dir=directory,
        checkpoint_every=args.checkpoint_every,
        resume=not args.fresh,
        progress=args.progress,
    )
    evaluation = methods.evaluate(
        result.model, test_data, test["u"], batch_size=args.eval_batch_size
    )
    row = methods.result_row(result.model, evaluation, result.history)
    (directory / "results.json").write_text(json.dumps(row, indent=2))
    plotting.plot_prediction(
        evaluation.predictions[0], test["u"][0], grid=grid, labels=result.model.labels(),
        title=f"{method.name}, test sample 0", path=directory / "prediction.png",
    )
    plotting.plot_training_curves(
        result.history, keys=["loss", "rel_l2"], title=method.name,
        path=directory / "training.png",
    )
    print(methods.results_table([row]))
    return row


def summarise(args, grid) -> str:
    """Compare every method run so far at this size: results.md, results.json, comparison.png."""
    directory = args.out / args.size
    rows = [
        json.loads((directory / kind / "results.json").read_text())
        for kind in methods.KINDS
        if (directory / kind / "results.json").exists()
    ]
    table = methods.results_table(rows)
    record = {
        "problem": "diffusion-sorption",
        "size": args.size,
        "grid": list(grid.shape),
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}",
        "results": rows,
    }
    (directory / "results.json").write_text(json.dumps(record, indent=2))
    (directory / "results.md").write_text(table + "\n")
    plotting.plot_method_comparison(
        {row["method"]: row["rel_l2"] for row in rows},
        title=f"diffusion-sorption ({args.size})",
        path=directory / "comparison.png",
    )
    return table


def main(argv=None) -> str:
    args = parse_args(argv)
    start = time.perf_counter()
    options = dict(size=args.size, seed=args.seed, cache_dir=args.data_dir, progress=args.progress)
    train = diffusion_sorption.make_dataset("train", args.n_train, **options)
    test = diffusion_sorption.make_dataset("test", args.n_test, **options)
    grid = diffusion_sorption.grid(args.size)
    for kind in args.method:
        run(kind, args, train, test, grid)
    table = summarise(args, grid)
    print(f"\nHeld-out relative L2 error ({len(test['u0'])} trajectories, {grid}):")
    print(table)
    print(f"({time.perf_counter() - start:.0f} s)")
    return table


if __name__ == "__main__":
    main()
