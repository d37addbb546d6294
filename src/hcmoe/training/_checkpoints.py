"""Checkpoints that survive crashes, truncation and a damaged record, on any device mesh.

A checkpoint after step `s` is, in the checkpoint directory:

- `step_<s>/`: the array leaves of the model and the optimizer state, an Orbax checkpoint
  (`_orbax.py`: written by every process in parallel, committed atomically by process 0,
  restorable onto another mesh or device count);
- `step_<s>.json`: its record (step, directory, the size and SHA-256 of every file in it, the
  leaves' shapes and dtypes, the run's key, the time, the hcmoe version);
- `checkpoint.json`: a copy of the newest record, written last: the commit point.

Records are written by process 0 only, each atomically (`os.replace`), so a crash at any
moment leaves the previous checkpoint intact. Loading verifies the files the record names: a
truncated or corrupt newest checkpoint gives a `CheckpointWarning` naming it, and the newest
intact older checkpoint is used instead; a damaged `checkpoint.json` is rebuilt from the
per-step records beside it (with a warning), or is an error that names the file and what to do.

Checkpoints of hcmoe 0.1 (`step_<s>.eqx`, `eqx.tree_serialise_leaves`, record version 1) are
still read, on one device or onto a mesh; new ones are always Orbax directories.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import shutil
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
from . import _orbax
from ._distributed import is_main_process, placement, replicate


RECORD = "checkpoint.json"
FORMAT = "hcmoe-checkpoint"
VERSION = 2  # an Orbax directory; 1: an `.eqx` file (hcmoe 0.1), still read
VERSIONS = (1, 2)


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


def _split(tree):
    """`tree`'s array leaves, and how to put new ones back in their place."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    leaves, treedef = jax.tree.flatten(arrays)
    return leaves, lambda new: eqx.combine(jax.tree.unflatten(treedef, new), static)


def _signature(leaves) -> list[list]:
    return [[list(np.shape(x)), str(x.dtype)] for x in leaves]


def _host(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic))


def _is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _stored(x):
    """What is written for a leaf: typed PRNG keys as their raw data."""
    return jr.key_data(x) if _is_key(x) else x


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

    Writes the array leaves as the Orbax checkpoint `step_<step>/`, then (process 0) its
    record `step_<step>.json` (step, the directory's files with their sizes and SHA-256, the
    leaves' shapes and dtypes, the run's key and `extra`), then `checkpoint.json` (the same
    record), then deletes all but the `keep` newest checkpoints. Under `jax.distributed` it
    is a collective: every process calls it (as `fit` does), each writing the shards it owns.

    **Arguments:**

    - `directory`: the checkpoint directory (created if needed; shared by every process).
    - `step`: completed optimizer steps.
    - `model`, `opt_state`: the pytrees to save (array leaves are stored, static fields are
        not: loading needs a template of the same structure).
    - `key`: the run's PRNG key, recorded so that a resume with another key is refused.
    - `keep`: how many checkpoints to keep (at least 1).
    - `extra`: JSON-serialisable metadata added to the record.

    **Returns:** the path of the checkpoint directory.

    **Raises:** `ImportError` saying how to install Orbax if it is missing.
    """
    if keep < 1:
        raise ValueError(f"keep: expected at least 1 checkpoint to keep; got {keep}.")
    directory = Path(directory)
    leaves, _ = _split((model, opt_state))
    stored = [_stored(x) for x in leaves]
    name = _stem(step)
    _orbax.write(directory / name, stored)
    if not is_main_process():
        return directory / name
    record = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "file": name,
        "files": _orbax.digests(directory / name),
        "leaves": _signature(leaves),
        "stored": _signature(stored),
        "key": key_record(key),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "hcmoe_version": importlib.metadata.version("hcmoe"),
        **dict(extra or {}),
    }
    text = json.dumps(record, indent=2).encode()
    atomic_write(directory / f"{name}.json", text)
    atomic_write(directory / RECORD, text)
    _prune(directory, int(step), keep)
    return directory / name


def _entry_step(path: Path) -> int | None:
    """The step of a checkpoint entry (`step_<s>`, `.eqx`, `.json`, Orbax's temporary)."""
    digits = path.name.removeprefix("step_")[:8]
    return int(digits) if path.name.startswith("step_") and digits.isdigit() else None


def _prune(directory: Path, step: int, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints up to `step`; later ones (left by a run
    that was resumed from an earlier step) and Orbax's uncommitted directories go too."""
    entries = [(s, p) for p in directory.iterdir() if (s := _entry_step(p)) is not None]
    kept = sorted({s for s, _ in entries if s <= step})[-keep:]
    for entry_step, path in entries:
        if entry_step in kept and not _orbax.is_temporary(path):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
    if record.get("format") != FORMAT or record.get("version") not in VERSIONS:
        raise ValueError(
            f"{path}: expected an {FORMAT} record of version {' or '.join(map(str, VERSIONS))}; "
            f"got format {record.get('format')!r}, version {record.get('version')!r}."
        )


def _step_records(directory: Path) -> list[dict[str, Any]]:
    """The readable per-step records, newest first (unreadable ones are skipped)."""
    records = []
    for path in directory.glob("step_*.json"):
        try:
            record = _read_record(path)
        except (OSError, ValueError):
            continue
        if record.get("format") == FORMAT and record.get("version") in VERSIONS:
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
    """Why the checkpoint a record names cannot be it, or None if it looks intact."""
    if record["version"] == VERSION:
        return _orbax.damage(path, record.get("files", {}))
    if not path.is_file():
        return "the file is missing"
    size = path.stat().st_size
    if "bytes" in record and size != record["bytes"]:
        return f"the file is truncated or corrupt ({size} bytes; the record says {record['bytes']})"
    if "sha256" in record and hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
        return "the file is corrupt (its SHA-256 does not match the record)"
    return None


def load_checkpoint(
    directory: str | os.PathLike, model, opt_state=None, *, mesh=None
) -> Checkpoint | None:
    """Load the newest intact checkpoint of `directory`, or `None` if it holds none.

    A checkpoint that is missing, truncated or corrupt (a file's size or SHA-256 differs from
    its record, or Orbax cannot read it) is skipped with a `CheckpointWarning` naming it, and
    the next older one is tried. A damaged `checkpoint.json` is rebuilt from the per-step
    records. The arrays are placed on `mesh` (replicated), or on the default device: a
    checkpoint written on any mesh or number of devices or processes loads onto any other.

    **Arguments:**

    - `directory`: the checkpoint directory.
    - `model`, `opt_state`: templates with the saved structure (e.g. the freshly
        initialised model and `optimizer.init(...)`); their array values are replaced.
        `opt_state=None` (default) loads the model alone (to evaluate or predict), and the
        `Checkpoint`'s `opt_state` is None; resuming training needs the optimizer's state.
    - `mesh`: a `jax.sharding.Mesh` to replicate the arrays over (e.g. `fit`'s), or None.

    **Raises:** `ValueError` if the record is not an hcmoe checkpoint, if it is damaged with
    nothing to rebuild it from, if no checkpoint is intact, or if an intact checkpoint does
    not fit the templates (another architecture or optimizer); `ImportError` saying how to
    install Orbax if it is missing.
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
            try:
                return _restore(path, record, model, opt_state, mesh)
            except _Unreadable as error:
                damage = str(error)
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


class _Unreadable(Exception):
    """An intact-looking checkpoint that its reader still cannot read."""


def _misfit(path: Path, record, opt_state, error) -> ValueError:
    hint = "" if "sha256" in record or "files" in record else " (or the file is truncated)"
    what = "model" if opt_state is None else "model and optimizer state"
    return ValueError(
        f"{path}: the checkpoint does not fit the given {what} (was it "
        f"written by a different architecture or optimizer?{hint}): {error}"
    )


def _restore(path: Path, record, model, opt_state, mesh) -> Checkpoint:
    if record["version"] == VERSION:
        model, opt_state = _restore_orbax(path, record, model, opt_state, mesh)
    else:
        model, opt_state = replicate(_deserialise(path, record, model, opt_state), mesh)
    return Checkpoint(int(record["step"]), model, opt_state, record)


def _restore_orbax(path: Path, record, model, opt_state, mesh):
    leaves, rebuild = _split((model, opt_state))
    saved, expected = record.get("leaves", []), _signature(leaves)
    if opt_state is None and len(saved) > len(expected):
        saved = saved[: len(expected)]  # the model's leaves come first: read those alone
    if saved != expected:
        raise _misfit(path, record, opt_state, _first_difference(saved, expected))
    sharding = placement(mesh)
    # A model alone is read with the optimizer state's arrays (Orbax reads whole trees); they
    # are dropped.
    targets = [
        jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)
        for shape, dtype in record.get("stored", record["leaves"])
    ]
    try:
        restored = _orbax.read(path, targets)[: len(leaves)]
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        raise _Unreadable(f"Orbax could not read it ({type(error).__name__}: {error})") from error
    return rebuild([_as_template(new, old) for new, old in zip(restored, leaves)])


def _as_template(new, old):
    """A restored array as the template's leaf was: a typed key, a NumPy array, or as read."""
    if _is_key(old):
        return jr.wrap_key_data(new, impl=jr.key_impl(old))
    return np.asarray(new).astype(old.dtype) if _host(old) else new


def _first_difference(saved: list, expected: list) -> str:
    if len(saved) != len(expected):
        return f"it holds {len(saved)} arrays, the templates {len(expected)}"
    for i, (a, b) in enumerate(zip(saved, expected)):
        if a != b:
            return f"array {i} is {a[1]}{tuple(a[0])} in it, {b[1]}{tuple(b[0])} in the templates"
    return ""


def _deserialise(path: Path, record, model, opt_state):
    try:
        return eqx.tree_deserialise_leaves(path, (model, opt_state))
    except (RuntimeError, ValueError, TypeError, OSError, EOFError) as error:
        raise _misfit(path, record, opt_state, error) from error
