"""Linear operators on grid fields.

Every operator maps a field of shape `(*grid.shape, *trailing)` to one of the same shape,
acting on the grid axes only, so the same code applies it to a solution `u` (no trailing
axes) and to a whole stack of basis functions `B` (one trailing basis axis) at once.
Operators combine linearly: `ops.Identity() - 0.5 * ops.FiniteDifference("x")`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._grid import Grid


class AbstractOperator(eqx.Module):
    """A linear map of grid fields.

    Subclasses implement `__call__(field, grid)`: `field` has shape
    `(*grid.shape, *trailing)` and the result has the same shape. Linearity is the contract
    that the solver relies on (`L(B w) = (L B) w`); it is not checked.
    """

    @abc.abstractmethod
    def __call__(self, field: Array, grid: Grid) -> Array:
        """Apply the operator to `field` (shape `(*grid.shape, *trailing)`)."""

    def __add__(self, other):
        return Combination(((1.0, self), (1.0, _as_operator(other))))

    def __radd__(self, other):
        return Combination(((1.0, _as_operator(other)), (1.0, self)))

    def __sub__(self, other):
        return Combination(((1.0, self), (-1.0, _as_operator(other))))

    def __rsub__(self, other):
        return Combination(((1.0, _as_operator(other)), (-1.0, self)))

    def __neg__(self):
        return Combination(((-1.0, self),))

    def __mul__(self, scale):
        if isinstance(scale, AbstractOperator):
            raise TypeError(
                "operators compose with `ops.Compose(outer, inner)`, not `*`; "
                "`*` scales an operator by a number."
            )
        return Combination(((scale, self),))

    __rmul__ = __mul__


def _as_operator(value) -> AbstractOperator:
    if isinstance(value, AbstractOperator):
        return value
    raise TypeError(f"expected an hcmoe operator; got {type(value).__name__}: {value!r}.")


class Identity(AbstractOperator):
    """`L u = u`."""

    def __call__(self, field, grid):
        return field


class Combination(AbstractOperator):
    """`L u = sum_i c_i L_i u` (built by `+`, `-` and scalar `*` on operators)."""

    terms: tuple[tuple[float, AbstractOperator], ...]

    def __call__(self, field, grid):
        return sum(scale * op(field, grid) for scale, op in self.terms)

    def __add__(self, other):
        other = _as_operator(other)
        extra = other.terms if isinstance(other, Combination) else ((1.0, other),)
        return Combination(self.terms + extra)

    def __mul__(self, scale):
        if isinstance(scale, AbstractOperator):
            return super().__mul__(scale)
        return Combination(tuple((scale * c, op) for c, op in self.terms))

    __rmul__ = __mul__


class Compose(AbstractOperator):
    """`L u = outer(inner(u))`."""

    outer: AbstractOperator
    inner: AbstractOperator

    def __call__(self, field, grid):
        return self.outer(self.inner(field, grid), grid)


class Linear(AbstractOperator):
    """A user-supplied linear callable `fn(field, grid) -> field`.

    `fn` must be linear in `field` and act on the leading `grid.ndim` axes only (trailing axes
    are a batch of fields).
    """

    fn: Callable = eqx.field(static=True)

    def __call__(self, field, grid):
        out = self.fn(field, grid)
        if out.shape != field.shape:
            raise ValueError(
                f"ops.Linear: fn must return the shape of its input {field.shape}; "
                f"got {out.shape}."
            )
        return out


# --------------------------------------------------------------------------------------------
# Finite differences
# --------------------------------------------------------------------------------------------


def fd_weights(offsets: np.ndarray, order: int) -> np.ndarray:
    """Weights `c` with `sum_k c_k f(x + offsets_k h) ~= h^order f^(order)(x)`.

    Solves the moment (Vandermonde) conditions exactly; accuracy is `len(offsets) - order`.
    """
    offsets = np.asarray(offsets, dtype=np.float64)
    n = offsets.size
    powers = np.arange(n)
    vandermonde = offsets[None, :] ** powers[:, None]
    rhs = np.zeros(n)
    rhs[order] = math.factorial(order)
    return np.linalg.solve(vandermonde, rhs)


def _fd_stencils(n: int, order: int, accuracy: int, periodic: bool):
    """Per-point neighbour indices and weights (unit spacing), shapes `(n, width)`.

    Interior points use the central stencil of the requested accuracy (width
    `2*floor((order+1)/2) - 1 + accuracy`); on a non-periodic axis the points too close to an
    edge use one-sided stencils of the same width, as close to centred as fits.
    """
    half = (order + 1) // 2 - 1 + accuracy // 2
    width = 2 * half + 1
    if not periodic and width > n:
        raise ValueError(
            f"FiniteDifference: a derivative of order {order} with accuracy {accuracy} needs "
            f"{width} points along the axis; the grid has {n}."
        )
    central = fd_weights(np.arange(-half, half + 1), order)
    index = np.empty((n, width), dtype=np.int32)
    weight = np.empty((n, width), dtype=np.float64)
    for i in range(n):
        if periodic:
            index[i] = (i + np.arange(-half, half + 1)) % n
            weight[i] = central
        else:
            start = min(max(i - half, 0), n - width)
            index[i] = np.arange(start, start + width)
            weight[i] = central if start == i - half else fd_weights(index[i] - i, order)
    return index, weight


class FiniteDifference(AbstractOperator):
    """The `order`-th derivative along one axis by finite differences.

    Central differences of the given `accuracy` (even, default 2) inside; on a non-periodic
    axis, one-sided stencils of the same width near the edges (formal accuracy
    `width - order`: the same as inside for odd orders, one less for even orders);
    wrap-around on a periodic axis. Assumes uniform spacing along the axis.

    **Arguments:**

    - `axis`: the grid axis name, e.g. `"x"`.
    - `order`: derivative order (1, 2, ...).
    - `accuracy`: even formal order of accuracy of the interior stencil.
    """

    axis: str = eqx.field(static=True)
    order: int = eqx.field(static=True, default=1)
    accuracy: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"FiniteDifference: order must be an int >= 1; got {self.order!r}.")
        if not isinstance(self.accuracy, int) or self.accuracy < 2 or self.accuracy % 2:
            raise ValueError(
                f"FiniteDifference: accuracy must be an even int >= 2; got {self.accuracy!r}."
            )

    def __call__(self, field, grid):
        axis = grid.axis(self.axis)
        n = grid.shape[axis]
        index, weight = _fd_stencils(n, self.order, self.accuracy, grid.is_periodic(self.axis))
        weight = weight / grid.spacing(self.axis) ** self.order
        return _apply_stencils(field, axis, index, weight)


def _apply_stencils(field, axis: int, index: np.ndarray, weight: np.ndarray):
    """`out[i] = sum_j weight[i, j] * field[index[i, j]]` along `axis` (per-point stencils)."""
    n = index.shape[0]
    moved = jnp.moveaxis(field, axis, 0)
    out = 0
    for j in range(index.shape[1]):
        w = jnp.asarray(weight[:, j], dtype=field.dtype).reshape((n,) + (1,) * (field.ndim - 1))
        out = out + w * moved[index[:, j]]
    return jnp.moveaxis(out, 0, axis)


def _backward_stencils(n: int, accuracy: int):
    """First derivative from the point and the `accuracy` points before it (BDF weights);
    the first points use as many earlier points as there are (point 0: a forward stencil)."""
    if accuracy + 1 > n:
        raise ValueError(
            f"BackwardDifference: accuracy {accuracy} needs {accuracy + 1} points along the "
            f"axis; the grid has {n}."
        )
    width = accuracy + 1
    index = np.empty((n, width), dtype=np.int32)
    weight = np.zeros((n, width), dtype=np.float64)
    for i in range(n):
        if i == 0:
            offsets = np.arange(width)
        else:
            offsets = -np.arange(min(i, accuracy) + 1)[::-1]
        points = i + offsets
        index[i] = np.concatenate([points, np.full(width - points.size, i)])
        weight[i, : points.size] = fd_weights(offsets, 1)
    return index, weight


class BackwardDifference(AbstractOperator):
    """The first derivative along an axis from the current and earlier points only (the BDF
    formulas: `accuracy=1` is backward Euler, `2` is BDF2; the first points use the lower
    orders that fit, point 0 a forward stencil). In time, a residual built on it is an
    implicit, A-stable time-stepping scheme: its discrete solution is determined level by
    level by the initial and boundary conditions, and a small residual means a small error,
    which central differences in time (leapfrog, unstable for diffusion) do not give.

    **Arguments:**

    - `axis`: the grid axis name, usually `"t"` (not periodic).
    - `accuracy`: 1 or more: the number of earlier points used.
    """

    axis: str = eqx.field(static=True)
    accuracy: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if not isinstance(self.accuracy, int) or self.accuracy < 1:
            raise ValueError(
                f"BackwardDifference: accuracy must be an int >= 1; got {self.accuracy!r}."
            )

    def __call__(self, field, grid):
        if grid.is_periodic(self.axis):
            raise ValueError(
                f"BackwardDifference: axis {self.axis!r} is periodic; use FiniteDifference."
            )
        axis = grid.axis(self.axis)
        n = grid.shape[axis]
        index, weight = _backward_stencils(n, self.accuracy)
        weight = weight / grid.spacing(self.axis)
        return _apply_stencils(field, axis, index, weight)


# --------------------------------------------------------------------------------------------
# Spectral operators (periodic axes)
# --------------------------------------------------------------------------------------------


def _wavenumbers(grid: Grid, name: str, dtype) -> np.ndarray:
    if not grid.is_periodic(name):
        raise ValueError(
            f"spectral operators need a periodic axis; axis {name!r} of {grid} is not periodic "
            f"(declare it with Grid(..., periodic=({name!r},)) or use FiniteDifference)."
        )
    n = grid.shape[grid.axis(name)]
    low, high = grid.extent(name)
    return 2 * np.pi * np.fft.fftfreq(n, d=(high - low) / n)


def _spectral_apply(field, grid: Grid, multipliers: dict[str, np.ndarray], symbol) -> Array:
    """Multiply the Fourier transform over the periodic axes in `multipliers` by `symbol`."""
    axes = tuple(grid.axis(name) for name in multipliers)
    spectrum = jnp.fft.fftn(field, axes=axes)
    shape = [1] * field.ndim
    grids = []
    for name, k in multipliers.items():
        s = list(shape)
        s[grid.axis(name)] = k.size
        grids.append(k.reshape(s))
    factor = symbol(*grids)
    out = jnp.fft.ifftn(spectrum * jnp.asarray(factor, dtype=spectrum.dtype), axes=axes)
    return out.real.astype(field.dtype)


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

    def __call__(self, field, grid):
        k = _zero_nyquist(_wavenumbers(grid, self.axis, field.dtype), self.order)
        return _spectral_apply(field, grid, {self.axis: k}, lambda kk: (1j * kk) ** self.order)


class Laplacian(AbstractOperator):
    """`sum_a d^2 u / d a^2` over `axes`, spectrally (`method="spectral"`, periodic axes only)
    or by second-order finite differences (`method="fd"`)."""

    axes: tuple[str, ...] = eqx.field(static=True, default=("x", "y"))
    method: str = eqx.field(static=True, default="spectral")

    def __check_init__(self):
        if self.method not in ("spectral", "fd"):
            raise ValueError(f"Laplacian: method must be 'spectral' or 'fd'; got {self.method!r}.")

    def __call__(self, field, grid):
        if self.method == "fd":
            return sum(FiniteDifference(a, order=2)(field, grid) for a in self.axes)
        ks = {a: _wavenumbers(grid, a, field.dtype) for a in self.axes}
        return _spectral_apply(field, grid, ks, lambda *kk: -sum(k**2 for k in kk))


class InverseLaplacian(AbstractOperator):
    """`psi = Delta^{-1} u` on periodic `axes`, with the mean mode set to zero."""

    axes: tuple[str, ...] = eqx.field(static=True, default=("x", "y"))

    def __call__(self, field, grid):
        ks = {a: _wavenumbers(grid, a, field.dtype) for a in self.axes}

        def symbol(*kk):
            k2 = sum(k**2 for k in kk)
            return np.where(k2 == 0, 0.0, -1.0 / np.where(k2 == 0, 1.0, k2))

        return _spectral_apply(field, grid, ks, symbol)


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

    def __call__(self, field, grid):
        ax, ay = self.axes
        kx = _zero_nyquist(_wavenumbers(grid, ax, field.dtype), 1)
        ky = _zero_nyquist(_wavenumbers(grid, ay, field.dtype), 1)

        def symbol(kx_, ky_):
            k2 = kx_**2 + ky_**2
            inv = np.where(k2 == 0, 0.0, 1.0 / np.where(k2 == 0, 1.0, k2))  # psi = omega / k^2
            return 1j * ky_ * inv if self.component == "u" else -1j * kx_ * inv

        return _spectral_apply(field, grid, {ax: kx, ay: ky}, symbol)
