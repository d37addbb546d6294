"""Deterministic minibatches: batch `s` is a pure function of `(key, s)`, so a resumed run
sees the same batches as an uninterrupted one."""

from __future__ import annotations

from typing import cast

import jax
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray


def _dataset_size(train_data) -> int:
    sizes = {leaf.shape[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(train_data)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "train_data: expected a pytree of arrays sharing one leading (sample) axis, or a "
            f"callable `(step, key) -> batch`; got leading sizes {sorted(map(str, sizes))}."
        )
    return cast(int, sizes.pop())  # the one size, not None (checked above)


class Batches:
    """Batch `s` of a dataset: slice `s mod E` of the permutation of epoch `s // E` (no
    sample repeats within an epoch; the remainder of an epoch is dropped)."""

    def __init__(self, train_data, batch_size: int, key: PRNGKeyArray):
        self.data = train_data
        self.key = key
        if callable(train_data):
            return
        size = _dataset_size(train_data)
        if not 1 <= batch_size <= size:
            raise ValueError(
                f"batch_size: expected between 1 and the dataset size {size}; got {batch_size}."
            )
        self.size, self.batch_size = size, batch_size
        self.steps_per_epoch = size // batch_size
        self._epoch, self._permutation = None, None

    def __call__(self, step: int, rows: np.ndarray | None = None):
        """Batch `step`, or only its `rows` (positions in the batch: a process's part of it
        on a mesh; a function's batch is its own business)."""
        if callable(self.data):
            return self.data(step, jr.fold_in(self.key, step))
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            key = jr.fold_in(self.key, epoch)
            self._epoch, self._permutation = epoch, np.asarray(jr.permutation(key, self.size))
        start = position * self.batch_size
        assert self._permutation is not None  # drawn above at the first call (epoch != None)
        indices = self._permutation[start : start + self.batch_size]
        if rows is not None:
            indices = indices[rows]
        return jax.tree.map(lambda leaf: leaf[indices], self.data)
