"""Checkpoints that survive crashes, truncation and a damaged record.

A checkpoint after step `s` is three files in the checkpoint directory:

- `step_<s>.eqx`: the model and optimizer state (`eqx.tree_serialise_leaves`: NumPy arrays,
  never pickle);
- `step_<s>.json`: its record (step, file name, size and SHA-256 of the `.eqx` file, the
  run's key, the time, the hcmoe version);
- `checkpoint.json`: a copy of the newest record, written last: the commit point.

Every file is written atomically (`os.replace`), so a crash at any moment leaves the previous
checkpoint intact. Loading verifies the size and hash of the file the record names: a
truncated or corrupt newest file gives a `CheckpointWarning` naming it, and the newest intact
older checkpoint is used instead; a damaged `checkpoint.json` is rebuilt from the per-step
records beside it (with a warning), or is an error that names the file and what to do.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import io
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray

from .._files import atomic_write


RECORD = "checkpoint.json"
FORMAT = "hcmoe-checkpoint"
VERSION = 1


class CheckpointWarning(UserWarning):
    """A checkpoint file or record was unreadable; an older intact one is used instead."""


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the step it was taken after, the model, the optimizer state and
    the JSON record."""

    step: int
    model: Any
    opt_state: Any
    record: dict[str, Any]


def key_record(key: PRNGKeyArray) -> dict[str, Any]:
    """A JSON form of a PRNG key, to refuse resuming a run with another key."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    return {
        "data": np.asarray(jr.key_data(key)).tolist(),
        "impl": str(jr.key_impl(key)) if typed else None,
    }


def _stem(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model,
    opt_state,
    *,
    key: PRNGKeyArray,
    keep: int = 2,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save `(model, opt_state)` after `step` optimizer steps, atomically.

    Writes `step_<step>.eqx` (via `eqx.tree_serialise_leaves`), its record `step_<step>.json`
    (step, file, size, SHA-256, the run's key and `extra`), then `checkpoint.json` (the same
    record), then deletes all but the `keep` newest checkpoints.

    **Arguments:**

    - `directory`: the checkpoint directory (created if needed).
    - `step`: completed optimizer steps.
    - `model`, `opt_state`: the pytrees to save (array leaves are stored, static fields are
        not: loading needs a template of the same structure).
    - `key`: the run's PRNG key, recorded so that a resume with another key is refused.
    - `keep`: how many checkpoints to keep (at least 1).
    - `extra`: JSON-serialisable metadata added to the record.

    **Returns:** the path of the checkpoint file.
    """
    if keep < 1:
        raise ValueError(f"keep: expected at least 1 checkpoint to keep; got {keep}.")
    directory = Path(directory)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, (model, opt_state))
    payload = buffer.getvalue()
    name = f"{_stem(step)}.eqx"
    atomic_write(directory / name, payload)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "file": name,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "key": key_record(key),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "hcmoe_version": importlib.metadata.version("hcmoe"),
        **dict(extra or {}),
    }
    text = json.dumps(record, indent=2).encode()
    atomic_write(directory / f"{_stem(step)}.json", text)
    atomic_write(directory / RECORD, text)
    for old in sorted(directory.glob("step_*.eqx"))[:-keep]:
        if old.name != name:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    return directory / name


def _read_record(path: Path) -> dict[str, Any]:
    """A record, or `ValueError` saying why it is unusable (`OSError` if unreadable)."""
    try:
        record = json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not valid JSON ({error})") from error
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("file"), str)
        or not (isinstance(record.get("step"), int))
    ):
        raise ValueError("not a checkpoint record (no 'file' and 'step')")
    return record


def _check_format(record: dict, path: Path) -> None:
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise ValueError(
            f"{path}: expected an {FORMAT} record of version {VERSION}; got format "
            f"{record.get('format')!r}, version {record.get('version')!r}."
        )


def _step_records(directory: Path) -> list[dict[str, Any]]:
    """The readable per-step records, newest first (unreadable ones are skipped)."""
    records = []
    for path in directory.glob("step_*.json"):
        try:
            record = _read_record(path)
        except (OSError, ValueError):
            continue
        if record.get("format") == FORMAT and record.get("version") == VERSION:
            records.append(record)
    return sorted(records, key=lambda r: r["step"], reverse=True)


def _candidates(directory: Path) -> list[dict[str, Any]] | None:
    """The records to try, newest first: the committed one, then older per-step ones."""
    record_path = directory / RECORD
    step_records = _step_records(directory)
    if not record_path.exists():
        if step_records:  # the commit was lost but checkpoints exist: use them
            warnings.warn(
                f"{record_path} is missing; resuming from the step_*.json records beside it.",
                CheckpointWarning,
                stacklevel=4,
            )
            return step_records
        return None
    try:
        record = _read_record(record_path)
    except (OSError, ValueError) as error:
        if not step_records:
            raise ValueError(
                f"{record_path}: the checkpoint record is damaged ({error}) and there are no "
                "step_*.json records beside it to rebuild it from. It names the latest "
                "checkpoint file and the run's key. Restore it from a backup, or start afresh: "
                "delete it (or the whole directory), pass resume=False, or use another "
                "checkpoint_dir."
            ) from error
        warnings.warn(
            f"{record_path} is damaged ({error}); rebuilt from the step_*.json records beside "
            f"it (newest: step {step_records[0]['step']}).",
            CheckpointWarning,
            stacklevel=4,
        )
        return step_records
    _check_format(record, record_path)
    return [record] + [r for r in step_records if r["step"] < record["step"]]


def _damage(path: Path, record: dict[str, Any]) -> str | None:
    """Why the file a record names cannot be its checkpoint, or None if it looks intact."""
    if not path.is_file():
        return "the file is missing"
    size = path.stat().st_size
    if "bytes" in record and size != record["bytes"]:
        return f"the file is truncated or corrupt ({size} bytes; the record says {record['bytes']})"
    if "sha256" in record and hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
        return "the file is corrupt (its SHA-256 does not match the record)"
    return None


def load_checkpoint(directory: str | os.PathLike, model, opt_state=None) -> Checkpoint | None:
    """Load the newest intact checkpoint of `directory`, or `None` if it holds none.

    A checkpoint file that is missing, truncated or corrupt (its size or SHA-256 differs from
    its record) is skipped with a `CheckpointWarning` naming it, and the next older one is
    tried. A damaged `checkpoint.json` is rebuilt from the per-step records.

    **Arguments:**

    - `directory`: the checkpoint directory.
    - `model`, `opt_state`: templates with the saved structure (e.g. the freshly
        initialised model and `optimizer.init(...)`); their array values are replaced.
        `opt_state=None` (default) loads the model alone (to evaluate or predict), and the
        `Checkpoint`'s `opt_state` is None; resuming training needs the optimizer's state.

    **Raises:** `ValueError` if the record is not an hcmoe checkpoint, if it is damaged with
    nothing to rebuild it from, if no checkpoint is intact, or if an intact file does not fit
    the templates (another architecture or optimizer).
    """
    directory = Path(directory)
    candidates = _candidates(directory)
    if candidates is None:
        return None
    problems = []
    for record in candidates:
        path = directory / record["file"]
        damage = _damage(path, record)
        if damage is None:
            return _deserialise(path, record, model, opt_state)
        problems.append(f"{path}: {damage}")
        warnings.warn(
            f"{path}: {damage}; trying the next older checkpoint.",
            CheckpointWarning,
            stacklevel=2,
        )
    raise ValueError(
        f"{directory}: no intact checkpoint ({'; '.join(problems)}). Start afresh with "
        "resume=False or another checkpoint_dir."
    )


def _deserialise(path: Path, record, model, opt_state) -> Checkpoint:
    try:
        model, opt_state = eqx.tree_deserialise_leaves(path, (model, opt_state))
    except (RuntimeError, ValueError, TypeError, OSError, EOFError) as error:
        hint = "" if "sha256" in record else " (or the file is truncated)"
        what = "model" if opt_state is None else "model and optimizer state"
        raise ValueError(
            f"{path}: the checkpoint does not fit the given {what} (was it "
            f"written by a different architecture or optimizer?{hint}): {error}"
        ) from error
    return Checkpoint(int(record["step"]), model, opt_state, record)
