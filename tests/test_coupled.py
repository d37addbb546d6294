"""`hcmoe.Coupled`: the dense joint's optimum from per-expert blocks (issue 31).

The dense `Joint` solve is the oracle: with every grid point as a row the two are the same
problem, so weights, `u` and gradients must agree to solver tolerance. The sharded cases run
in a subprocess on 8 fake devices (`tests/coupled_sharded_cases.py`).
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import hcmoe
from hcmoe import _coupled
from hcmoe.problems import diffusion_sorption, navier_stokes

from .helpers import (
    ForcedBurgers,
    ForcedHeat,
    basis_with_exact,
    check_blended_solve,
    data_for,
    finite_difference_jvp,
    small_grid,
)


ROOT = Path(__file__).resolve().parent.parent
# Tight tolerances: both solves stop at the minimiser (the objective test at 1e-12).
TIGHT = dict(
    solver=hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12),
    max_steps=60,
    rows=hcmoe.Rows(ridge=1e-2),
    throw=False,
)


def _ds_case(key, nt=7, nx=24, n=4):
    grid = diffusion_sorption.make_grid(nt=nt, nx=nx)
    mesh = grid.mesh()
    t, x = jnp.asarray(mesh["t"]) / diffusion_sorption.T_FINAL, jnp.asarray(mesh["x"])
    smooth = [jnp.exp(-x / (0.1 + 0.3 * t)), 1.0 - x, t * x]
    noise = [0.05 * jr.normal(k, grid.shape) for k in jr.split(key, n - len(smooth))]
    basis = jnp.stack(smooth + noise, axis=-1)
    return grid, diffusion_sorption.DiffusionSorption(), {"u0": jnp.full((nx,), 0.3)}, basis


def _ns_case(key, nt=4, n=8, n_basis=4):
    grid = navier_stokes.make_grid(nt=nt, n=n)
    w0 = navier_stokes.sample_initial_conditions(jr.key(1), 1, grid)[0]
    basis = 0.3 * jr.normal(key, grid.shape + (n_basis,))
    return grid, navier_stokes.NavierStokes(), {"w0": w0}, basis


def _assert_same(coupled, joint, grad_c=None, grad_j=None, rel=1e-7):
    scale = float(np.max(np.abs(joint.weights)))
    np.testing.assert_allclose(coupled.weights, joint.weights, rtol=0, atol=rel * scale)
    np.testing.assert_allclose(
        coupled.u, joint.u, rtol=0, atol=rel * float(np.max(np.abs(joint.u)))
    )
    if grad_c is not None:
        np.testing.assert_allclose(grad_c, grad_j, rtol=0, atol=rel * float(np.max(np.abs(grad_j))))


def _solve_and_grad(basis, pde, partition, grid, data, coupling, **options):
    readout = jr.normal(jr.key(3), grid.shape)

    def loss(b):
        sol = hcmoe.solve(b, pde, partition, grid, data, coupling=coupling, **options)
        return jnp.sum(sol.u * readout), sol

    (_, sol), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(basis)
    return sol, grad


@pytest.mark.parametrize(
    "partition, inner",
    [
        (hcmoe.Partition(x=4, overlap=0.2), "cg"),
        (hcmoe.Partition(x=4, overlap=0.2), "direct"),
        (hcmoe.Partition(x=3), "cg"),
    ],
    ids=["blended-K4-cg", "blended-K4-direct", "blocks-K3-cg"],
)
def test_coupled_equals_dense_joint_on_diffusion_sorption(getkey, partition, inner):
    grid, pde, data, basis = _ds_case(getkey())
    coupling = hcmoe.Coupled(inner=inner)
    joint, grad_j = _solve_and_grad(basis, pde, partition, grid, data, "joint", **TIGHT)
    coupled, grad_c = _solve_and_grad(basis, pde, partition, grid, data, coupling, **TIGHT)
    _assert_same(coupled, joint, grad_c, grad_j)
    k = partition.num_experts(grid)
    assert coupled.weights.shape == (k, basis.shape[-1])
    assert coupled.stats.num_steps.shape == (k,)
    assert coupled.stats.inner_steps is not None
    assert (int(coupled.stats.inner_steps[0]) > 0) == (inner == "cg")
    assert float(coupled.stats.coupling_residual[0]) < 1e-6
    # Every point of the joint problem is a row of exactly one expert.
    points, joint_points = np.asarray(coupled.stats.points), np.asarray(joint.stats.points)
    assert np.array_equal(np.sort(points[points >= 0]), np.sort(joint_points[joint_points >= 0]))


def test_coupled_equals_dense_joint_on_a_user_pde_with_condition_rows(getkey):
    # ForcedBurgers: Dirichlet and Neumann rows on the split axis' faces, owned by the end
    # experts; the condition rows' balance pooled over all experts as in the joint problem.
    grid = small_grid(nt=9, nx=16)
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    partition = hcmoe.Partition(x=4, overlap=0.25)
    data = data_for(grid)
    joint, grad_j = _solve_and_grad(basis, ForcedBurgers(), partition, grid, data, "joint", **TIGHT)
    coupled, grad_c = _solve_and_grad(
        basis, ForcedBurgers(), partition, grid, data, hcmoe.Coupled(inner="cg"), **TIGHT
    )
    _assert_same(coupled, joint, grad_c, grad_j)


def test_coupled_equals_dense_joint_on_a_linear_pde(getkey):
    grid = small_grid(nt=9, nx=16)
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    partition = hcmoe.Partition(x=4, overlap=0.25)
    joint, grad_j = _solve_and_grad(basis, ForcedHeat(), partition, grid, data_for(grid), "joint")
    coupled, grad_c = _solve_and_grad(
        basis, ForcedHeat(), partition, grid, data_for(grid), "coupled"
    )
    _assert_same(coupled, joint, grad_c, grad_j, rel=1e-6)


def test_coupled_equals_dense_joint_on_navier_stokes_global_operators(getkey):
    # Spectral velocity and a transform_basis of its own: every expert sees every other
    # (the general path: the windowed basis, as the dense joint builds it).
    grid, pde, data, basis = _ns_case(getkey())
    partition = hcmoe.Partition(x=2, y=2, overlap=0.25)
    joint, grad_j = _solve_and_grad(basis, pde, partition, grid, data, "joint", **TIGHT)
    coupled, grad_c = _solve_and_grad(basis, pde, partition, grid, data, "coupled", **TIGHT)
    _assert_same(coupled, joint, grad_c, grad_j)
    index, _ = _coupled.neighbours(partition, grid, dict.fromkeys(grid.names, np.inf))
    assert index.shape == (4, 4)


def test_stencil_path_equals_windowed_path_with_sampled_points(getkey, monkeypatch):
    # Sampled rows (not the joint's): the stencil path (T(B) times the windows at each
    # stencil's points) against the general path on the same rows.
    grid, pde, data, basis = _ds_case(getkey(), nt=9, nx=40)
    partition = hcmoe.Partition(x=5, overlap=0.1)
    options = dict(TIGHT, key=getkey(), rows=hcmoe.Rows(points_per_expert=30, ridge=1e-2))
    fast, grad_f = _solve_and_grad(basis, pde, partition, grid, data, hcmoe.Coupled(), **options)
    monkeypatch.setattr(_coupled, "_commutes", lambda *args: False)
    general, grad_g = _solve_and_grad(basis, pde, partition, grid, data, hcmoe.Coupled(), **options)
    _assert_same(fast, general, grad_f, grad_g, rel=1e-8)
    assert np.array_equal(fast.stats.points, general.stats.points)
    assert fast.stats.points.shape == (5, 30)


def test_coupled_recovers_the_exact_solution_and_its_gradient_matches_finite_differences(
    getkey,
):
    check_blended_solve(getkey, hcmoe.Partition(x=3, overlap=0.2), coupling=hcmoe.Coupled())


def test_coupled_gradient_through_data_matches_finite_differences(getkey):
    # Through the initial condition: the particular part, the condition rows' targets and
    # (by the implicit function theorem) the weights.
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    partition = hcmoe.Partition(x=3, overlap=0.2)
    options = dict(
        solver=hcmoe.LevenbergMarquardt(rtol=1e-13, atol=1e-13),
        max_steps=200,
        rows=hcmoe.Rows(ridge=1e-2),
        coupling="coupled",
    )
    readout = jr.normal(getkey(), grid.shape)

    def loss(u0):
        return jnp.sum(
            hcmoe.solve(basis, ForcedBurgers(), partition, grid, {"u0": u0}, **options).u * readout
        )

    u0 = data_for(grid)["u0"]
    direction = jr.normal(getkey(), u0.shape)
    grad = jax.grad(loss)(u0)
    fd = finite_difference_jvp(loss, u0, direction, eps=1e-5)
    assert float(jnp.sum(grad * direction)) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)


def test_two_level_preconditioner_keeps_iterations_low_as_experts_grow(getkey):
    # The same Gauss–Newton system at K = 4, 8, 16 on one grid: block Jacobi alone needs
    # many more iterations as K grows; the coarse space holds the growth down.
    grid = diffusion_sorption.make_grid(nt=9, nx=128)
    mesh = grid.mesh()
    t, x = jnp.asarray(mesh["t"]) / diffusion_sorption.T_FINAL, jnp.asarray(mesh["x"])
    basis = jnp.stack([jnp.cos(np.pi * k * x) * (1 + t * j) for k in range(4) for j in (0, 1)], -1)
    pde, data = diffusion_sorption.DiffusionSorption(), {"u0": jnp.full((128,), 0.2)}
    counts = {}
    for k in (4, 8, 16):
        structure, _, _ = _coupled.build_coupled(
            basis,
            pde,
            hcmoe.Partition(x=k, overlap=0.5 / k),
            grid,
            data,
            key=None,
            rows=hcmoe.Rows(),
            total_experts=k,
            coarse=max(1, -(-k // 4)),
        )
        w = jnp.ones((k, basis.shape[-1]))
        jac = structure.jacobians(w, pde, data)
        gram = jnp.einsum("kri,krj->kij", jac, jac)
        op = _coupled.BlockOperator(gram, jnp.full((k,), 1e-4), structure)  # damped
        b = jr.normal(getkey(), w.shape)
        for kind in ("block-jacobi", "two-level"):
            pre = _coupled.Preconditioner.of(op, basis.shape[-1], kind)
            x, steps, rel = _coupled.pcg(op.mv, b, pre.apply, rtol=1e-10, max_steps=2000)
            # the rounding floor of this system (condition number about 1e9) is near 1e-7
            assert float(rel) < 1e-6, (kind, k, int(steps), float(rel))
            dense = _dense(op, k, basis.shape[-1])
            np.testing.assert_allclose(
                np.asarray(x).reshape(-1),
                np.linalg.solve(dense, np.asarray(b).reshape(-1)),
                rtol=1e-5,
                atol=1e-6 * float(np.max(np.abs(x))),
            )
            counts[kind, k] = int(steps)
    assert counts["two-level", 16] < counts["block-jacobi", 16]
    assert counts["two-level", 16] <= 3 * counts["two-level", 4], counts
    grow = {kind: counts[kind, 16] / counts[kind, 4] for kind in ("block-jacobi", "two-level")}
    assert grow["two-level"] < grow["block-jacobi"], counts


def _dense(op, k, n):
    eye = jnp.eye(k * n).reshape(k * n, k, n)
    return np.asarray(jax.vmap(op.mv)(eye).reshape(k * n, k * n))


def test_coupled_options_and_errors():
    assert hcmoe.Coupled().label == "coupled"
    for kwargs, match in [
        (dict(preconditioner="ilu"), "preconditioner: expected one of"),
        (dict(rtol=0.0), "rtol: expected a number in"),
        (dict(inner_max_steps=0), "inner_max_steps: expected a positive int"),
        (dict(coarse_modes=0), "coarse_modes: expected a positive int or None"),
        (dict(inner="lu"), "inner: expected one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            hcmoe.Coupled(**kwargs)
    grid, pde, data, basis = _ds_case(jr.key(0))
    import optimistix as optx

    with pytest.raises(ValueError, match="solver: hcmoe.Coupled .* needs hcmoe.LevenbergMarquardt"):
        hcmoe.solve(
            basis,
            pde,
            hcmoe.Partition(x=2),
            grid,
            data,
            coupling="coupled",
            solver=optx.LevenbergMarquardt(rtol=1e-4, atol=1e-4),
        )
    with pytest.raises(ValueError, match="adjoint: hcmoe.Coupled differentiates"):
        hcmoe.solve(
            basis,
            pde,
            hcmoe.Partition(x=2),
            grid,
            data,
            coupling="coupled",
            adjoint=optx.ImplicitAdjoint(),
        )


@pytest.mark.parametrize(
    "markers", ["not slow", pytest.param("slow", marks=pytest.mark.slow)], ids=["default", "slow"]
)
def test_coupled_sharded_cases_on_eight_devices(markers):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "-m", markers]
    cmd += [str(ROOT / "tests" / "coupled_sharded_cases.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "passed" in proc.stdout and "skipped" not in proc.stdout


def test_coupling_string_and_method_name(getkey):
    grid, pde, data, basis = _ds_case(getkey())
    sol = hcmoe.solve(basis, pde, hcmoe.Partition(x=2), grid, data, coupling="coupled")
    assert bool(jnp.all(sol.stats.converged))
    replaced = dataclasses.replace(hcmoe.Coupled(), preconditioner="block-jacobi")
    assert replaced.preconditioner == "block-jacobi"


@pytest.mark.slow  # 40-80 s: opt-in (`pytest -m slow`), the default suite keeps its budget
@pytest.mark.multiprocess
def test_coupled_two_processes_equal_one(tmp_path):
    # 2 processes x 2 fake CPU devices on loopback, K = 3 padded to 4 over both processes.
    from . import coupled_multiprocess_worker as worker
    from .test_sharding import _env, _free_port, _report, _stop

    num_processes, out, port = 2, tmp_path / "results.npz", _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.coupled_multiprocess_worker", str(i), "2", str(port)]
            + [str(out)],
            cwd=ROOT,
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    try:
        expected = worker.results(None)  # one process, while they run
        logs = [proc.communicate(timeout=300)[0] for proc in procs]
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the processes ran past {e.timeout} s:\n" + "\n".join(_stop(procs)))
    finally:
        _stop(procs)
    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, _report(f"process {i}", proc, log)
    got = dict(np.load(out))
    assert got.keys() == expected.keys()
    for name in expected:
        scale = float(np.max(np.abs(expected[name])))
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-9 * scale)


@pytest.mark.slow  # about 2 minutes: four couplings compiled at two K
def test_coupling_benchmark_smoke_run(tmp_path):
    import json

    command = [sys.executable, str(ROOT / "benchmarks" / "coupling.py"), "--smoke", "--no-plot"]
    done = subprocess.run(
        command + ["--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "coupling_smoke.json").read_text())
    for row in result["rows"]:
        info = row["couplings"]
        assert set(info) == {"independent", "joint", "coupled", "coupled_cg"}
        joint = info["joint"]["physics_loss"]
        for name in ("coupled", "coupled_cg"):
            assert info[name]["physics_loss"] == pytest.approx(joint, rel=0.05)
