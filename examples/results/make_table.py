"""The README's results table, from the committed result JSONs of the examples.

    python examples/results/make_table.py           # print the Markdown table
    python examples/results/make_table.py --check   # exit 1 if README.md's table differs
    python examples/results/make_table.py --write   # replace README.md's table with it

Mean relative L2 error on the held-out trajectories (± its standard deviation over them),
per method and seed, for the newest run of each example configuration (the runs are
described in `examples/results/README.md` and, in full, in `docs/notes/2026-results-log.md`).
The README holds this script's output between the `<!-- results-table -->` and
`<!-- /results-table -->` markers. Only the standard library: cheap to run anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
README = HERE.parents[1] / "README.md"
BEGIN, END = "<!-- results-table -->", "<!-- /results-table -->"
METHODS = ("sc", "hc", "moe")
SEEDS = (0, 1, 2)

# (label, {method kind: file pattern with {seed}}). The diffusion–sorption --size small rows
# take PI-SC from its first runs: PI-SC has no constraint solve, and it was not rerun when
# the solver changed.
CONFIGURATIONS = [
    (
        "diffusion–sorption quickstart (26 × 64, 300 steps)",
        dict.fromkeys(METHODS, "quickstart/results_bf5beca_seed{seed}.json"),
    ),
    (
        "diffusion–sorption `--size small` (1500 steps)",
        {
            "sc": "diffusion_sorption_small/{sc_seed}.json",
            "hc": "diffusion_sorption_small/results_objective_seed{seed}.json",
            "moe": "diffusion_sorption_small/results_objective_seed{seed}.json",
        },
    ),
    (
        "diffusion–sorption `--size small --extrapolate` (error on t > 400)",
        dict.fromkeys(
            METHODS, "diffusion_sorption_small_extrapolate/results_objective_seed{seed}.json"
        ),
    ),
    (
        "Navier–Stokes `--size small` (64² test, N = 64, 192 steps, 1 × 2 × 1 experts)",
        dict.fromkeys(METHODS, "navier_stokes_small/results_objective_seed{seed}.json"),
    ),
]
SC_SEED_FILES = {0: "results", 1: "results_seed1", 2: "results_seed2"}
# The paper's Table (A100 GPUs, independent experts), for scale; not from this repository.
PAPER = [
    (
        "diffusion–sorption, paper (101 × 1024)",
        ("85.93% ± 5.07%", "7.55% ± 8.10%", "3.60% ± 2.93%"),
    ),
    ("diffusion–sorption extrapolation, paper", ("805.6%", "48.0%", "14.8%")),
    ("Navier–Stokes, paper (256² test)", ("18.08% ± 3.74%", "11.75% ± 2.95%", "8.30% ± 2.35%")),
]


def error(path: Path, kind: str) -> tuple[float, float]:
    """The mean and standard deviation of the test error of method `kind` in a results file."""
    record = json.loads(path.read_text())
    for result in record["results"]:
        if result["kind"] == kind:
            return result["rel_l2_mean"], result["rel_l2_std"]
    raise ValueError(f"{path}: no result of kind {kind!r}")


def row(label: str, files: dict[str, str], seed: int) -> str:
    errors = {
        kind: error(HERE / files[kind].format(seed=seed, sc_seed=SC_SEED_FILES[seed]), kind)
        for kind in METHODS
    }
    best = min(errors, key=lambda kind: errors[kind][0])
    cells = []
    for kind in METHODS:
        mean, std = errors[kind]
        cell = f"{100 * mean:.2f}% ± {100 * std:.2f}%"
        cells.append(f"**{cell}**" if kind == best else cell)
    name = label if seed == SEEDS[0] else "…"
    return f"| {name} | {seed} | " + " | ".join(cells) + " |"


def table() -> str:
    lines = ["| problem | seed | PI-SC | PI-HC | PI-HC-MoE (joint) |", "|---|---|---|---|---|"]
    for label, files in CONFIGURATIONS:
        lines += [row(label, files, seed) for seed in SEEDS]
    lines += [f"| {label} | – | " + " | ".join(cells) + " |" for label, cells in PAPER]
    return "\n".join(lines)


def readme_table(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError(f"{README}: no {BEGIN} ... {END} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="compare with README.md's table")
    group.add_argument("--write", action="store_true", help="replace README.md's table")
    args = p.parse_args(argv)
    current = table()
    if args.check:
        if readme_table(README.read_text()) != current:
            print(
                f"{README.name}: the results table differs from this script's output; "
                f"run python examples/results/make_table.py --write",
                file=sys.stderr,
            )
            return 1
        print(f"{README.name}: the results table is up to date")
        return 0
    if args.write:
        text = README.read_text()
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        README.write_text(f"{before}{BEGIN}\n{current}\n{END}{after}")
        print(f"wrote the results table into {README}")
        return 0
    print(current)
    return 0


if __name__ == "__main__":
    sys.exit(main())
