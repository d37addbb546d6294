"""Fourier multipliers on periodic axes: spectral derivatives, the Laplacian, its inverse and
the velocity from the vorticity."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._grid import Grid
from ._base import AbstractOperator
from ._finite_difference import FiniteDifference


def _wavenumbers(grid: Grid, name: str) -> np.ndarray:
    if not grid.is_periodic(name):
        raise ValueError(
            f"spectral operators need a periodic axis; axis {name!r} of {grid} is not periodic "
            f"(declare it with Grid(..., periodic=({name!r},)) or use FiniteDifference)."
        )
    n = grid.shape[grid.axis(name)]
    low, high = grid.extent(name)
    return 2 * np.pi * np.fft.fftfreq(n, d=(high - low) / n)


def _symbol_on_grid(grid: Grid, wavenumbers: dict[str, np.ndarray], symbol) -> np.ndarray:
    """`symbol(k_a, k_b, ...)` on the grid's axes: size 1 on the axes not in `wavenumbers`."""
    grids = []
    for name, k in wavenumbers.items():
        shape = [1] * grid.ndim
        shape[grid.axis(name)] = k.size
        grids.append(k.reshape(shape))
    return np.broadcast_to(symbol(*grids), _symbol_shape(grid, tuple(wavenumbers)))


def _symbol_shape(grid: Grid, names) -> tuple[int, ...]:
    return tuple(n if a in names else 1 for a, n in zip(grid.names, grid.shape))


def _rfft(field: Array, grid: Grid, names: tuple[str, ...]) -> Array:
    """The real FFT of `field` over the periodic axes `names` (in grid order; the last one
    is halved)."""
    return jnp.fft.rfftn(field, axes=tuple(grid.axis(a) for a in names))


def _irfft(spectrum: Array, symbol: np.ndarray, grid: Grid, names, field: Array) -> Array:
    """The real field whose spectrum over `names` is `spectrum * symbol` (shape of `field`)."""
    axes = tuple(grid.axis(a) for a in names)
    last = axes[-1]
    symbol = np.asarray(symbol)
    if symbol.shape[last] > 1:
        symbol = np.take(symbol, np.arange(spectrum.shape[last]), axis=last)  # rfft half
    symbol = symbol.reshape(symbol.shape + (1,) * (field.ndim - grid.ndim))
    sizes = tuple(field.shape[a] for a in axes)
    out = jnp.fft.irfftn(spectrum * jnp.asarray(symbol, spectrum.dtype), s=sizes, axes=axes)
    return out.astype(field.dtype)


def _apply_symbol(op: AbstractOperator, field: Array, grid: Grid) -> Array:
    found = op.fourier_symbol(grid)
    assert found is not None, f"{type(op).__name__}: no Fourier symbol on this grid"
    names, symbol = found
    return _irfft(_rfft(field, grid, names), symbol, grid, names, field)


def _zero_nyquist(k: np.ndarray, order: int) -> np.ndarray:
    # The Nyquist mode of an odd derivative has no real-valued representation; drop it.
    if order % 2 and k.size % 2 == 0:
        k = k.copy()
        k[k.size // 2] = 0.0
    return k


class Spectral(AbstractOperator):
    """The `order`-th derivative along a periodic axis by FFT (mode `k` times `(ik)^order`)."""

    axis: str = eqx.field(static=True)
    order: int = eqx.field(static=True, default=1)

    def fourier_symbol(self, grid):
        k = _zero_nyquist(_wavenumbers(grid, self.axis), self.order)
        return (self.axis,), _symbol_on_grid(
            grid, {self.axis: k}, lambda kk: (1j * kk) ** self.order
        )

    def __call__(self, field, grid):
        return _apply_symbol(self, field, grid)


class Laplacian(AbstractOperator):
    """`sum_a d^2 u / d a^2` over `axes`, spectrally (`method="spectral"`, periodic axes only)
    or by second-order finite differences (`method="fd"`)."""

    axes: tuple[str, ...] = eqx.field(static=True, default=("x", "y"))
    method: str = eqx.field(static=True, default="spectral")

    def __check_init__(self):
        if self.method not in ("spectral", "fd"):
            raise ValueError(f"Laplacian: method must be 'spectral' or 'fd'; got {self.method!r}.")

    def _fd(self) -> AbstractOperator:
        return sum(
            (FiniteDifference(a, order=2) for a in self.axes[1:]),
            FiniteDifference(self.axes[0], order=2),
        )

    def fourier_symbol(self, grid):
        if self.method == "fd":
            return None
        ks = {a: _wavenumbers(grid, a) for a in self.axes}
        return _names(grid, ks), _symbol_on_grid(grid, ks, lambda *kk: -sum(k**2 for k in kk))

    def point_stencil(self, grid, points):
        return self._fd().point_stencil(grid, points) if self.method == "fd" else None

    def at_points(self, field, grid, points):
        if self.method == "fd":
            return self._fd().at_points(field, grid, points)
        return super().at_points(field, grid, points)

    def __call__(self, field, grid):
        if self.method == "fd":
            return sum(FiniteDifference(a, order=2)(field, grid) for a in self.axes)
        return _apply_symbol(self, field, grid)


def _names(grid: Grid, wavenumbers: dict) -> tuple[str, ...]:
    return tuple(a for a in grid.names if a in wavenumbers)


class InverseLaplacian(AbstractOperator):
    """`psi = Delta^{-1} u` on periodic `axes`, with the mean mode set to zero."""

    axes: tuple[str, ...] = eqx.field(static=True, default=("x", "y"))

    def fourier_symbol(self, grid):
        ks = {a: _wavenumbers(grid, a) for a in self.axes}

        def symbol(*kk):
            k2 = sum(k**2 for k in kk)
            return np.where(k2 == 0, 0.0, -1.0 / np.where(k2 == 0, 1.0, k2))

        return _names(grid, ks), _symbol_on_grid(grid, ks, symbol)

    def __call__(self, field, grid):
        return _apply_symbol(self, field, grid)


class VelocityFromVorticity(AbstractOperator):
    """One component of the 2-D incompressible velocity of a periodic vorticity field.

    With the stream function `-Delta psi = omega` (zero mean): `u = d psi / dy`,
    `v = -d psi / dx`. `component` is `"u"` (along `axes[0]`) or `"v"` (along `axes[1]`).
    """

    component: str = eqx.field(static=True)
    axes: tuple[str, str] = eqx.field(static=True, default=("x", "y"))

    def __check_init__(self):
        if self.component not in ("u", "v"):
            raise ValueError(
                f"VelocityFromVorticity: component must be 'u' or 'v'; got {self.component!r}."
            )

    def fourier_symbol(self, grid):
        ax, ay = self.axes
        ks = {
            ax: _zero_nyquist(_wavenumbers(grid, ax), 1),
            ay: _zero_nyquist(_wavenumbers(grid, ay), 1),
        }

        def symbol(kx_, ky_):
            k2 = kx_**2 + ky_**2
            inv = np.where(k2 == 0, 0.0, 1.0 / np.where(k2 == 0, 1.0, k2))  # psi = omega / k^2
            return 1j * ky_ * inv if self.component == "u" else -1j * kx_ * inv

        return _names(grid, ks), _symbol_on_grid(grid, ks, symbol)

    def __call__(self, field, grid):
        return _apply_symbol(self, field, grid)
