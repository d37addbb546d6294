"""A comparison of trained methods written to disk: JSON record, Markdown table, bar chart."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import jax

from ._tables import results_table


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, os.PathLike) else value


def write_results(
    directory: str | os.PathLike,
    rows: list[dict[str, Any]],
    *,
    title: str | None = None,
    argv: list[str] | None = None,
    **record: Any,
) -> str:
    """Write the comparison of trained methods to `directory` and return its Markdown table.

    Writes `results.json` (`record`, the command line, the machine and `rows` under
    `"results"`), `results.md` (`results_table(rows)`) and `comparison.png`
    (`hcmoe.plotting.plot_method_comparison` of the rows' per-sample errors; needs
    matplotlib).

    **Arguments:**

    - `directory`: where the files go (created if missing).
    - `rows`: result rows, e.g. `result_row`'s, each with `method` and per-sample `rel_l2`.
    - `title`: the figure's title.
    - `argv`: the command's arguments for the record (default: `sys.argv[1:]`).
    - `**record`: further JSON-serialisable entries of `results.json` (paths become strings,
      also one level down in a dict such as `options=vars(args)`).

    **Returns:** the Markdown table, also in `results.md`.
    """
    from .. import plotting  # matplotlib only where figures are drawn

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = results_table(rows)
    errors = {row["method"]: row["rel_l2"] for row in rows}
    plotting.plot_method_comparison(errors, title=title, path=directory / "comparison.png")
    argv = sys.argv[1:] if argv is None else list(argv)
    entries = {
        k: {n: _jsonable(v) for n, v in value.items()} if isinstance(value, dict) else value
        for k, value in record.items()
    }
    full_record = dict(
        command=" ".join([Path(sys.argv[0]).name, *argv]),
        machine=f"{jax.devices()[0].device_kind}, jax {jax.__version__}",
        **{k: _jsonable(v) for k, v in entries.items()},
        results=rows,
    )
    (directory / "results.json").write_text(json.dumps(full_record, indent=2))
    (directory / "results.md").write_text(table + "\n")
    return table
