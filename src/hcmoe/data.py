"""Datasets on disk: a parameter-checked, crash-safe cache, batched generation and minibatches.

A dataset is a dict `name -> array` whose arrays share a leading sample axis. The cache stores
it as `<path>.npz` beside a JSON manifest `<path>.json` that records the parameters it was
generated with:

```python
params = {"problem": "heat", "n": 64, "seed": 0}
dataset = hcmoe.data.cached("~/.cache/hcmoe/heat-train", params, lambda: generate(...))
for batch in hcmoe.data.batches(dataset, 16, key=key, num_epochs=10):
    ...
```

Both files are written atomically (a temporary file in the same directory, then `os.replace`),
the manifest last, and a random token ties the manifest to the archive, so a cache that was
interrupted half-way, or whose archive and manifest come from different runs, is never read:
it is regenerated.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree

from ._files import atomic_write
from ._interrupt import InterruptGuard


__all__ = [
    "batches",
    "cache_dir",
    "cached",
    "load_cached",
    "map_batched",
    "num_batches",
    "save_cached",
]

FORMAT_VERSION = 1
_TOKEN = "__hcmoe_cache_token__"
_logger = logging.getLogger("hcmoe")


def cache_dir() -> Path:
    """The default cache directory: `$HCMOE_CACHE_DIR`, else `~/.cache/hcmoe`."""
    return Path(os.environ.get("HCMOE_CACHE_DIR", Path.home() / ".cache" / "hcmoe")).expanduser()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return np.dtype(value).name
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    raise TypeError(f"parameters must be JSON-serialisable; got {type(value).__name__}.")


def normalise_params(params: Mapping[str, Any], name: str = "params") -> dict[str, Any]:
    """The parameters as they read back from JSON (tuples become lists, NumPy scalars numbers).
    `name`: the argument a non-mapping is reported as (`ValueError`; a value JSON cannot hold is
    a `TypeError`)."""
    if not isinstance(params, Mapping):
        raise ValueError(f"{name}: expected a mapping of parameters; got {type(params).__name__}.")
    return json.loads(json.dumps(dict(params), sort_keys=True, default=_jsonable))


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    stem = Path(path).expanduser()
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")


def load_cached(path: str | os.PathLike, params: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """The cached arrays at `path` if they were generated with `params`, else None.

    None also when the files are missing, unreadable, or do not belong together (an
    interrupted write); the arrays are read fully into memory.
    """
    archive, manifest_path = _paths(path)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT_VERSION
        or manifest.get("params") != normalise_params(params)
    ):
        return None
    try:
        # Open the file ourselves: np.load leaks its handle when the archive is corrupt.
        with open(archive, "rb") as file, np.load(file, allow_pickle=False) as npz:
            if _TOKEN not in npz.files or str(npz[_TOKEN]) != manifest.get("token"):
                _logger.info("hcmoe cache %s: archive and manifest do not match; rebuilding.", path)
                return None
            return {name: npz[name] for name in npz.files if name != _TOKEN}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        _logger.info("hcmoe cache %s is unreadable (%s); rebuilding.", path, error)
        return None


def save_cached(
    path: str | os.PathLike, arrays: Mapping[str, Any], params: Mapping[str, Any]
) -> None:
    """Write `arrays` and a manifest of `params` atomically (see the module docstring)."""
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    if not arrays or _TOKEN in arrays:
        raise ValueError(f"arrays: expected a non-empty dict of named arrays; got {list(arrays)}.")
    archive, manifest_path = _paths(path)
    token = uuid.uuid4().hex
    manifest = {
        "format": FORMAT_VERSION,
        "token": token,
        "params": normalise_params(params),
        "arrays": {name: {"shape": a.shape, "dtype": a.dtype.str} for name, a in arrays.items()},
    }
    # Invalidate first: between the two replaces below, no manifest vouches for the archive.
    manifest_path.unlink(missing_ok=True)
    # Typed as Any for numpy's stub, which matches `**` entries against `allow_pickle: bool`.
    stamp: Any = np.array(token)
    atomic_write(archive, lambda f: np.savez(f, **arrays, **{_TOKEN: stamp}))
    text = json.dumps(manifest, indent=2, sort_keys=True, default=_jsonable).encode()
    atomic_write(manifest_path, text)


def cached(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    generate: Callable[[], Mapping[str, Any]],
    *,
    rebuild: bool = False,
) -> dict[str, np.ndarray]:
    """Load the dataset at `path` if it was made with `params`; otherwise `generate()` and save it.

    While `generate()` runs, the batches `map_batched` finishes are kept as chunks in
    `<path>.parts/`, so an interrupted generation continues from them when `cached` is called
    again with the same `params` (other parameters discard them). They are deleted once the
    dataset is saved.

    **Arguments:**

    - `path`: the cache path without extension (`<path>.npz` and `<path>.json` are written).
    - `params`: JSON-serialisable parameters that determine the data; any change regenerates.
    - `generate`: a zero-argument callable returning a dict of arrays.
    - `rebuild`: regenerate from scratch even when a matching cache (or chunks) exist.

    **Returns:** the dict of NumPy arrays.
    """
    if not rebuild:
        arrays = load_cached(path, params)
        if arrays is not None:
            return arrays
    parts, normalised = _parts_dir(path), normalise_params(params)
    _discard_stale_parts(parts, normalised, fresh=rebuild)
    context = _GENERATION.set(_Generation(parts, normalised))
    try:
        arrays = {name: np.asarray(value) for name, value in generate().items()}
    except KeyboardInterrupt:
        if any(parts.glob("*/chunk_*.npz")):
            print(
                f"\nhcmoe: generation interrupted; the finished batches are kept in {parts} "
                "and a rerun continues from them.",
                file=sys.stderr,
                flush=True,
            )
        raise
    finally:
        _GENERATION.reset(context)
    save_cached(path, arrays, params)
    shutil.rmtree(parts, ignore_errors=True)
    return arrays


# -- resumable generation ----------------------------------------------------------------------
_PARTS_MANIFEST = "params.json"
_FINGERPRINT = "__hcmoe_inputs_sha256__"


@dataclasses.dataclass
class _Generation:
    """The chunk directory of the `cached` generation in progress; one subdirectory per
    `map_batched` call, in call order (a deterministic `generate` makes the same calls)."""

    directory: Path
    params: dict
    calls: int = 0

    def next_directory(self) -> Path:
        manifest = self.directory / _PARTS_MANIFEST
        if not manifest.exists():  # created on first use: no directory for plain generators
            atomic_write(manifest, json.dumps(self.params, sort_keys=True).encode())
        self.calls += 1
        return self.directory / f"call_{self.calls:03d}"


_GENERATION: contextvars.ContextVar[_Generation | None] = contextvars.ContextVar(
    "hcmoe_generation", default=None
)


def _parts_dir(path) -> Path:
    stem = Path(path).expanduser()
    return stem.with_name(stem.name + ".parts")


def _discard_stale_parts(parts: Path, params: dict, *, fresh: bool) -> None:
    """Keep the chunks of an earlier run with the same parameters; discard any others."""
    try:
        same = not fresh and json.loads((parts / _PARTS_MANIFEST).read_text()) == params
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(parts, ignore_errors=True)


def _fingerprint(leaves, count: int) -> str:
    """A hash of one batch's inputs: a chunk is reused only for the very same inputs."""
    digest = hashlib.sha256(str(count).encode())
    for leaf in leaves:
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def _save_chunk(path: Path, leaves: list[np.ndarray], fingerprint: str) -> None:
    named = {f"leaf_{i}": leaf for i, leaf in enumerate(leaves)}
    # Typed as Any for numpy's stub, which matches `**` entries against `allow_pickle: bool`.
    stamp: Any = np.array(fingerprint)
    atomic_write(path, lambda f: np.savez(f, **named, **{_FINGERPRINT: stamp}))


def _load_chunk(path: Path, fingerprint: str, num_leaves: int) -> list[np.ndarray] | None:
    """The leaves of a chunk written for these inputs, or None (missing, stale, damaged)."""
    try:
        with open(path, "rb") as file, np.load(file, allow_pickle=False) as npz:
            if str(npz[_FINGERPRINT]) != fingerprint:
                return None
            return [npz[f"leaf_{i}"] for i in range(num_leaves)]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _leading_size(leaves, argname: str) -> int:
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"{argname}: expected arrays sharing one leading (sample) axis; got shapes "
            f"{[np.shape(leaf) for leaf in leaves]}."
        )
    return cast(int, sizes.pop())  # the one size, not None (checked above)


def map_batched(
    fn: Callable[[PyTree], PyTree],
    inputs: PyTree,
    *,
    batch_size: int,
    progress: bool = True,
    desc: str | None = None,
    resume_dir: str | os.PathLike | None = None,
) -> PyTree[np.ndarray]:
    """Apply a per-sample `fn` to every sample of `inputs`, `batch_size` at a time.

    `fn` is vmapped and jitted once; the last batch is padded (by repeating its final sample)
    so every call has the same shape. Shows a tqdm progress bar unless `progress=False`.

    Resumable: with `resume_dir` (or, by default, inside `hcmoe.data.cached`, which provides
    one) each finished batch is written atomically as a chunk there, and a later call with the
    same inputs loads the chunks it finds instead of recomputing them; the progress bar starts
    at the samples already done.

    **Returns:** `fn`'s outputs stacked along a leading axis, as NumPy arrays.
    """
    from tqdm.auto import tqdm

    leaves, treedef = jtu.tree_flatten(inputs)
    n = _leading_size(leaves, "inputs")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int; got {batch_size!r}.")
    batch_size = min(batch_size, n)
    directory = _chunk_directory(resume_dir)
    batched_fn = jax.jit(jax.vmap(fn))
    batches = []
    for start in range(0, n, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        batches.append((start, min(batch_size, n - start), [np.asarray(x)[index] for x in leaves]))
    done = _restore_chunks(directory, batches, batched_fn, treedef)
    outputs = {}
    restored = sum(batches[i][1] for i in done)
    message = "hcmoe: interrupted; finishing the batch in flight" + (
        f" and keeping the finished ones in {directory} (Ctrl-C again to stop at once)."
        if directory is not None
        else " (Ctrl-C again to stop at once)."
    )
    with (
        InterruptGuard(message) as interrupt,
        tqdm(total=n, initial=restored, desc=desc, disable=not progress, unit="sample") as bar,
    ):
        if restored:
            bar.set_postfix_str(f"resumed {restored} from {directory}", refresh=False)
        for i, (start, count, batch_leaves) in enumerate(batches):
            if i in done:
                outputs[i] = done[i]
                continue
            batch = treedef.unflatten([jnp.asarray(x) for x in batch_leaves])
            out = jtu.tree_map(lambda a: np.asarray(a)[:count], jax.device_get(batched_fn(batch)))
            if directory is not None:
                _save_chunk(
                    directory / f"chunk_{start:09d}.npz",
                    jtu.tree_leaves(out),
                    _fingerprint(batch_leaves, count),
                )
            outputs[i] = out
            bar.update(count)
            interrupt.check()  # a Ctrl-C during this batch stops here, the batch saved
    ordered = [outputs[i] for i in range(len(batches))]
    return jtu.tree_map(lambda *parts: np.concatenate(parts), *ordered)


def _chunk_directory(resume_dir) -> Path | None:
    if resume_dir is not None:
        return Path(resume_dir).expanduser()
    generation = _GENERATION.get()
    return None if generation is None else generation.next_directory()


def _restore_chunks(directory, batches, batched_fn, treedef) -> dict[int, PyTree]:
    """The outputs of the batches whose chunks are on disk, by batch number."""
    if directory is None or not any(directory.glob("chunk_*.npz")):
        return {}
    example = treedef.unflatten([jnp.asarray(x) for x in batches[0][2]])
    out_treedef = jtu.tree_structure(jax.eval_shape(batched_fn, example))
    done = {}
    for i, (start, count, batch_leaves) in enumerate(batches):
        chunk = _load_chunk(
            directory / f"chunk_{start:09d}.npz",
            _fingerprint(batch_leaves, count),
            out_treedef.num_leaves,
        )
        if chunk is not None:
            done[i] = out_treedef.unflatten(chunk)
    if done:
        _logger.info(
            "hcmoe: resuming from %d of %d batches in %s.", len(done), len(batches), directory
        )
    return done


def batches(
    dataset: PyTree,
    batch_size: int,
    *,
    key: PRNGKeyArray,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
) -> Iterator[PyTree]:
    """Shuffled minibatches of a dataset (any pytree of arrays with a shared leading axis).

    Each epoch draws a fresh permutation from `jr.fold_in(key, epoch)`, so the order is
    reproducible from `key` alone. Batches keep the type of the leaves (NumPy stays NumPy).

    **Arguments:**

    - `dataset`: e.g. `{"u0": (n, nx), "u": (n, nt, nx)}`.
    - `batch_size`: samples per batch.
    - `key`: PRNG key for the shuffles.
    - `num_epochs`: passes over the data; `None` iterates forever.
    - `drop_remainder`: drop the last, smaller batch of each epoch.
    """
    leaves, treedef = jtu.tree_flatten(dataset)
    n = _leading_size(leaves, "dataset")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size: expected an int in [1, {n}]; got {batch_size!r}.")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 0):
        raise ValueError(f"num_epochs: expected a non-negative int or None; got {num_epochs!r}.")
    stop = n - n % batch_size if drop_remainder else n
    epochs = range(num_epochs) if num_epochs is not None else itertools.count()
    for epoch in epochs:
        order = np.asarray(jr.permutation(jr.fold_in(key, epoch), n))
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield treedef.unflatten([leaf[index] for leaf in leaves])


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches per epoch for `n` samples."""
    return n // batch_size if drop_remainder else math.ceil(n / batch_size)
