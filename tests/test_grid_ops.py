import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hcmoe
from hcmoe import ops


def _observed_order(errors, sizes):
    return np.polyfit(np.log(1.0 / np.asarray(sizes)), np.log(errors), 1)[0]


@pytest.mark.parametrize("order,accuracy", [(1, 2), (2, 2), (1, 4), (2, 4), (3, 2)])
def test_finite_difference_convergence_order(order, accuracy):
    errors, sizes = [], [32, 64, 128]
    for n in sizes:
        grid = hcmoe.uniform_grid(x=(0.0, 1.0, n))
        x = jnp.asarray(grid.coords("x"))
        u = jnp.exp(np.sin(2 * x))
        derivative = ops.FiniteDifference("x", order=order, accuracy=accuracy)(u, grid)
        exact = jax.vmap(_nth_derivative(lambda s: jnp.exp(jnp.sin(2 * s)), order))(x)
        errors.append(float(jnp.max(jnp.abs(derivative - exact))))
    # edges use one-sided stencils of the same width: accuracy there is width - order
    width = 2 * ((order + 1) // 2 - 1 + accuracy // 2) + 1
    expected = min(accuracy, width - order)
    assert _observed_order(errors, sizes) > expected - 0.3


def _nth_derivative(fn, n):
    for _ in range(n):
        fn = jax.grad(fn)
    return fn


def test_periodic_finite_difference_and_spectral_derivatives():
    grid = hcmoe.uniform_grid(x=(0.0, 2 * np.pi, 32), y=(0.0, 2 * np.pi, 16), periodic=("x", "y"))
    mesh = grid.mesh()
    u = jnp.sin(3 * mesh["x"]) * jnp.cos(2 * mesh["y"])
    assert (
        jnp.max(
            jnp.abs(
                ops.Spectral("x")(u, grid) - 3 * jnp.cos(3 * mesh["x"]) * jnp.cos(2 * mesh["y"])
            )
        )
        < 1e-12
    )
    assert jnp.max(jnp.abs(ops.Laplacian()(u, grid) + 13 * u)) < 1e-11
    assert jnp.max(jnp.abs(ops.InverseLaplacian()(ops.Laplacian()(u, grid), grid) - u)) < 1e-12
    fd = ops.FiniteDifference("y", order=2)(u, grid)
    h = 2 * np.pi / 16
    assert jnp.max(jnp.abs(fd + 4 * u)) < 4 * h**2  # O(h^2), no edge effects when periodic


def test_velocity_from_vorticity_is_divergence_free_and_curl_consistent():
    grid = hcmoe.uniform_grid(x=(0.0, 1.0, 32), y=(0.0, 1.0, 32), periodic=("x", "y"))
    mesh = grid.mesh()
    psi = jnp.sin(2 * np.pi * mesh["x"]) * jnp.cos(4 * np.pi * mesh["y"]) + jnp.cos(
        2 * np.pi * mesh["y"]
    )
    omega = -ops.Laplacian()(psi, grid)
    u = ops.VelocityFromVorticity("u")(omega, grid)
    v = ops.VelocityFromVorticity("v")(omega, grid)
    divergence = ops.Spectral("x")(u, grid) + ops.Spectral("y")(v, grid)
    curl = ops.Spectral("x")(v, grid) - ops.Spectral("y")(u, grid)
    assert jnp.max(jnp.abs(divergence)) < 1e-10
    assert jnp.max(jnp.abs(curl - omega)) < 1e-9


def test_operators_act_on_trailing_axes_and_combine():
    grid = hcmoe.uniform_grid(t=(0.0, 1.0, 9), x=(0.0, 1.0, 11))
    mesh = grid.mesh()
    u = jnp.asarray(mesh["t"] * mesh["x"] ** 2)
    stack = jnp.stack([u, 2 * u, -u], axis=-1)
    op = (
        2.0 * ops.Identity()
        - ops.FiniteDifference("x")
        + ops.Compose(ops.FiniteDifference("t"), ops.FiniteDifference("x"))
    )
    single = op(u, grid)
    batched = op(stack, grid)
    assert batched.shape == stack.shape
    assert jnp.max(jnp.abs(batched[..., 1] - 2 * single)) < 1e-12
    exact = 2 * u - 2 * mesh["t"] * mesh["x"] + 2 * mesh["x"]
    assert jnp.max(jnp.abs(single - exact)) < 1e-11
    user = ops.Linear(lambda f, g: jnp.cumsum(f, axis=g.axis("x")))
    assert user(stack, grid).shape == stack.shape


def test_spectral_on_non_periodic_axis_is_rejected():
    grid = hcmoe.uniform_grid(x=(0.0, 1.0, 8))
    with pytest.raises(ValueError, match="axis 'x' .* is not periodic"):
        ops.Spectral("x")(jnp.zeros(8), grid)


def test_partition_labels_are_resolution_independent():
    partition = hcmoe.Partition(t=2, x=4)
    for nt, nx in [(8, 16), (32, 64), (101, 1024)]:
        grid = hcmoe.uniform_grid(t=(0.0, 1.0, nt), x=(0.0, 1.0, nx))
        labels = partition.labels(grid)
        assert labels.shape == grid.shape and set(np.unique(labels)) == set(range(8))
        mesh = grid.mesh()
        expected = np.minimum(np.floor(mesh["t"] * 2), 1) * 4 + np.minimum(
            np.floor(mesh["x"] * 4), 3
        )
        assert np.array_equal(labels, expected)


def test_uneven_partition_and_periodic_extent():
    grid = hcmoe.uniform_grid(x=(0.0, 1.0, 10), y=(0.0, 1.0, 7), periodic=("x", "y"))
    labels = hcmoe.Partition(x=3, y=2).labels(grid)
    counts = np.bincount(labels.reshape(-1))
    assert counts.sum() == 70 and counts.size == 6 and counts.min() > 0
    # a periodic axis of 10 points spans one period [0, 1): blocks cut at 1/3, 2/3
    assert np.array_equal(labels[:, 0] // 2, np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2]))


def test_grid_validation_messages():
    with pytest.raises(ValueError, match="strictly increasing"):
        hcmoe.Grid(x=np.array([0.0, 0.5, 0.4]))
    with pytest.raises(ValueError, match="periodic axis 'y' is not one of the axes"):
        hcmoe.Grid(x=np.linspace(0, 1, 4), periodic=("y",))
    with pytest.raises(ValueError, match="uniform spacing"):
        hcmoe.Grid(x=np.array([0.0, 0.1, 0.3]), periodic=("x",))
    with pytest.raises(ValueError, match="unknown grid axis 'z'"):
        hcmoe.uniform_grid(x=(0, 1, 4)).axis("z")


def test_grid_is_static_and_hashable():
    a = hcmoe.uniform_grid(t=(0, 1, 5), x=(0, 1, 7))
    b = hcmoe.uniform_grid(t=(0, 1, 5), x=(0, 1, 7))
    assert a == b and hash(a) == hash(b)
    assert jax.tree_util.tree_leaves(a) == []
    assert a != hcmoe.uniform_grid(t=(0, 1, 5), x=(0, 2, 7))
