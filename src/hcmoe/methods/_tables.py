"""Result rows and the Markdown comparison table."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._evaluate import Evaluation
from ._method import Method


def seconds_per_step(history) -> float:
    """Median wall time per training step from `fit`'s records, leaving out the first record
    (it includes compilation); `nan` without records."""
    rates = [r["steps_per_second"] for r in history if r.get("kind") == "train"]
    rates = rates[1:] if len(rates) > 1 else rates
    return float(np.median(1.0 / np.asarray(rates))) if rates else float("nan")


def result_row(method: Method, evaluation: Evaluation, history=()) -> dict[str, Any]:
    """A JSON-serialisable summary of a trained method (the rows of `results_table`):
    `method`, `kind`, `rel_l2_mean`, `rel_l2_std`, per-sample `rel_l2`, `solver_steps`,
    `non_converged` and, from `fit`'s history, `seconds_per_step` and `steps`."""
    steps = [r["step"] for r in history if r.get("kind") == "train"]
    return {
        "method": method.name,
        "kind": method.kind,
        "rel_l2_mean": evaluation.mean,
        "rel_l2_std": evaluation.std,
        "rel_l2": [float(e) for e in evaluation.errors],
        "solver_steps": evaluation.solver_steps,
        "non_converged": evaluation.non_converged,
        "seconds_per_step": seconds_per_step(history),
        "steps": max(steps, default=0),
    }


def results_table(rows) -> str:
    """A Markdown comparison table from result rows.

    Each row is a mapping with `method`, `rel_l2_mean`, `rel_l2_std` (fractions) and
    optionally `seconds_per_step`, `solver_steps` and `non_converged` (as written by the
    examples).
    """
    lines = [
        "| method | rel. L2 error (mean ± std) | time / step | solver iterations "
        "| non-converged solves |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        error = f"{100 * row['rel_l2_mean']:.2f}% ± {100 * row['rel_l2_std']:.2f}%"
        seconds = row.get("seconds_per_step", float("nan"))
        time = f"{1e3 * seconds:.0f} ms" if np.isfinite(seconds) else "–"
        iterations = f"{row['solver_steps']:.1f}" if "solver_steps" in row else "–"
        if row.get("kind") == "sc":
            iterations = "– (no solve)"
        failed = str(row.get("non_converged", "–"))
        lines.append(f"| {row['method']} | {error} | {time} | {iterations} | {failed} |")
    return "\n".join(lines)
