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

Runs are resumable: each method trains in `<out>/<size>/<method>/` (`<size>_seed<S>` for `--seed S`
other than 0, and a suffix for each non-default setting the method uses; a directory whose
checkpoint was written with other flags is refused, naming them) and an interrupted run (Ctrl-C,
a crash, a pre-empted job) continues from its last checkpoint when the same command is run
again; a finished run is only re-evaluated. `--fresh` starts over. Every run writes
`metrics.jsonl`/`.csv`, `results.json`, `prediction.png` (prediction, reference, error, expert
boundaries) and `training.png`; `<out>/<size>/results.md` compares every method run so far.

The residual is weighted by 500 (`--residual-weight`): time measured in units of the horizon, so
the PDE rows (otherwise of order 1e-3) are not negligible next to the IC/BC rows in the constraint
solve and in the loss. `--residual-weight 1` uses the physical units.

`--formulation hcmoe` (default) poses the problem as `diffusion_sorption.FORMULATIONS` says: the
IC exact by construction, boundary rows where the finite-volume reference puts them, global
condition rows, PDE rows from the second level on; `--formulation paper` as the paper's release.
`--scope`, `--exact-ic`, `--ic-weight`, `--bc-weight`, `--initial-layer`, `--boundary` and
`--time-derivative` change one piece of it at a time (unset: the formulation's). The solves'
settings: `--balance` (default: mean for the hcmoe formulation, sum for the paper's), `--ridge`,
`--max-steps`, and the Levenberg–Marquardt solver's `--initial-damping`, `--termination` and
`--warm-start` (unset: the library's defaults).

PI-HC-MoE blends overlapping experts (`--overlap`, 0 for the paper's piecewise prediction)
and fits their weights together (`--coupling joint`: the weights minimise the residual of the
blended field; `--coupling coupled`: the same optimum from per-expert blocks, `hcmoe.Coupled`;
`--coupling independent`: each expert solves alone, as in the paper).
`--total-points` gives PI-HC the points of all experts (equal total points); by default each
method gets `--points-per-expert` per expert, the paper's semantics.

`--steps 300 --n-train 64 --n-test 32 --decay-every 60` trains the quickstart's three runs (the
same errors, to the digit): the flags above then vary the quickstart one setting at a time.

`--extrapolate`: the paper's third experiment. Train on `t <= 400`, predict the whole horizon
and report the error on `t > 400` only (the backbone sees time in units of the full horizon).
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

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import hcmoe  # noqa: E402
from hcmoe import methods, plotting, training  # noqa: E402
from hcmoe.models import FNO  # noqa: E402
from hcmoe.problems import diffusion_sorption  # noqa: E402


CONFIGS = {
    "small": dict(
        backbone=FNO.diffusion_sorption_small,
        steps=1500,
        batch_size=8,
        points_per_expert=400,
        decay_every=300,
        eval_every=250,
        checkpoint_every=100,
        eval_batch_size=16,
    ),
    "paper": dict(
        backbone=FNO.diffusion_sorption_paper,
        steps=4000,
        batch_size=6,
        points_per_expert=20_000,
        decay_every=800,
        eval_every=500,
        checkpoint_every=100,
        eval_batch_size=4,
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=CONFIGS, default="small")
    parser.add_argument(
        "--method",
        nargs="+",
        choices=methods.KINDS,
        default=list(methods.KINDS),
        help="sc (PI-SC), hc (PI-HC), moe (PI-HC-MoE); several are run one after the other",
    )
    parser.add_argument("--steps", type=int, help="override the size's number of steps")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument(
        "--decay-every",
        type=int,
        help="steps between the learning rate's halvings (default: the size's, 300 / 800)",
    )
    parser.add_argument("--points-per-expert", type=int)
    parser.add_argument("--experts", type=int, default=4, help="PI-HC-MoE blocks along x")
    parser.add_argument("--n-train", type=int, help="default: the size's (256 / 8000)")
    parser.add_argument("--n-test", type=int, help="default: the size's (64 / 1000)")
    parser.add_argument("--residual-weight", type=float, default=500.0)
    parser.add_argument("--formulation", choices=diffusion_sorption.FORMULATIONS, default="hcmoe")
    parser.add_argument(
        "--overlap",
        type=float,
        default=0.3,
        help="PI-HC-MoE blending half-width in x (0: the paper's piecewise)",
    )
    # Formulation flags: unset ones take the --formulation's values.
    parser.add_argument(
        "--scope", choices=("global", "owned"), help="which experts get the IC/BC rows"
    )
    parser.add_argument(
        "--exact-ic",
        action=argparse.BooleanOptionalAction,
        help="build the initial condition into the ansatz",
    )
    parser.add_argument("--ic-weight", type=float, help="weight of the initial-condition rows")
    parser.add_argument("--bc-weight", type=float, help="weight of the boundary rows")
    parser.add_argument(
        "--initial-layer", type=float, help="impose the PDE only at t > t0 + this (s)"
    )
    parser.add_argument(
        "--boundary",
        choices=("ghost", "cell"),
        help="boundary rows as the finite-volume reference poses them (ghost) "
        "or on the outermost cell centres (cell)",
    )
    parser.add_argument(
        "--time-derivative",
        choices=("central", "backward"),
        help="the PDE rows' u_t: central or backward differences",
    )
    # The solves (PI-HC and PI-HC-MoE).
    parser.add_argument(
        "--balance",
        choices=("mean", "sum"),
        help="condition rows weighted as in the loss (mean) or plain sums of "
        "squares (sum); default: mean for --formulation hcmoe, sum for paper",
    )
    parser.add_argument(
        "--ridge",
        type=float,
        default=RIDGE,
        help="weight of the ridge rows `ridge * w` (default: the paper's 1e-4)",
    )
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS, help="LM iteration cap")
    parser.add_argument(
        "--warm-start", action="store_true", help="start LM from one Gauss-Newton step"
    )
    parser.add_argument(
        "--initial-damping",
        type=float,
        help="LM damping of the first step (default: the library's, 1e-6; "
        "1 reproduces results from before 2026-12-03)",
    )
    parser.add_argument(
        "--termination",
        choices=("objective", "cauchy"),
        help="when LM stops (default: the library's, objective: once the "
        "objective has converged, or at optimistix's Cauchy test; cauchy: that "
        "test alone, which reproduces results from before 2026-12-06)",
    )
    parser.add_argument(
        "--coupling",
        choices=("joint", "coupled", "independent"),
        default="joint",
        help="PI-HC-MoE experts' weights fitted together (default: one dense problem; "
        "coupled: the same optimum from per-expert blocks, hcmoe.Coupled) or each "
        "expert on its own (the paper)",
    )
    parser.add_argument(
        "--total-points", action="store_true", help="PI-HC gets the points of all experts together"
    )
    parser.add_argument(
        "--extrapolate",
        action="store_true",
        help="train on t <= 400, test on t > 400 (the paper's third experiment)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/diffusion_sorption"))
    parser.add_argument("--data-dir", type=Path, help="dataset cache (default ~/.cache/hcmoe)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    for name, value in CONFIGS[args.size].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for name in (
        "steps",
        "batch_size",
        "decay_every",
        "points_per_expert",
        "experts",
        "n_train",
        "n_test",
        "max_steps",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive int; got {value}")
    if not args.residual_weight > 0:
        parser.error(f"--residual-weight: expected a positive number; got {args.residual_weight}")
    for name in ("overlap", "ic_weight", "bc_weight", "initial_layer", "ridge"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a non-negative number; got {value}")
    if args.balance is None:
        args.balance = default_balance(args.formulation)
    try:  # the partition's own checks, before any data is made
        hcmoe.Partition(t=1, x=args.experts, overlap=args.overlap).blend(
            diffusion_sorption.grid(args.size)
        )
    except ValueError as error:
        parser.error(f"--experts/--overlap: {error}")
    return args


T_TRAIN = 400.0  # --extrapolate: training horizon
RIDGE, MAX_STEPS = 1e-4, 50  # the solves' defaults: the paper's
FORMULATION_FLAGS = {  # flag -> DiffusionSorption field
    "scope": "scope",
    "exact_ic": "exact_initial",
    "ic_weight": "initial_weight",
    "bc_weight": "boundary_weight",
    "initial_layer": "initial_layer",
    "boundary": "boundary",
    "time_derivative": "time_derivative",
}


def default_balance(formulation: str) -> str:
    """The rows' weighting of a formulation: the loss's (mean) or the release's sums (paper)."""
    return "mean" if formulation == "hcmoe" else "sum"


def formulation_changes(args) -> dict:
    """The formulation flags that change `--formulation`'s problem: `{flag: value}`."""
    default = diffusion_sorption.formulation(args.formulation)
    return {
        flag: value
        for flag, field in FORMULATION_FLAGS.items()
        if (value := getattr(args, flag)) is not None and value != getattr(default, field)
    }


def solve_changes(args) -> dict:
    """The solve flags set away from their defaults: `{flag: value}` (PI-HC, PI-HC-MoE)."""
    changes = {
        "balance": args.balance if args.balance != default_balance(args.formulation) else None,
        "ridge": args.ridge if args.ridge != RIDGE else None,
        "max_steps": args.max_steps if args.max_steps != MAX_STEPS else None,
        "warm_start": True if args.warm_start else None,
    }
    return {flag: value for flag, value in changes.items() if value is not None}


def pde(args) -> diffusion_sorption.DiffusionSorption:
    """The problem of every method: `--formulation`, with the formulation flags' changes."""
    return diffusion_sorption.formulation(
        args.formulation,
        **{FORMULATION_FLAGS[flag]: value for flag, value in formulation_changes(args).items()},
    )


def solver(args):
    """The constraint solver of the flags: None (the library's default, LM) unless one of its
    settings is given."""
    settings = {
        name: getattr(args, name)
        for name in ("initial_damping", "termination")
        if getattr(args, name) is not None
    }
    if not settings and not args.warm_start:
        return None
    lm = hcmoe.LevenbergMarquardt(**settings)
    return hcmoe.WarmStart(lm) if args.warm_start else lm


def suffix(flag: str, value) -> str:
    """A run directory's name part for a flag's value: `_icweight2`, `_exactic`, `_noexactic`."""
    name = flag.replace("_", "")
    if isinstance(value, bool):
        return f"_{name}" if value else f"_no{name}"
    return f"_{name}{value:g}" if isinstance(value, float) else f"_{name}{value}"


def train_grid(args, grid):
    """The grid trained on: the whole one, or its levels with t <= 400 (--extrapolate)."""
    if not args.extrapolate:
        return grid
    t = grid.coords("t")
    return grid.with_coords(t=t[t <= T_TRAIN + 1e-9])


def run_directory(args, kind: str | None = None):
    """Where `kind`'s run lives (in `<this>/<kind>`); `run_directory(args)` (every setting)
    holds the comparison. Only PI-HC-MoE has a coupling and only PI-HC takes `--total-points`,
    so the other methods share runs across them."""
    name = args.size + ("_extrapolate" if args.extrapolate else "")
    if args.formulation != "hcmoe":
        name += f"_{args.formulation}"
    name += "".join(suffix(flag, value) for flag, value in formulation_changes(args).items())
    if args.decay_every != CONFIGS[args.size]["decay_every"]:
        name += f"_decay{args.decay_every}"
    if kind in (None, "moe") and args.coupling != "joint":
        name += f"_{args.coupling}"
    if kind in (None, "hc") and args.total_points:
        name += "_totalpoints"
    if kind != "sc" and args.initial_damping is not None:
        name += f"_lambda0{args.initial_damping:g}"
    if kind != "sc" and args.termination is not None:
        name += f"_stop{args.termination}"
    if kind != "sc":
        name += "".join(suffix(flag, value) for flag, value in solve_changes(args).items())
    if args.seed != 0:  # a checkpoint resumes only the seed that wrote it
        name += f"_seed{args.seed}"
    return args.out / name


def run_settings(args, kind: str) -> dict:
    """The flags that shape `kind`'s run (not `--steps`: a finished run may be extended)."""
    names = [
        "size",
        "seed",
        "batch_size",
        "n_train",
        "residual_weight",
        "formulation",
        "extrapolate",
    ]
    if kind != "sc":
        names += ["points_per_expert"]
    if kind == "hc":
        names += ["total_points"]
    if kind == "moe":
        names += ["experts", "overlap", "coupling"]
    if args.decay_every != CONFIGS[args.size]["decay_every"]:  # earlier checkpoints resume
        names.append("decay_every")
    settings = {name: getattr(args, name) for name in names} | formulation_changes(args)
    return settings | (solve_changes(args) if kind != "sc" else {})


def run(kind: str, args, train, test, grid) -> dict:
    directory = run_directory(args, kind) / kind
    points = args.points_per_expert
    if kind == "hc" and args.total_points:
        points *= args.experts
    fit_grid = train_grid(args, grid)
    method = methods.make_method(
        kind,
        args.backbone(jr.key(args.seed)),  # the same initial backbone for every method
        pde(args),
        fit_grid,
        hcmoe.Partition(t=1, x=args.experts, overlap=args.overlap),
        # The backbone sees time in units of the full horizon, on either grid.
        inputs=methods.InitialConditionInput("u0", extents={"t": grid.extent("t")}),
        residual_weight=args.residual_weight,
        rows=hcmoe.Rows(points_per_expert=points, ridge=args.ridge, balance=args.balance),
        solver=solver(args),  # None: the library's default
        max_steps=args.max_steps,
        **({"coupling": args.coupling} if kind == "moe" else {}),
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
        eval_data=None if args.extrapolate else (test_data, test["u"]),
        eval_every=None if args.extrapolate else args.eval_every,
        eval_batch_size=args.eval_batch_size,
        run_dir=directory,
        checkpoint_every=args.checkpoint_every,
        resume=not args.fresh,
        progress=args.progress,
        settings=run_settings(args, kind),  # a reused directory with other flags is refused
    )
    evaluation = methods.evaluate(
        result.model,
        test_data,
        test["u"],
        grid=grid,
        batch_size=args.eval_batch_size,
        num_predictions=len(test["u0"]) if args.extrapolate else 1,
    )
    row = methods.result_row(result.model, evaluation, result.history)
    if args.extrapolate:  # the error on t > 400 only
        late = grid.coords("t") > T_TRAIN + 1e-9
        errors = np.asarray(
            hcmoe.losses.relative_l2(
                jnp.asarray(evaluation.predictions[:, late]),
                jnp.asarray(test["u"][:, late]),
                batch_ndim=1,
            )
        )
        row.update(
            rel_l2_mean=float(errors.mean()),
            rel_l2_std=float(errors.std()),
            rel_l2=errors.tolist(),
            rel_l2_whole_horizon=evaluation.mean,
        )
    (directory / "results.json").write_text(json.dumps(row, indent=2))
    plotting.plot_prediction(
        evaluation.predictions[0],
        test["u"][0],
        grid=grid,
        labels=result.model.labels(grid),
        title=f"{method.name}, test sample 0",
        path=directory / "prediction.png",
    )
    plotting.plot_training_curves(
        result.history,
        keys=["loss"] if args.extrapolate else ["loss", "rel_l2"],
        title=method.name,
        path=directory / "training.png",
    )
    print(methods.results_table([row]))
    return row


def summarise(args, grid) -> str:
    """Compare every method run so far at this size: results.md, results.json, comparison.png."""
    directory = run_directory(args)
    runs = [run_directory(args, kind) / kind / "results.json" for kind in methods.KINDS]
    rows = [json.loads(path.read_text()) for path in runs if path.exists()]
    table = methods.results_table(rows)
    record = {
        "problem": "diffusion-sorption",
        "size": args.size,
        "formulation": args.formulation,
        "extrapolate": args.extrapolate,
        "overlap": args.overlap,
        "coupling": args.coupling,
        **(
            {"changes": changes}
            if (changes := formulation_changes(args) | solve_changes(args))
            else {}
        ),  # the formulation and solve flags away from their defaults
        "grid": list(grid.shape),
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}",
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
        try:
            run(kind, args, train, test, grid)
        except training.RunMismatchError as error:  # another run's checkpoint is there
            sys.exit(f"{error}\nHere: --fresh retrains it; another --out keeps both runs.")
    table = summarise(args, grid)
    print(f"\nHeld-out relative L2 error ({len(test['u0'])} trajectories, {grid}):")
    print(table)
    print(f"({time.perf_counter() - start:.0f} s)")
    return table


if __name__ == "__main__":
    main()
