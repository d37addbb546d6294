"""Crash-safe file writes shared by the dataset cache and the checkpoints."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic swap (not thread-safe, but brief)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, payload: bytes | Callable[[Any], None]) -> None:
    """Write `path` so that readers see the old file or the complete new one, never a part.

    The data goes to a temporary file in the same directory, is flushed to disk, and is moved
    into place with `os.replace`. The file gets the permissions of a normally created file
    (`0o666` minus the umask, i.e. 0644 usually), not the 0600 of `tempfile`.

    **Arguments:**

    - `path`: the target (its directory is created if needed).
    - `payload`: bytes, or a function that writes to a binary file object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as file:
            if callable(payload):
                payload(file)
            else:
                file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
