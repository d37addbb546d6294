"""The per-sample data a PDE reads: a dict whose missing entries are clear errors.

A user PDE reads its data as `data["u0"]`. A plain dict would answer a forgotten entry with a
bare `KeyError: 'u0'` from deep inside a trace; `PDEData` answers with an error that names the
PDE, the missing key and the keys it was given. It is a `dict` subclass (so `isinstance(data,
dict)`, `.get`, `in` and iteration behave as usual) registered as a JAX pytree, so it passes
through `jit`, `vmap`, `grad` and sharding like the dict it wraps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.tree_util as jtu


class MissingDataError(ValueError, KeyError):
    """A PDE asked for a data entry that was not given.

    A `ValueError` (the library's configuration-error type) that is also a `KeyError`, so
    code that catches `KeyError` for optional entries keeps working.
    """

    __str__ = ValueError.__str__  # KeyError would quote the whole message


class PDEData(dict):
    """`data` as the PDE sees it: `data[key]` for a missing key raises `MissingDataError`.

    `owner` is the name of the PDE class, used in the message only.
    """

    __slots__ = ("owner",)

    def __init__(self, entries: Mapping[str, Any], owner: str):
        super().__init__(entries)
        self.owner = owner

    def __missing__(self, key):
        raise MissingDataError(
            f"data: {self.owner} needs data[{key!r}]; got keys {sorted(map(str, self))}. Pass "
            f"it in the data of the call, e.g. `data={{{key!r}: ...}}`."
        )

    def __repr__(self):
        return f"PDEData({dict.__repr__(self)}, owner={self.owner!r})"


def _flatten_with_keys(data: PDEData):
    keys = tuple(sorted(data))
    return [(jtu.DictKey(k), data[k]) for k in keys], (keys, data.owner)


def _flatten(data: PDEData):
    keys = tuple(sorted(data))
    return [data[k] for k in keys], (keys, data.owner)


def _unflatten(aux, children) -> PDEData:
    keys, owner = aux
    return PDEData(dict(zip(keys, children)), owner)


jtu.register_pytree_with_keys(PDEData, _flatten_with_keys, _unflatten, _flatten)


def wrap_data(data: Any, pde: Any) -> Any:
    """The data as `pde` should see it: a mapping wrapped in `PDEData`, else unchanged.

    `None` becomes an empty `PDEData`, so a PDE reading `data["u0"]` from a call without data
    gets the same error as for a missing key. Idempotent (already wrapped data is re-labelled
    with `pde`'s name). Any other pytree (an array, a tuple) is returned as it is.

    **Arguments:**

    - `data`: the per-sample data given to `solve`, a loss or a constrained model.
    - `pde`: the PDE (or its class) that will read it; only its name is used.

    **Returns:** a `PDEData`, or `data` itself when it is not a mapping.
    """
    owner = pde.__name__ if isinstance(pde, type) else type(pde).__name__
    if data is None:
        return PDEData({}, owner)
    if isinstance(data, Mapping):
        return PDEData(data, owner)
    return data
