"""`grid_input`: the coordinates-plus-initial-condition input of a grid backbone."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .._grid import Grid


def grid_input(
    grid: Grid,
    initial_condition: ArrayLike,
    *,
    time_axis: str = "t",
    normalize: bool = True,
    dtype=None,
) -> Float[Array, "*grid channels"]:
    """The generic backbone input: grid coordinates with the initial condition over time.

    The paper feeds this to its FNO, but any backbone mapping fields on the grid to basis
    functions can take it (`hcmoe.models.fno_input` is the same function under its old name).

    Channel `i < grid.ndim` is the coordinate of axis `i`; the last channel is the initial
    condition, repeated at every time level. With `normalize=True` each coordinate is mapped
    to `[0, 1]` over the axis' extent (a periodic axis' extent includes its full period), so
    inputs are of order one whatever the physical units, and the same at every resolution.

    **Arguments:**

    - `grid`: the grid.
    - `initial_condition`: the field at the first time level: shape `grid.shape` without
        `time_axis`, or anything broadcastable to it (a scalar for a constant state).
    - `time_axis`: name of the time axis.
    - `normalize`: rescale coordinates to `[0, 1]`.
    - `dtype`: output dtype (default: the initial condition's floating dtype).

    **Returns:** an array of shape `(*grid.shape, grid.ndim + 1)`.
    """
    axis = grid.axis(time_axis)
    initial_condition = jnp.asarray(initial_condition)
    if dtype is None:
        dtype = jnp.result_type(initial_condition.dtype, jnp.float32)
    face_shape = grid.shape[:axis] + grid.shape[axis + 1 :]
    try:
        face = jnp.broadcast_to(initial_condition, face_shape)
    except ValueError:
        raise ValueError(
            f"initial_condition: expected a shape broadcastable to {face_shape} (grid "
            f"{grid.shape} without axis {time_axis!r}); got {initial_condition.shape}."
        ) from None
    channels = []
    for name, coordinate in grid.mesh().items():
        if normalize:
            low, high = grid.extent(name)
            coordinate = (coordinate - low) / (high - low)
        channels.append(jnp.asarray(coordinate, dtype))
    channels.append(jnp.broadcast_to(jnp.expand_dims(face, axis), grid.shape).astype(dtype))
    return jnp.stack(channels, axis=-1)
