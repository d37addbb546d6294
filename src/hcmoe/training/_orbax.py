"""The array payload of a checkpoint, written and read by Orbax.

Orbax (`orbax-checkpoint`) writes a directory per checkpoint: every process writes the shards
it owns (one replica of a replicated array), into a temporary directory that process 0 renames
into place once every process has finished (the atomic commit), and a restore places each
array directly onto the sharding asked for, whatever mesh or device count wrote it. hcmoe's
own record (`_checkpoints.py`) is written after that commit and names the directory's files
with their sizes and SHA-256, so a damaged checkpoint is detected and skipped.

Orbax (a dependency of hcmoe) is imported only when a checkpoint is written or read: it is
slow to import.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:
        raise ImportError(
            "hcmoe checkpoints are written with Orbax, which could not be imported "
            f"({error}). Install it with `pip install 'orbax-checkpoint>=0.11'` (a dependency "
            "of hcmoe), or pass checkpoint_dir=None to train without checkpoints."
        ) from error
    return ocp


def _checkpointer():
    ocp = _orbax()
    # Synchronous: `save` returns once the checkpoint is committed on every process, so the
    # record written next never names a checkpoint still in flight.
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def write(path: Path, leaves: list) -> None:
    """Write `leaves` (arrays) as the Orbax checkpoint `path`, replacing one left there.

    A collective under `jax.distributed`: every process calls it with its part of the same
    global arrays.
    """
    tree = {str(i): leaf for i, leaf in enumerate(leaves)}
    _checkpointer().save(path.absolute(), args=_orbax().args.StandardSave(tree), force=True)


def read(path: Path, targets: list) -> list:
    """The arrays of the Orbax checkpoint `path`, placed as `targets` (`ShapeDtypeStruct`s
    with a sharding) say."""
    tree = {str(i): target for i, target in enumerate(targets)}
    restored = _checkpointer().restore(path.absolute(), args=_orbax().args.StandardRestore(tree))
    return [restored[str(i)] for i in range(len(targets))]


def is_temporary(path: Path) -> bool:
    """A directory Orbax was writing when the run stopped (never committed)."""
    return ".orbax-checkpoint-tmp" in path.name


def digests(path: Path) -> dict[str, Any]:
    """`{relative path: [bytes, sha256]}` for every file under the directory `path`."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(path).as_posix(): [p.stat().st_size, _sha256(p)] for p in files}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def damage(path: Path, expected: dict[str, Any]) -> str | None:
    """Why the directory `path` is not the checkpoint its record describes, or None."""
    if not path.is_dir():
        return "the checkpoint directory is missing"
    found = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
    for name, (size, sha256) in expected.items():
        file = found.get(name)
        if file is None:
            return f"{name} is missing"
        if file.stat().st_size != size:
            return (
                f"{name}: the file is truncated or corrupt ({file.stat().st_size} bytes; the "
                f"record says {size})"
            )
        if _sha256(file) != sha256:
            return f"{name}: the file is corrupt (its SHA-256 does not match the record)"
    return None
