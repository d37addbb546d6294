"""A reference Fourier Neural Operator (FNO) in Equinox, for grids of any dimension.

The network maps an input field on a grid to `n_basis` output fields on the same grid:

```
x (*grid, in_channels) ──lift──► (*grid, width) ──L Fourier layers──► ──fc, GELU──► (*grid, n_basis)
```

A Fourier layer is `v ↦ σ(K v + W v)`: `K` multiplies the lowest `modes` Fourier coefficients
per axis by learned complex matrices (a real FFT over the last grid axis, full FFTs over the
others) and `W` is a pointwise linear map. Because `K` acts on physical frequencies, the same
parameters apply at any resolution: train at 64², evaluate at 256².

Everything is channels-last, matching hcmoe fields `(*grid.shape, n_basis)`, and unbatched:
call `jax.vmap(model)(batch)` inside your jitted function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._input import grid_input


def _per_axis(value, ndim: int, argname: str, kind: type) -> tuple:
    """Broadcast a scalar option to one value per grid axis, with a clear error."""
    if isinstance(value, (int, float, np.integer, np.floating)):
        return (kind(value),) * ndim
    value = tuple(kind(v) for v in value)
    if len(value) != ndim:
        raise ValueError(
            f"{argname}: expected one value or {ndim} values (one per grid axis); "
            f"got {len(value)}: {value}."
        )
    return value


def _expand_to(vector: Array, ndim: int) -> Array:
    """Give a per-channel vector `ndim` leading unit axes (rank promotion stays explicit)."""
    return jnp.reshape(vector, (1,) * ndim + vector.shape)


class Pointwise(eqx.Module):
    """A linear map of the channel axis applied at every grid point: `y = W x + b`.

    **Arguments:**

    - `in_channels`, `out_channels`: channel counts.
    - `dtype`: parameter dtype.
    - `key`: PRNG key for the initialisation (uniform in ±1/sqrt(in_channels)).
    """

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"]

    def __init__(self, in_channels: int, out_channels: int, *, dtype=jnp.float32, key):
        wkey, bkey = jr.split(key)
        bound = 1.0 / math.sqrt(in_channels)
        shape = (out_channels, in_channels)
        self.weight = jr.uniform(wkey, shape, dtype, minval=-bound, maxval=bound)
        self.bias = jr.uniform(bkey, (out_channels,), dtype, minval=-bound, maxval=bound)

    def __call__(self, x: Float[Array, "*grid in"]) -> Float[Array, "*grid out"]:
        return jnp.einsum("...i,oi->...o", x, self.weight) + _expand_to(self.bias, x.ndim - 1)


def _keep_modes(coefficients: Array, modes: Sequence[int]) -> Array:
    """The block of the lowest `|k| < m` frequencies of a `rfftn` over the leading axes.

    On every axis but the last the spectrum holds positive frequencies first and negative
    ones at the end, so the kept block is the `m` first *and* the `m` last entries (the
    "corner blocks" of the spectrum). The last axis is one-sided (real FFT): its `m` first.
    """
    *full_axes, last = range(len(modes))
    for axis in full_axes:
        m = modes[axis]
        n = coefficients.shape[axis]
        low = jax.lax.slice_in_dim(coefficients, 0, m, axis=axis)
        high = jax.lax.slice_in_dim(coefficients, n - m, n, axis=axis)
        coefficients = jnp.concatenate([low, high], axis=axis)
    return jax.lax.slice_in_dim(coefficients, 0, modes[last], axis=last)


def _place_modes(block: Array, spectrum_shape: Sequence[int]) -> Array:
    """Inverse of `_keep_modes`: zero-fill a kept block back to the full spectrum shape."""
    *full_axes, last = range(len(spectrum_shape))
    for axis in full_axes:
        m = block.shape[axis] // 2
        zeros_shape = list(block.shape)
        zeros_shape[axis] = spectrum_shape[axis] - 2 * m
        low = jax.lax.slice_in_dim(block, 0, m, axis=axis)
        high = jax.lax.slice_in_dim(block, m, 2 * m, axis=axis)
        block = jnp.concatenate([low, jnp.zeros(zeros_shape, block.dtype), high], axis=axis)
    pad = [(0, 0)] * block.ndim
    pad[last] = (0, spectrum_shape[last] - block.shape[last])
    return jnp.pad(block, pad)


class SpectralConvolution(eqx.Module):
    """The global convolution of a Fourier layer, `K v = F⁻¹(R · F v)`.

    `F` is the real FFT over the grid axes (one-sided on the last axis). `R` holds one
    complex `in × out` matrix per kept frequency: the `modes[i]` lowest positive and negative
    frequencies on every axis but the last, and the `modes[-1]` lowest on the last, so
    `2^(d-1)` corner blocks of the spectrum are kept in `d` dimensions. Higher frequencies
    are dropped.

    On a grid too coarse to hold all kept frequencies (fewer than `2·modes[i]` points, or
    fewer than `modes[-1]` one-sided frequencies on the last axis) only the frequencies that
    exist are used, with their learned weights; the others are ignored.

    **Arguments:**

    - `in_channels`, `out_channels`: channel counts.
    - `modes`: kept frequencies per grid axis (an int for all axes, or one per axis).
    - `ndim`: number of grid axes (needed when `modes` is an int).
    - `dtype`: real parameter dtype; the weights are stored as real and imaginary parts.
    - `key`: PRNG key; weights are `U[0, 1) / (in · out)` in both parts.
    """

    weight_real: Float[Array, "*modes in out"]
    weight_imag: Float[Array, "*modes in out"]
    modes: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        modes: int | Sequence[int],
        *,
        ndim: int | None = None,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        if ndim is None:
            if isinstance(modes, int):
                raise ValueError("ndim: required when `modes` is a single int; got None.")
            ndim = len(modes)
        self.modes = _per_axis(modes, ndim, "modes", int)
        if any(m < 1 for m in self.modes):
            raise ValueError(f"modes: expected positive integers; got {self.modes}.")
        shape = (*(2 * m for m in self.modes[:-1]), self.modes[-1], in_channels, out_channels)
        scale = 1.0 / (in_channels * out_channels)
        rkey, ikey = jr.split(key)
        self.weight_real = jr.uniform(rkey, shape, dtype, maxval=scale)
        self.weight_imag = jr.uniform(ikey, shape, dtype, maxval=scale)

    def __call__(self, x: Float[Array, "*grid in"]) -> Float[Array, "*grid out"]:
        ndim = len(self.modes)
        grid_shape = x.shape[:ndim]
        axes = tuple(range(ndim))
        # XLA's FFT needs float32 or float64; low-precision parameters compute in float32.
        fft_dtype = jnp.promote_types(self.weight_real.dtype, jnp.float32)
        spectrum = jnp.fft.rfftn(x.astype(fft_dtype), axes=axes)
        spectrum_shape = spectrum.shape[:ndim]
        used = tuple(min(m, n // 2) for m, n in zip(self.modes[:-1], spectrum_shape[:-1]))
        used += (min(self.modes[-1], spectrum_shape[-1]),)
        weight = jax.lax.complex(
            self.weight_real.astype(fft_dtype), self.weight_imag.astype(fft_dtype)
        )
        # The weights hold every trained frequency; keep those this grid can represent.
        weight = _keep_modes(weight, used)
        block = jnp.einsum("...i,...io->...o", _keep_modes(spectrum, used), weight)
        spectrum = _place_modes(block, spectrum_shape)
        out = jnp.fft.irfftn(spectrum, s=grid_shape, axes=axes)
        return out.astype(self.weight_real.dtype)


class FourierLayer(eqx.Module):
    """One FNO layer: `v ↦ σ(K v + W v)` (`σ` = GELU, or identity when `activation=False`)."""

    spectral: SpectralConvolution
    pointwise: Pointwise
    activation: bool = eqx.field(static=True)

    def __init__(self, width: int, modes, *, ndim: int, activation: bool, dtype, key):
        skey, pkey = jr.split(key)
        self.spectral = SpectralConvolution(width, width, modes, ndim=ndim, dtype=dtype, key=skey)
        self.pointwise = Pointwise(width, width, dtype=dtype, key=pkey)
        self.activation = activation

    def __call__(self, v: Float[Array, "*grid width"]) -> Float[Array, "*grid width"]:
        v = self.spectral(v) + self.pointwise(v)
        return jax.nn.gelu(v) if self.activation else v


class FNO(eqx.Module):
    """A Fourier Neural Operator on a `d`-dimensional grid, channels-last and unbatched.

    `(*grid, in_channels) → (*grid, n_basis)`: a pointwise lifting to `width` channels,
    `n_layers` Fourier layers (GELU after every layer but the last, as in Li et al.), then a
    pointwise projection `width → fc_width → n_basis` with a GELU in between, and an optional
    GELU on the outputs (`output_activation=True`, used by the paper for diffusion–sorption).

    Spectral convolutions assume periodic fields. For a non-periodic axis, `padding` appends
    zeros after the lifting (a fraction of that axis' length, rounded up, so the padding scales
    with resolution) and crops them before the projection.

    ```python
    model = FNO(in_channels=3, n_basis=16, ndim=2, width=32, modes=8, key=jr.key(0))
    basis = model(hcmoe.models.grid_input(grid, u0))     # (*grid.shape, 16)
    ```

    **Arguments:**

    - `in_channels`: channels of the input field (`grid.ndim + 1` for `grid_input`).
    - `n_basis`: output channels (basis functions).
    - `ndim`: number of grid axes (2 for `(t, x)`, 3 for `(t, x, y)`).
    - `width`: channels inside the Fourier layers.
    - `modes`: kept frequencies per axis (an int, or one per axis).
    - `n_layers`: number of Fourier layers.
    - `fc_width`: hidden width of the projection.
    - `padding`: zero padding per axis as a fraction of its length (a float for all axes, or
        one per axis; 0 for periodic axes).
    - `output_activation`: apply GELU to the outputs.
    - `dtype`: parameter dtype (float32 by default; the input is cast to it).
    - `key`: PRNG key.
    """

    lift: Pointwise
    layers: tuple[FourierLayer, ...]
    project_hidden: Pointwise
    project_out: Pointwise
    in_channels: int = eqx.field(static=True)
    n_basis: int = eqx.field(static=True)
    padding: tuple[float, ...] = eqx.field(static=True)
    output_activation: bool = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        n_basis: int,
        *,
        ndim: int,
        width: int = 32,
        modes: int | Sequence[int] = 8,
        n_layers: int = 4,
        fc_width: int = 128,
        padding: float | Sequence[float] = 0.0,
        output_activation: bool = False,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        for name, value in [
            ("in_channels", in_channels),
            ("n_basis", n_basis),
            ("ndim", ndim),
            ("width", width),
            ("n_layers", n_layers),
            ("fc_width", fc_width),
        ]:
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: expected a positive integer; got {value!r}.")
        self.padding = _per_axis(padding, ndim, "padding", float)
        if any(p < 0 for p in self.padding):
            raise ValueError(f"padding: expected non-negative fractions; got {self.padding}.")
        modes = _per_axis(modes, ndim, "modes", int)
        lkey, hkey, okey, *layer_keys = jr.split(key, 3 + n_layers)
        self.lift = Pointwise(in_channels, width, dtype=dtype, key=lkey)
        self.layers = tuple(
            FourierLayer(width, modes, ndim=ndim, activation=i < n_layers - 1, dtype=dtype, key=k)
            for i, k in enumerate(layer_keys)
        )
        self.project_hidden = Pointwise(width, fc_width, dtype=dtype, key=hkey)
        self.project_out = Pointwise(fc_width, n_basis, dtype=dtype, key=okey)
        self.in_channels = in_channels
        self.n_basis = n_basis
        self.output_activation = output_activation

    @property
    def ndim(self) -> int:
        return len(self.padding)

    def __call__(
        self, x: Float[Array, "*grid in_channels"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*grid n_basis"]:
        """Evaluate on one input field of shape `(*grid, in_channels)`.

        `key` is accepted (and unused) so the model fits `model(x, key=...)` call sites.
        """
        del key
        if x.ndim != self.ndim + 1 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"x: expected shape (*grid, {self.in_channels}) with {self.ndim} grid axes; "
                f"got {x.shape}. Batches need jax.vmap(model)."
            )
        grid_shape = x.shape[:-1]
        v = self.lift(x.astype(self.lift.weight.dtype))
        pad = [(0, math.ceil(p * n)) for p, n in zip(self.padding, grid_shape)] + [(0, 0)]
        v = jnp.pad(v, pad)
        for layer in self.layers:
            v = layer(v)
        v = v[tuple(slice(0, n) for n in grid_shape)]
        v = self.project_out(jax.nn.gelu(self.project_hidden(v)))
        return jax.nn.gelu(v) if self.output_activation else v

    # -- presets ----------------------------------------------------------------------------
    @classmethod
    def diffusion_sorption_paper(cls, key: PRNGKeyArray, **overrides) -> FNO:
        """The paper's diffusion–sorption backbone: FNO2D on `(t, x)`, 5 layers, width 64,
        8 modes, fc 128, N = 16 basis functions with GELU on the outputs. The input is
        `grid_input(grid, u0)` (3 channels). Keywords override any field (e.g. `dtype`)."""
        options: dict[str, Any] = dict(
            ndim=2, width=64, modes=8, n_layers=5, fc_width=128, output_activation=True
        )
        return cls(3, 16, **(options | overrides), key=key)

    @classmethod
    def navier_stokes_paper(cls, key: PRNGKeyArray, **overrides) -> FNO:
        """The paper's Navier–Stokes backbone: FNO3D on `(t, x, y)`, 8 layers, width 64,
        8 modes, fc 256, N = 64 basis functions. The input is `grid_input(grid, w0)`
        (4 channels). Keywords override any field."""
        options: dict[str, Any] = dict(ndim=3, width=64, modes=8, n_layers=8, fc_width=256)
        return cls(4, 64, **(options | overrides), key=key)

    @classmethod
    def diffusion_sorption_small(cls, key: PRNGKeyArray, **overrides) -> FNO:
        """A CPU-sized diffusion–sorption backbone (3 layers, width 16, 6 modes, fc 32, N = 8,
        GELU outputs), for tests, examples and quick experiments."""
        options: dict[str, Any] = dict(
            ndim=2, width=16, modes=6, n_layers=3, fc_width=32, output_activation=True
        )
        return cls(3, 8, **(options | overrides), key=key)

    @classmethod
    def navier_stokes_small(cls, key: PRNGKeyArray, **overrides) -> FNO:
        """A CPU-sized Navier–Stokes backbone (3 layers, width 12, 4 modes, fc 32, N = 16)."""
        options: dict[str, Any] = dict(ndim=3, width=12, modes=4, n_layers=3, fc_width=32)
        return cls(4, 16, **(options | overrides), key=key)


fno_input = grid_input  # the former name, kept as an alias
