import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hcmoe._grid import uniform_grid
from hcmoe.models import FNO, SpectralConvolution, fno_input


def _periodic_field(shape, channels=2):
    """A smooth, band-limited periodic field sampled on `shape` (same function at any size)."""
    coords = np.meshgrid(*(np.arange(n) / n for n in shape), indexing="ij")
    phase = 2 * np.pi * sum((i + 1) * c for i, c in enumerate(coords))
    fields = [
        np.sin(phase + k) + 0.5 * np.cos(2 * np.pi * coords[0] * (k + 1)) for k in range(channels)
    ]
    return jnp.asarray(np.stack(fields, axis=-1))


@eqx.filter_jit
def _apply(model, x):
    return model(x)


def _build(constructor, key, **options):
    return constructor(**options, key=key)


def _small(ndim, getkey, **kwargs):
    options = dict(ndim=ndim, width=8, modes=3, n_layers=2, fc_width=8)
    return _build(FNO, getkey(), in_channels=ndim + 1, n_basis=5, **(options | kwargs))


def _normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


@pytest.mark.parametrize(
    "preset, grid",
    [
        (FNO.diffusion_sorption_small, uniform_grid(t=(0.0, 500.0, 9), x=(0.0, 1.0, 16))),
        (
            FNO.navier_stokes_small,
            uniform_grid(t=(0.0, 5.0, 6), x=(0.0, 1.0, 8), y=(0.0, 1.0, 10), periodic=("x", "y")),
        ),
    ],
)
def test_small_presets_on_fno_input(preset, grid, getkey):
    padding = (0.25,) + (0.0,) * (grid.ndim - 1)  # pad the non-periodic time axis
    model = _build(lambda key, padding: preset(key, padding=padding), getkey(), padding=padding)
    initial_condition = jnp.ones(grid.shape[1:], jnp.float64)
    out = _apply(model, fno_input(grid, initial_condition))
    assert out.shape == grid.shape + (model.n_basis,)
    assert out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


def test_parameter_dtype(getkey):
    model = _small(2, getkey, dtype=jnp.float64)
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    assert all(leaf.dtype == jnp.float64 for leaf in leaves)
    assert _apply(model, jnp.ones((8, 8, 3), jnp.float32)).dtype == jnp.float64


def test_output_activation_is_gelu(getkey):
    model = _small(2, getkey, output_activation=True)
    out = _apply(model, _normal((8, 8, 3)))
    assert float(out.min()) >= -0.17  # min of GELU is about -0.17


def test_spectral_convolution_is_resolution_independent(getkey):
    options = dict(in_channels=2, out_channels=3, modes=(4, 3), dtype=jnp.float64)
    conv = _build(SpectralConvolution, getkey(), **options)
    coarse = _apply(conv, _periodic_field((16, 12)))
    fine = _apply(conv, _periodic_field((64, 48)))
    np.testing.assert_allclose(coarse, fine[::4, ::4], atol=1e-12)


@pytest.mark.parametrize("shape, factor", [((16, 16), 4), ((8, 8, 8), 2)])
def test_fno_is_resolution_independent(shape, factor, getkey):
    model = _small(len(shape), getkey, dtype=jnp.float64)
    in_channels = len(shape) + 1
    coarse = _apply(model, _periodic_field(shape, in_channels))
    fine = _apply(model, _periodic_field(tuple(factor * n for n in shape), in_channels))
    subsample = tuple(slice(None, None, factor) for _ in shape)
    # Not exact: GELU creates harmonics above the coarse grid's Nyquist frequency, which alias.
    np.testing.assert_allclose(coarse, fine[subsample], atol=1e-2 * float(jnp.abs(fine).max()))


def test_coarse_grid_uses_available_modes(getkey):
    model = _small(2, getkey, modes=8)
    assert _apply(model, jnp.ones((5, 4, 3))).shape == (5, 4, 5)


def test_gradients_finite(getkey):
    model = _small(2, getkey, padding=(0.25, 0.0))
    x = _normal((6, 8, 3))

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(model):
        return jnp.mean(model(x) ** 2)

    grads = jax.tree.leaves(eqx.filter(grad(model), eqx.is_array))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert any(float(jnp.abs(g).max()) > 0 for g in grads)


def test_vmap_and_jit(getkey):
    model = _small(2, getkey)
    x = _normal((3, 8, 8, 3))
    batched = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(model, x)
    np.testing.assert_allclose(batched[1], _apply(model, x[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "preset, in_channels, n_basis, ndim",
    [
        (FNO.diffusion_sorption_paper, 3, 16, 2),
        (FNO.navier_stokes_paper, 4, 64, 3),
        (FNO.diffusion_sorption_small, 3, 8, 2),
        (FNO.navier_stokes_small, 4, 16, 3),
    ],
)
def test_presets_construct(preset, in_channels, n_basis, ndim, getkey):
    model = eqx.filter_eval_shape(preset, getkey())  # shapes only: the paper nets are large
    assert (model.in_channels, model.n_basis, model.ndim) == (in_channels, n_basis, ndim)


def test_paper_presets_match_published_sizes(getkey):
    ds = eqx.filter_eval_shape(FNO.diffusion_sorption_paper, getkey())
    assert len(ds.layers) == 5 and ds.output_activation
    assert ds.lift.weight.shape == (64, 3) and ds.project_hidden.weight.shape == (128, 64)
    assert ds.layers[0].spectral.weight_real.shape == (16, 8, 64, 64)
    ns = eqx.filter_eval_shape(FNO.navier_stokes_paper, getkey())
    assert len(ns.layers) == 8 and not ns.output_activation
    assert ns.project_hidden.weight.shape == (256, 64)
    assert ns.layers[0].spectral.weight_real.shape == (16, 16, 8, 64, 64)


def test_fno_input():
    grid = uniform_grid(t=(0.0, 500.0, 5), x=(0.0, 1.0, 4))
    u0 = jnp.array([0.1, 0.2, 0.3, 0.4])
    x = fno_input(grid, u0)
    assert x.shape == (5, 4, 3)
    np.testing.assert_allclose(x[:, 0, 0], np.linspace(0, 1, 5))
    np.testing.assert_allclose(x[0, :, 1], np.linspace(0, 1, 4))
    np.testing.assert_allclose(x[3, :, 2], u0)
    raw = fno_input(grid, 0.1, normalize=False, dtype=jnp.float32)
    assert raw.dtype == jnp.float32 and float(raw[-1, 0, 0]) == 500.0
    assert bool(jnp.all(raw[..., 2] == jnp.float32(0.1)))


def test_fno_input_periodic_extent():
    grid = uniform_grid(t=(0.0, 5.0, 3), x=(0.0, 1.0, 4), periodic=("x",))
    np.testing.assert_allclose(fno_input(grid, 0.0)[0, :, 1], [0, 0.25, 0.5, 0.75])


def test_errors(getkey):
    model = _small(2, getkey)
    with pytest.raises(ValueError, match=r"x: expected shape \(\*grid, 3\)"):
        _apply(model, jnp.ones((4, 4, 2)))
    with pytest.raises(ValueError, match="x: expected shape"):
        _apply(model, jnp.ones((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="modes: expected one value or 2 values"):
        FNO(3, 2, ndim=2, modes=(4, 4, 4), key=getkey())
    with pytest.raises(ValueError, match="width: expected a positive integer"):
        FNO(3, 2, ndim=2, width=0, key=getkey())
    with pytest.raises(ValueError, match="padding: expected non-negative"):
        FNO(3, 2, ndim=2, padding=-0.1, key=getkey())
    with pytest.raises(ValueError, match="ndim: required"):
        SpectralConvolution(2, 2, 4, key=getkey())
    grid = uniform_grid(t=(0.0, 1.0, 3), x=(0.0, 1.0, 4))
    with pytest.raises(ValueError, match=r"initial_condition: .*\(4,\)"):
        fno_input(grid, jnp.ones(3))
