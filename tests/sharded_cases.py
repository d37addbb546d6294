"""Sharding tests on 8 fake CPU devices.

Not collected by the default run (the name does not match `test_*.py`): the device count is
fixed when JAX starts, so `tests/test_sharding.py::test_sharded_cases_on_eight_devices` runs
this file in a fresh `python -m pytest` with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, leaving the main test process on one
device. To run it directly:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/sharded_cases.py

Its `slow` cases run from `pytest -m slow` (the outer test's slow variant).
"""

import re

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hcmoe

from .helpers import ForcedBurgers, ForcedHeat, basis_with_exact, data_for, small_grid


if jax.device_count() < 8:
    pytest.skip(
        "needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
        allow_module_level=True,
    )

TOL = dict(rtol=1e-9, atol=1e-11)


def _close(x, y):
    # NumPy, not jnp: an eager jnp op on a sharded array compiles a program per sharding.
    return np.allclose(np.asarray(x), np.asarray(y), **TOL)


def _noisy_basis(grid, key):
    k1, k2 = jr.split(key)
    return basis_with_exact(grid, k1) + 0.05 * jr.normal(k2, grid.shape + (5,))


def _value_and_grad(pde, partition, grid, mesh, readout):
    """jit(value_and_grad) of a loss reading both `u` and the per-expert `weights`."""

    def loss(basis):
        sol = hcmoe.solve(
            basis, pde, partition, grid, data_for(grid), coupling=hcmoe.Independent(mesh=mesh)
        )
        return jnp.sum(sol.u * readout) + jnp.sum(sol.weights**2), sol

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _qr_batch(fn, *args) -> tuple[int, ...]:
    """Per-device batch dims of the (first) LAPACK QR in `fn`'s compiled program."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    match = re.search(r"= \(f64\[([\d,]+)\][^\n]*custom_call_target=\"lapack_dgeqrf", text)
    assert match is not None, "no LAPACK QR in the compiled program"
    return tuple(int(d) for d in match.group(1).split(","))[:-2]


@pytest.mark.parametrize(
    "pde, num_experts, mesh_shape",
    [
        (ForcedHeat(), 4, (4,)),  # a jax.make_mesh mesh: Explicit axes, no "batch" axis
        (ForcedBurgers(), 6, (1, 4)),  # LM in a while loop, ImplicitAdjoint; padded to 8
        # Every device (K = 8 on 8): the default suite's B4-K8-2x4 case below covers an
        # expert_mesh whose devices divide K, so this one is opt-in (`-m slow`).
        pytest.param(ForcedHeat(), 8, (1, 8), marks=pytest.mark.slow),
    ],
    ids=["heat-K4-D4", "burgers-K6-D4", "heat-K8-D8"],
)
def test_sharded_solve_and_gradient_equal_unsharded(getkey, pde, num_experts, mesh_shape):
    grid = small_grid()
    basis = _noisy_basis(grid, getkey())
    readout = jr.normal(getkey(), grid.shape)
    partition = hcmoe.Partition(x=num_experts)
    if len(mesh_shape) == 1:
        mesh = jax.make_mesh(mesh_shape, ("experts",), devices=jax.devices()[: mesh_shape[0]])
    else:
        mesh = hcmoe.expert_mesh(mesh_shape[0] * mesh_shape[1], batch=mesh_shape[0])
    num_devices = mesh.shape["experts"]
    (_, ref), ref_grad = _value_and_grad(pde, partition, grid, None, readout)(basis)
    (_, sol), grad = _value_and_grad(pde, partition, grid, mesh, readout)(basis)

    assert np.all(ref.stats.converged) and np.all(sol.stats.converged)
    assert sol.weights.shape == (num_experts, 5)
    assert _close(sol.u, ref.u) and _close(sol.weights, ref.weights)
    assert np.array_equal(sol.stats.num_steps, ref.stats.num_steps)
    assert _close(grad, ref_grad)
    # Every device of the mesh holds the results: split over "experts" when the device count
    # divides K, else replicated (a jax.Array cannot be split unevenly), never on one device.
    devices = set(mesh.devices.flat)
    assert sol.weights.sharding.device_set == devices == sol.u.sharding.device_set
    assert grad.sharding.device_set == devices
    if num_experts % num_devices == 0:
        assert sol.weights.sharding.spec == P("experts")
        assert sol.stats.converged.sharding.spec == P("experts")
        shards = sol.weights.addressable_shards
        assert {s.data.shape for s in shards} == {(num_experts // num_devices, 5)}


def test_each_device_solves_only_its_slab(getkey):
    # K = 6 on 4 devices: padded to 8, so every device factorises 2 experts' matrices, where
    # an unsharded program factorises all 6.
    grid = small_grid()
    basis = _noisy_basis(grid, getkey())
    partition, data = hcmoe.Partition(x=6), data_for(grid)

    def run(mesh):
        coupling = hcmoe.Independent(mesh=mesh)
        return lambda b: hcmoe.solve(b, ForcedHeat(), partition, grid, data, coupling=coupling).u

    assert _qr_batch(run(None), basis) == (6,)
    assert _qr_batch(run(hcmoe.expert_mesh(4)), basis) == (2,)


@pytest.mark.parametrize(
    "batch_size, num_experts, mesh_shape",
    [(4, 8, (2, 4)), (3, 6, (2, 4))],
    ids=["B4-K8-2x4", "B3-K6-2x4-padded"],
)
def test_batch_by_experts_mesh(getkey, batch_size, num_experts, mesh_shape):
    grid = small_grid()
    bases = jnp.stack([_noisy_basis(grid, k) for k in jr.split(getkey(), batch_size)])
    data = {"u0": jnp.stack([data_for(grid)["u0"]] * batch_size)}
    readout = jr.normal(getkey(), (batch_size,) + grid.shape)
    key = getkey()
    batch, experts = mesh_shape
    mesh = hcmoe.expert_mesh(batch * experts, batch=batch)

    def loss(scale, mesh):
        model = hcmoe.constrain(
            lambda s, x: s * x,
            ForcedHeat(),
            hcmoe.Partition(x=num_experts),
            grid=grid,
            rows=hcmoe.Rows(points_per_expert=12),
            coupling=hcmoe.Independent(mesh=mesh),
        )
        sol = model(scale, bases, data, key=key)
        return jnp.sum(sol.u * readout) + jnp.sum(sol.weights**2), sol

    run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, ref), ref_grad = run(1.3, None)
    (_, sol), grad = run(1.3, mesh)
    assert sol.weights.shape == (batch_size, num_experts, 5)
    assert _close(sol.u, ref.u) and _close(sol.weights, ref.weights)
    assert _close(grad, ref_grad)
    assert sol.u.sharding.device_set == set(mesh.devices.flat)
    if batch_size % batch == 0:
        assert sol.u.sharding.spec[0] == "batch"
    if batch_size % batch == 0 and num_experts % experts == 0:
        assert sol.weights.sharding.spec == P("batch", "experts")


def test_sharded_blended_moe_equals_unsharded(getkey):
    """Overlapping experts with a partition of unity and global condition rows, sharded."""
    grid = small_grid()
    basis = _noisy_basis(grid, getkey())
    readout = jr.normal(getkey(), grid.shape)
    partition = hcmoe.Partition(x=4, overlap=0.1)
    mesh = hcmoe.expert_mesh(4)

    def run(mesh):
        def loss(basis):
            sol = hcmoe.solve(
                basis,
                ForcedBurgers(),
                partition,
                grid,
                data_for(grid),
                rows=hcmoe.Rows(condition_scope="global"),
                coupling=hcmoe.Independent(mesh=mesh),
            )
            return jnp.sum(sol.u * readout) + jnp.sum(sol.weights**2), sol

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(basis)

    (_, ref), ref_grad = run(None)
    (_, sol), grad = run(mesh)
    assert np.all(ref.stats.converged) and np.all(sol.stats.converged)
    assert _close(sol.u, ref.u) and _close(sol.weights, ref.weights)
    assert _close(grad, ref_grad)
