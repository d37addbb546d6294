"""Navier–Stokes (2-D vorticity, periodic): PI-SC vs PI-HC vs PI-HC-MoE, tested on finer grids.

```
python examples/navier_stokes.py                          # small: CPU, all three methods
python examples/navier_stokes.py --method moe             # one method
python examples/navier_stokes.py --size paper             # the paper's setup (a GPU)
```

`--size small` (about 15 min on 2 cores, all three methods): train on 16 t x 32 x 32 on t in
[0, 2] (64 trajectories), test on 16 trajectories solved at 64 x 64 and evaluated at 64² and
32²; an FNO3D with the paper's N = 64 functions from 4 layers, width 32, 6 modes and fc 128
(`--backbone wide`); 192 steps of the paper's optimiser from a learning rate of 3e-3; PI-HC-MoE
with 1 x 2 x 1 experts (`--experts`). The horizon is 2, not the paper's 5: on a 32² grid the
vorticity cascade of t in [0, 5] is not resolved (the reference's own residual is 19% of `w_t`
there, 2.8% on [0, 2]; `examples/results/README.md`), and a physics loss whose minimiser is not
the reference cannot rank methods. Why this backbone and these experts: with fewer functions
(the small FNO3D's N = 16, `--backbone small`, or the wide trunk with 16 or 32) PI-HC is behind
PI-SC on every seed; with N = 64 the paper's 1 x 2 x 2 experts make one joint solve of 256
weights, about 40 min here, and 1 x 2 x 1 halves that to 128. The earlier small configuration
is `--backbone small --experts 1x2x2 --epochs 16` (7 min). `--size paper`: the configuration of
REFERENCE.md — train on 64 t x 64 x 64 on [0, 5] (4000 trajectories), test on 100 solved at
256 x 256 and evaluated at 256², 128² and 64²; FNO3D (8 layers, width 64, 8 modes, fc 256,
N = 64), 20,000 points per expert, 1 x 2 x 2 experts, batch 4, 20 epochs, the paper's
optimiser.

`--backbone` trains every method on another FNO3D: `small` (3 layers, width 12, 4 modes,
fc 32, N = 16), `wide16` / `wide32` (the wide trunk with N = 16 / 32) or `paper`.

PI-HC-MoE blends its experts over `--overlap` (default 0.125 in each split spatial axis;
periodic windows) and fits their weights together (`--coupling joint`); `--overlap 0
--coupling independent` is the paper's piecewise prediction of independent experts (runs with
other settings than the defaults get their own directory).

The model is the paper's ansatz `w = w0 + s (t / T) (B - mean B) w` (`NavierStokes.scale = s`),
trained on the PDE residual only. The hard-constrained methods use the paper's `s = 0.005`
(the solver finds weights of order 1 / s); PI-SC has no solver to absorb that factor, so it uses
`s = 1` (its network outputs the vorticity change directly). Evaluating at a finer grid rebuilds
the FNO input there: its Fourier layers and the coordinate partition apply at any resolution.

Resumable like `examples/diffusion_sorption.py`: runs live in `<out>/<size>/<method>/`
(`<size>_seed<S>` for `--seed S` other than 0, and a suffix for each non-default setting the
method uses: PI-SC ignores the solve's and the experts' settings, PI-HC the experts'); a
directory whose checkpoint was written with other flags is refused, naming them.
"""

from __future__ import annotations

import argparse
import functools
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
from hcmoe.problems import navier_stokes  # noqa: E402


OVERLAP = 0.125  # default --overlap: 1/4 of a block's width
SCALE = 0.005  # default --scale: the paper's s of the hard-constrained ansatz
RIDGE = 1e-4  # default --ridge: the paper's
COUPLING = "joint"  # default --coupling
PAPER_EXPERTS = "1x2x2"  # the paper's blocks in t x x x y (--size paper's --experts)


# --backbone: the size's own, or one of these FNO3D configurations at any size ("wide" sits
# between the CPU-sized one and the paper's: the paper's N = 64 functions from a 4-layer,
# width-32 FNO; one training step of the paper's on the small grid takes ~3.7 s on 2 cores).
def _wide_trunk(n_basis: int, key) -> FNO:
    return FNO(4, n_basis, ndim=3, width=32, n_layers=4, modes=6, fc_width=128, key=key)


BACKBONES = {
    "small": FNO.navier_stokes_small,
    "wide": functools.partial(FNO.navier_stokes_paper, width=32, n_layers=4, modes=6, fc_width=128),
    # The wide trunk with fewer functions: N = 16 (the small backbone's) and 32.
    "wide16": functools.partial(_wide_trunk, 16),
    "wide32": functools.partial(_wide_trunk, 32),
    "paper": FNO.navier_stokes_paper,
}

CONFIGS = {
    "small": dict(
        backbone="wide",
        experts="1x2x1",
        epochs=12,
        batch_size=4,
        points_per_expert=1000,
        n_xy_test=64,
        test_resolutions=(64, 32),
        learning_rate=3e-3,
        decay_every=250,
        eval_every=64,
        checkpoint_every=32,
        eval_batch_size=4,
    ),
    "paper": dict(
        backbone="paper",
        experts=PAPER_EXPERTS,
        epochs=20,
        batch_size=4,
        points_per_expert=20_000,
        n_xy_test=256,
        test_resolutions=(256, 128, 64),
        learning_rate=1e-3,
        decay_every=800,
        eval_every=2000,
        checkpoint_every=100,
        eval_batch_size=1,
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
    parser.add_argument(
        "--epochs",
        type=int,
        help="override the size's number of epochs (small 12 = 192 steps, paper 20)",
    )
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--points-per-expert", type=int)
    parser.add_argument(
        "--learning-rate",
        type=float,
        help="initial learning rate of the paper's optimiser (default: the size's)",
    )
    parser.add_argument(
        "--decay-every",
        type=int,
        help="steps between the learning rate's halvings (default: the size's)",
    )
    parser.add_argument("--n-train", type=int, help="default: the size's (64 / 4000)")
    parser.add_argument("--n-test", type=int, help="default: the size's (16 / 100)")
    parser.add_argument(
        "--overlap",
        type=float,
        default=OVERLAP,
        help="PI-HC-MoE blending half-width in each split spatial axis (0: the "
        "paper's piecewise prediction)",
    )
    parser.add_argument(
        "--experts",
        help="PI-HC-MoE's blocks in t x x x y, e.g. 1x2x2 (the paper's); default: "
        "the size's (small 1x2x1, paper 1x2x2); the overlap applies to the split "
        "spatial axes",
    )
    parser.add_argument(
        "--coupling",
        choices=("joint", "independent"),
        default=COUPLING,
        help="PI-HC-MoE experts' weights fitted together or each expert on its own (the paper)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=SCALE,
        help="s of the ansatz w0 + s (t/T) (B - mean B) w for PI-HC and "
        "PI-HC-MoE (default: the paper's 0.005; PI-SC always uses 1)",
    )
    parser.add_argument(
        "--ridge",
        type=float,
        default=RIDGE,
        help="weight of the ridge rows `ridge * w` of the solves (default: the "
        "paper's 1e-4; it acts on weights of order 1 / scale)",
    )
    parser.add_argument(
        "--ridge-toward",
        choices=("zero", "init"),
        default="zero",
        help="centre of the solves' ridge rows: zero (the paper's) or the "
        "initial weights, ones (keeps the unconstrained sum, PI-SC's "
        "prediction, in directions the rows leave open)",
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
        "--train-n-xy",
        type=int,
        help="spatial resolution of the training grid (default: the size's, "
        "32 / 64); the loss and the solves live there",
    )
    parser.add_argument(
        "--backbone",
        choices=BACKBONES,
        help="FNO3D for every method: small (3 layers, width 12, 4 modes, fc 32, "
        "N = 16), wide (4 layers, width 32, 6 modes, fc 128, N = 64), wide16 and "
        "wide32 (the same with N = 16, 32) or paper (8 layers, width 64, 8 modes, "
        "fc 256, N = 64); default: the size's (small: wide, paper: paper)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/navier_stokes"))
    parser.add_argument("--data-dir", type=Path, help="dataset cache (default ~/.cache/hcmoe)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    for name, value in CONFIGS[args.size].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag checked before any data is generated: a one-line argparse error each."""
    for name in (
        "epochs",
        "batch_size",
        "points_per_expert",
        "decay_every",
        "n_train",
        "n_test",
        "train_n_xy",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer; got {value}")
    if args.seed < 0:
        parser.error(f"--seed: expected a non-negative integer; got {args.seed}")
    if not args.learning_rate > 0:
        parser.error(f"--learning-rate: expected a positive number; got {args.learning_rate}")
    if not args.scale > 0:
        parser.error(f"--scale: expected a positive number; got {args.scale}")
    if not args.ridge > 0:
        parser.error(f"--ridge: expected a positive number; got {args.ridge}")
    if not args.overlap >= 0:
        parser.error(f"--overlap: expected a non-negative number; got {args.overlap}")
    try:  # --experts' format and the partition's own checks, before any data is made
        partition(args).blend(navier_stokes.grid(args.size))
    except ValueError as error:  # the library names the argument first: overlap or partition
        flag = "--overlap" if str(error).startswith("overlap") else "--experts"
        parser.error(f"{flag}: {error}")
    n_train = args.n_train or navier_stokes.SIZES[args.size]["n_train"]
    if args.batch_size > n_train:
        parser.error(
            f"--batch-size: expected at most the {n_train} training trajectories (--n-train); "
            f"got {args.batch_size}"
        )
    for name in ("out", "data_dir"):
        path = getattr(args, name)
        if path is not None and path.exists() and not path.is_dir():
            parser.error(f"--{name.replace('_', '-')}: expected a directory; {path} is a file")


def experts_shape(text: str) -> dict[str, int]:
    """`"1x2x2"` -> `{"t": 1, "x": 2, "y": 2}`: the number of blocks along each axis."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(
            f"expected three positive integers joined by 'x' (blocks in t, x, y), e.g. 1x2x2; "
            f"got {text!r}"
        )
    return dict(zip("txy", map(int, parts)))


def partition(args) -> hcmoe.Partition:
    """PI-HC-MoE's experts: `--experts` blocks (the paper's 1 (t) x 2 (x) x 2 (y)), blended over
    `--overlap` in each split spatial axis."""
    blocks = experts_shape(args.experts)
    overlap = {axis: args.overlap for axis in "xy" if blocks[axis] > 1}
    return hcmoe.Partition(**blocks, overlap=overlap)


def solver(args):
    """The constraint solver of the flags: None (the library's default, LM) unless one of its
    settings is given."""
    settings = {
        name: getattr(args, name)
        for name in ("initial_damping", "termination")
        if getattr(args, name) is not None
    }
    return hcmoe.LevenbergMarquardt(**settings) if settings else None


def run_directory(args, kind: str | None = None) -> Path:
    """Where `kind`'s run lives (in `<this>/<kind>`): a suffix for each non-default setting that
    `kind` uses, so PI-SC is not retrained when only a solve setting changes, nor PI-HC when
    only the experts' do. `run_directory(args)` (every setting) holds the comparison."""
    name = args.size
    if kind in (None, "moe") and (args.overlap, args.coupling) != (OVERLAP, COUPLING):
        name += f"_overlap{args.overlap:g}_{args.coupling}"
    if kind in (None, "moe") and args.experts != CONFIGS[args.size]["experts"]:
        name += f"_experts{args.experts}"
    if kind != "sc":  # PI-SC has no solve: s = 1, no ridge
        if args.scale != SCALE:
            name += f"_scale{args.scale:g}"
        if args.ridge != RIDGE:
            name += f"_ridge{args.ridge:g}"
        if args.ridge_toward != "zero":
            name += f"_toward{args.ridge_toward}"
        if args.initial_damping is not None:
            name += f"_lambda0{args.initial_damping:g}"
        if args.termination is not None:
            name += f"_stop{args.termination}"
    if args.train_n_xy is not None:
        name += f"_train{args.train_n_xy}"
    if args.backbone != CONFIGS[args.size]["backbone"]:
        name += f"_backbone{args.backbone}"
    if args.seed != 0:  # a checkpoint resumes only the seed that wrote it
        name += f"_seed{args.seed}"
    return args.out / name


def run_settings(args, kind: str) -> dict:
    """The flags that shape `kind`'s run (not `--epochs`: a finished run may be extended)."""
    names = [
        "size",
        "seed",
        "backbone",
        "batch_size",
        "n_train",
        "learning_rate",
        "decay_every",
        "train_n_xy",
    ]
    if kind != "sc":
        names += ["scale", "ridge", "ridge_toward", "points_per_expert"]
    if kind == "moe":
        names += ["overlap", "coupling"]
        if args.experts != PAPER_EXPERTS:  # checkpoints from before --experts (all 1x2x2)
            names.append("experts")  # still resume
    return {name: getattr(args, name) for name in names}


def test_sets(test, args):
    """The test split at every evaluation resolution: subsampled from the finest solve."""
    finest = test["w0"].shape[-1]
    sets = {}
    for n in args.test_resolutions:
        stride = finest // n
        grid = navier_stokes.grid(args.size, "test", n_xy=n)
        data = {"w0": test["w0"][:, ::stride, ::stride]}
        sets[n] = (grid, data, test["w"][..., ::stride, ::stride])
    return sets


def run(kind: str, args, train, tests, grid) -> dict:
    directory = run_directory(args, kind) / kind
    pde = navier_stokes.NavierStokes(scale=1.0 if kind == "sc" else args.scale)
    method = methods.make_method(
        kind,
        BACKBONES[args.backbone](jr.key(args.seed)),  # the same initial backbone for every method
        pde,
        grid,
        partition(args),
        rows=hcmoe.Rows(
            points_per_expert=args.points_per_expert,
            ridge=args.ridge,
            ridge_toward=args.ridge_toward,
        ),
        solver=solver(args),  # None: the library's default
        **({"coupling": args.coupling} if kind == "moe" else {}),
    )
    print(f"\n== {method.name} ({args.size}) -> {directory} ==", flush=True)
    n_train = len(train["w0"])
    coarsest = min(tests)
    _, eval_data, eval_references = tests[coarsest]
    eval_grid = grid if eval_data["w0"].shape[-1] == grid.shape[-1] else None
    result = methods.train(
        method,
        {"w0": train["w0"]},
        steps=args.epochs * (n_train // args.batch_size),
        batch_size=args.batch_size,
        key=jr.key(args.seed + 1),
        optimizer=training.paper_optimizer(args.learning_rate, decay_every=args.decay_every),
        # Held-out error during training on the training resolution (if a test set has it).
        eval_data=None if eval_grid is None else (eval_data, eval_references),
        eval_every=None if eval_grid is None else args.eval_every,
        eval_batch_size=args.eval_batch_size,
        run_dir=directory,
        checkpoint_every=args.checkpoint_every,
        resume=not args.fresh,
        progress=args.progress,
        settings=run_settings(args, kind),  # a reused directory with other flags is refused
    )
    row = {"method": method.name, "kind": kind, "resolutions": {}}
    for n, (test_grid, data, references) in sorted(tests.items(), reverse=True):
        evaluation = methods.evaluate(
            result.model, data, references, grid=test_grid, batch_size=args.eval_batch_size
        )
        summary = methods.result_row(result.model, evaluation, result.history)
        row["resolutions"][str(n)] = summary
        plotting.plot_snapshots(
            evaluation.predictions[0],
            references[0],
            grid=test_grid,
            times=(0, -1),
            labels=result.model.labels(test_grid),
            title=f"{method.name}, test sample 0, {n}²",
            path=directory / f"prediction_{n}.png",
        )
    row.update(row["resolutions"][str(max(tests))])  # the headline: the finest test grid
    (directory / "results.json").write_text(json.dumps(row, indent=2))
    plotting.plot_training_curves(result.history, keys=["loss"], path=directory / "training.png")
    return row


def summarise(args, tests) -> str:
    directory = run_directory(args)
    runs = [run_directory(args, kind) / kind / "results.json" for kind in methods.KINDS]
    rows = [json.loads(path.read_text()) for path in runs if path.exists()]
    tables = []
    for n in sorted(tests, reverse=True):
        per_resolution = [row["resolutions"][str(n)] for row in rows]
        tables.append(f"Test resolution {n}²:\n\n" + methods.results_table(per_resolution))
    text = "\n\n".join(tables)
    record = {
        "problem": "navier-stokes",
        "size": args.size,
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}",
        "results": rows,
    }
    (directory / "results.json").write_text(json.dumps(record, indent=2))
    (directory / "results.md").write_text(text + "\n")
    finest = str(max(tests))
    plotting.plot_method_comparison(
        {row["method"]: row["resolutions"][finest]["rel_l2"] for row in rows},
        title=f"Navier-Stokes ({args.size}, {finest}²)",
        path=directory / "comparison.png",
    )
    return text


def main(argv=None) -> str:
    args = parse_args(argv)
    start = time.perf_counter()
    options = dict(size=args.size, seed=args.seed, cache_dir=args.data_dir, progress=args.progress)
    train = navier_stokes.make_dataset("train", args.n_train, n_xy=args.train_n_xy, **options)
    test = navier_stokes.make_dataset("test", args.n_test, n_xy=args.n_xy_test, **options)
    grid = navier_stokes.grid(args.size, "train", n_xy=args.train_n_xy)
    tests = test_sets(test, args)
    for kind in args.method:
        try:
            run(kind, args, train, tests, grid)
        except training.RunMismatchError as error:  # another run's checkpoint is there
            sys.exit(f"{error}\nHere: --fresh retrains it; another --out keeps both runs.")
    text = summarise(args, tests)
    print(f"\nHeld-out relative L2 error ({len(test['w0'])} trajectories; trained on {grid}):")
    print(text)
    print(f"({time.perf_counter() - start:.0f} s)")
    return text


if __name__ == "__main__":
    main()
