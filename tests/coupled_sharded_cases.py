"""Sharded coupled experts (and the independent experts' split adjoint) on 8 fake devices.

Not collected by the default run;
`tests/test_coupled.py::test_coupled_sharded_cases_on_eight_devices` runs it in a fresh
interpreter with `XLA_FLAGS=--xla_force_host_platform_device_count=8`. Directly:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/coupled_sharded_cases.py
"""

import re

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import hcmoe
from hcmoe.problems import diffusion_sorption

from .helpers import ForcedBurgers, basis_with_exact, data_for, small_grid


if jax.device_count() < 8:
    pytest.skip(
        "needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
        allow_module_level=True,
    )


def _ds(key, nx):
    grid = diffusion_sorption.make_grid(nt=7, nx=nx)
    mesh = grid.mesh()
    t, x = jnp.asarray(mesh["t"]) / diffusion_sorption.T_FINAL, jnp.asarray(mesh["x"])
    smooth = [jnp.exp(-x / (0.1 + 0.3 * t)), 1.0 - x, t * x]
    basis = jnp.stack(smooth + [0.2 * jr.normal(key, grid.shape)], axis=-1)
    return grid, diffusion_sorption.DiffusionSorption(), {"u0": jnp.full((nx,), 0.3)}, basis


@pytest.mark.parametrize(
    "num_experts, devices",
    [
        (6, 4),
        pytest.param(8, 8, marks=pytest.mark.slow),
        pytest.param(5, 2, marks=pytest.mark.slow),
    ],
    ids=["K6-D4", "K8-D8", "K5-D2"],
)
def test_sharded_coupled_equals_unsharded(num_experts, devices):
    grid, pde, data, basis = _ds(jr.key(0), nx=6 * num_experts)
    partition = hcmoe.Partition(x=num_experts, overlap=0.3 / num_experts)
    readout = jr.normal(jr.key(1), grid.shape)
    options = dict(key=jr.key(2), rows=hcmoe.Rows(points_per_expert=30), throw=False)

    def run(mesh):
        def loss(b):
            sol = hcmoe.solve(
                b, pde, partition, grid, data, coupling=hcmoe.Coupled(mesh=mesh), **options
            )
            return jnp.sum(sol.u * readout) + jnp.sum(sol.weights**2), sol

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(basis)

    (_, ref), ref_grad = run(None)
    (_, sol), grad = run(hcmoe.expert_mesh(devices))
    assert np.all(ref.stats.converged) and np.all(sol.stats.converged)
    for a, b in ((sol.weights, ref.weights), (sol.u, ref.u), (grad, ref_grad)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-8 * float(np.max(np.abs(b))))
    assert np.array_equal(np.asarray(sol.stats.num_steps), np.asarray(ref.stats.num_steps))


def _lapack_batches(text: str, routine: str) -> set[tuple[int, ...]]:
    found = re.findall(rf"= \(?f64\[([\d,]+)\][^\n]*custom_call_target=\"lapack_{routine}", text)
    return {tuple(int(d) for d in dims.split(","))[:-2] for dims in found}


def test_coupled_rows_are_split_over_the_devices():
    # Each device evaluates the Jacobians of its own experts' rows: the compiled program's
    # local Jacobian contraction runs on K / D experts per device.
    grid, pde, data, basis = _ds(jr.key(0), nx=48)
    partition = hcmoe.Partition(x=8, overlap=0.3 / 8)

    def fn(mesh):
        coupling = hcmoe.Coupled(mesh=mesh)
        return lambda b: hcmoe.solve(b, pde, partition, grid, data, coupling=coupling).u

    text = jax.jit(fn(hcmoe.expert_mesh(4))).lower(basis).compile().as_text()
    unsharded = jax.jit(fn(None)).lower(basis).compile().as_text()
    # the Gram contraction "kri,krj->kij": batch K on one device, K / D per device
    gram = r"f64\[(\d+),(\d+),(\d+)\]\{[^}]*\} dot\("
    sizes = {int(m[0]) for m in re.findall(gram, text) if m[1] == m[2]}
    sizes_one = {int(m[0]) for m in re.findall(gram, unsharded) if m[1] == m[2]}
    assert 8 in sizes_one and 2 in sizes and 8 not in sizes, (sizes, sizes_one)


def test_independent_adjoint_is_split_over_the_devices():
    # K = 6 on 4 devices: the implicit adjoint's LU factorises 2 experts per device (padded
    # to 8), as the forward's Cholesky does, instead of all 6 on every device.
    grid = small_grid()
    basis = basis_with_exact(grid, jr.key(0)) + 0.05 * jr.normal(jr.key(1), grid.shape + (5,))
    partition = hcmoe.Partition(x=6)

    def grad(mesh):
        def loss(b):
            coupling = hcmoe.Independent(mesh=mesh)
            sol = hcmoe.solve(
                b, ForcedBurgers(), partition, grid, data_for(grid), coupling=coupling
            )
            return jnp.sum(sol.u**2)

        return jax.grad(loss)

    one = jax.jit(grad(None)).lower(basis).compile().as_text()
    sharded = jax.jit(grad(hcmoe.expert_mesh(4))).lower(basis).compile().as_text()
    assert _lapack_batches(one, "dgetrf") == {(6,)}
    assert _lapack_batches(sharded, "dgetrf") == {(2,)}
    assert _lapack_batches(sharded, "dpotrf") == {(2,)}
    a = jax.jit(grad(None))(basis)
    b = jax.jit(grad(hcmoe.expert_mesh(4)))(basis)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-9, atol=1e-12)
