"""The 0.2 entry point: option objects, couplings as types, RESULTS, the recommended defaults,
and the checks that turn a new user's silent failures into clear errors (issues 34 and 35)."""

import inspect
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import hcmoe
from hcmoe import ops
from hcmoe.problems import diffusion_sorption as ds

from .helpers import ForcedBurgers, basis_with_exact, data_for, small_grid


ROOT = Path(__file__).resolve().parent.parent


def test_solve_has_at_most_14_parameters_each_documented():
    parameters = inspect.signature(hcmoe.solve).parameters
    assert len(parameters) <= 14
    doc = hcmoe.solve.__doc__
    for name in parameters:
        assert f"`{name}`" in doc, name


@pytest.mark.ill_typed  # e.g. points_per_expert=2.5: hcmoe's own ValueError
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(points_per_expert=0), "points_per_expert: expected a positive int"),
        (dict(points_per_expert=2.5), "points_per_expert: expected a positive int"),
        (dict(ridge=-1.0), "ridge: expected a non-negative number"),
        (dict(ridge_toward="one"), "ridge_toward: expected one of"),
        (dict(balance="median"), "balance: expected one of"),
        (dict(condition_scope="mine"), "condition_scope: expected None, 'owned' or 'global'"),
    ],
)
def test_rows_validated_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hcmoe.Rows(**kwargs)


@pytest.mark.ill_typed  # e.g. coupling=1: hcmoe's own ValueError
def test_couplings_and_solver_options_validated():
    with pytest.raises(ValueError, match="schedule: expected one of"):
        hcmoe.Independent(schedule="parallel")
    with pytest.raises(ValueError, match="coupling: expected hcmoe.Independent"):
        hcmoe.solve(jnp.ones((3, 4, 2)), ForcedBurgers(), None, small_grid(3, 4), coupling=1)
    with pytest.raises(ValueError, match="termination: expected one of"):
        hcmoe.LevenbergMarquardt(termination="never")
    with pytest.raises(ValueError, match="rtol: expected a non-negative number"):
        hcmoe.LevenbergMarquardt(rtol=-1.0)
    with pytest.raises(ValueError, match="initial_damping: .* applies to the default search"):
        hcmoe.LevenbergMarquardt(initial_damping=1.0, search=hcmoe.TrustRegion())


def test_old_option_names_say_where_they_went():
    backbone = eqx.nn.Linear(3, 4, key=jr.key(0))
    for name, home in [
        ("points_per_expert", "rows=hcmoe.Rows"),
        ("rtol", "solver="),
        ("schedule", "coupling=hcmoe.Independent"),
        ("warm_start", "WarmStart"),
    ]:
        with pytest.raises(ValueError, match=f"option '{name}' moved in hcmoe 0.2.*{home}"):
            hcmoe.constrain(backbone, ForcedBurgers(), None, grid=small_grid(), **{name: 1})


def test_string_couplings_are_the_default_objects(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey())
    args = (basis, ForcedBurgers(), hcmoe.Partition(x=2), grid, data_for(grid))
    for name, coupling in [("independent", hcmoe.Independent()), ("joint", hcmoe.Joint())]:
        by_name = hcmoe.solve(*args, coupling=name)
        by_object = hcmoe.solve(*args, coupling=coupling)
        assert bool(jnp.all(by_name.u == by_object.u))


def test_results_say_why_an_expert_did_not_converge(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) + 0.2 * jr.normal(getkey(), grid.shape + (5,))
    solver = hcmoe.LevenbergMarquardt(rtol=1e-14, atol=1e-14)
    sol = hcmoe.solve(
        basis,
        ForcedBurgers(),
        hcmoe.Partition(x=2),
        grid,
        data_for(grid),
        solver=solver,
        max_steps=1,
    )
    assert not bool(jnp.any(sol.stats.converged))
    messages = sol.stats.messages()
    assert messages.shape == (2,)
    assert all("maximum number of steps" in m for m in messages)
    assert bool(jnp.all(sol.stats.result == hcmoe.RESULTS.nonlinear_max_steps_reached))
    good = hcmoe.solve(basis, ForcedBurgers(), hcmoe.Partition(x=2), grid, data_for(grid))
    assert bool(jnp.all(good.stats.converged))
    assert list(good.stats.messages()) == ["", ""]


def test_warm_start_reaches_the_cold_start_minimiser(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey())
    tight = hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12)
    args = (basis, ForcedBurgers(), hcmoe.Partition(x=2), grid, data_for(grid))
    cold = hcmoe.solve(*args, solver=tight, max_steps=100, rows=hcmoe.Rows(ridge=0.0))
    warm = hcmoe.solve(
        *args, solver=hcmoe.WarmStart(tight), max_steps=100, rows=hcmoe.Rows(ridge=0.0)
    )
    assert bool(jnp.all(warm.stats.converged))
    assert float(jnp.max(jnp.abs(warm.u - cold.u))) < 1e-8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diffusion_sorption_default_meets_its_initial_condition_exactly(seed):
    assert ds.DiffusionSorption() == ds.formulation("hcmoe")
    grid = ds.make_grid(nt=11, nx=32)
    basis = jr.normal(jr.key(seed), grid.shape + (16,))
    u0 = jnp.full((32,), 0.1)
    sol = hcmoe.solve(basis, ds.DiffusionSorption(), hcmoe.Partition(t=1, x=4), grid, {"u0": u0})
    assert float(jnp.max(jnp.abs(sol.u[0] - u0))) < 1e-12


class _ViscousBurgers(hcmoe.AbstractPDE):
    """Burgers with a viscosity field `nu(t, x)` in the data (a held-out user's PDE)."""

    def operators(self):
        return {
            "u": ops.Identity(),
            "u_t": ops.FiniteDifference("t"),
            "u_x": ops.FiniteDifference("x"),
            "u_xx": ops.FiniteDifference("x", order=2),
        }

    def residual(self, v, coords, data):
        return v["u_t"] + v["u"] * v["u_x"] - data["nu"] * v["u_xx"]

    def conditions(self, grid, data):
        return [hcmoe.initial(data["u0"], exact=True)]


def _burgers_case(nt=12, nx=48):
    grid = hcmoe.uniform_grid(t=(0.0, 1.0, nt), x=(-1.0, 1.0, nx))
    basis = 0.1 * jr.normal(jr.key(3), grid.shape + (6,))
    return grid, basis, -jnp.sin(jnp.pi * grid.coords("x"))


@pytest.mark.parametrize("bad", ["x-only", "t-only", "first-row"])
@pytest.mark.parametrize("points", [None, 48])
def test_data_field_over_some_axes_is_a_clear_error(bad, points):
    # With 48 points per expert and nx = 48 the (nx,) field used to broadcast silently.
    grid, basis, u0 = _burgers_case()
    nu = jnp.full(grid.shape, 0.01)
    value = {"x-only": nu[0], "t-only": nu[:, 0], "first-row": nu[0]}[bad]
    axes = "'t'" if bad == "t-only" else "'x'"
    with pytest.raises(ValueError, match=rf"data\['nu'\].*residual reads it.*\[{axes}\]"):
        hcmoe.solve(
            basis,
            _ViscousBurgers(),
            hcmoe.Partition(x=2),
            grid,
            {"u0": u0, "nu": value},
            key=jr.key(0),
            rows=hcmoe.Rows(points_per_expert=points),
        )


def test_grid_and_scalar_data_fields_still_solve():
    grid, basis, u0 = _burgers_case()
    field = hcmoe.solve(
        basis,
        _ViscousBurgers(),
        hcmoe.Partition(x=2),
        grid,
        {"u0": u0, "nu": jnp.full(grid.shape, 0.01)},
    )
    scalar = hcmoe.solve(
        basis, _ViscousBurgers(), hcmoe.Partition(x=2), grid, {"u0": u0, "nu": 0.01}
    )
    assert bool(jnp.all(field.stats.converged))
    assert float(jnp.max(jnp.abs(field.u - scalar.u))) < 1e-12


def test_residual_indexing_point_data_as_a_grid_says_why():
    class OldStyle(_ViscousBurgers):
        def residual(self, v, coords, data):
            return v["u_t"] - data["nu"][:, 0] * v["u_xx"]

    grid, basis, u0 = _burgers_case()
    with pytest.raises(IndexError) as info:
        hcmoe.solve(basis, OldStyle(), None, grid, {"u0": u0, "nu": jnp.full(grid.shape, 0.01)})
    assert "gathered at the sampled points" in "\n".join(getattr(info.value, "__notes__", []))


def test_non_finite_data_is_an_error():
    grid, basis, u0 = _burgers_case()
    nu = jnp.full(grid.shape, 0.01).at[3, 5].set(jnp.nan)
    with pytest.raises(Exception, match=r"data\['nu'\] contains NaN or inf"):
        sol = hcmoe.solve(
            basis, _ViscousBurgers(), hcmoe.Partition(x=2), grid, {"u0": u0, "nu": nu}
        )
        jax.block_until_ready(sol.u)


def test_float32_fallback_warns_once():
    from hcmoe import _solve

    grid = small_grid()
    basis = np.asarray(basis_with_exact(grid, jr.key(0)), np.float32)
    _solve._WARNED_FLOAT32.clear()
    jax.config.update("jax_enable_x64", False)
    try:
        data = {"u0": jnp.asarray(np.asarray(data_for(grid)["u0"]), jnp.float32)}
        with pytest.warns(hcmoe.PrecisionWarning, match="64-bit JAX is off"):
            hcmoe.solve(jnp.asarray(basis), ForcedBurgers(), None, grid, data)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hcmoe.solve(jnp.asarray(basis), ForcedBurgers(), None, grid, data)  # once only
            hcmoe.solve(
                jnp.asarray(basis), ForcedBurgers(), None, grid, data, precision="float32"
            )  # chosen: no warning
    finally:
        jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("side", ["right", "left", 1.5, None])
def test_unknown_face_names_are_errors(side):
    for make in (
        lambda: hcmoe.dirichlet("x", side, 0.0),
        lambda: hcmoe.neumann("x", side, 0.0),
        lambda: hcmoe.robin("x", side, 1.0, 1.0, 0.0),
    ):
        with pytest.raises(ValueError, match="side: expected 'low', 'high' or an int index"):
            make()
    assert hcmoe.dirichlet("x", "high", 0.0).index == -1
    assert hcmoe.dirichlet("x", 2, 0.0).index == 2


_JOINT_BATCH_MESH = textwrap.dedent("""
    import jax, jax.numpy as jnp, jax.random as jr, numpy as np
    jax.config.update("jax_enable_x64", True)
    import hcmoe
    from tests.helpers import ForcedBurgers, small_grid
    grid = small_grid()
    bases = 0.3 * jr.normal(jr.key(0), (4,) + grid.shape + (5,))
    data = {"u0": jnp.stack([jnp.sin(grid.coords("x")) * (1 + i) for i in range(4)])}
    backbone = lambda params, x: x
    outputs = {}
    for name, mesh in [("plain", hcmoe.expert_mesh(4, batch=4)),
                       ("make_mesh", jax.make_mesh((4, 1), ("batch", "experts")))]:
        model = hcmoe.constrain(backbone, ForcedBurgers(), hcmoe.Partition(x=2), grid=grid,
                                coupling=hcmoe.Joint(mesh=mesh))
        outputs[name] = model(None, bases, data)
    single = hcmoe.constrain(backbone, ForcedBurgers(), hcmoe.Partition(x=2), grid=grid,
                             coupling="joint")(None, bases, data)
    for name, sol in outputs.items():
        assert sol.u.shape == single.u.shape, name
        err = float(jnp.max(jnp.abs(sol.u - single.u)))
        assert err < 1e-10, (name, err)
    print("OK")
""")


def test_joint_coupling_splits_a_batch_over_a_batch_mesh():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _JOINT_BATCH_MESH],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


_SHARDED_SOLVE = textwrap.dedent("""
    import jax, jax.numpy as jnp, jax.random as jr
    jax.config.update("jax_enable_x64", True)
    import hcmoe
    from tests.helpers import ForcedBurgers, basis_with_exact, data_for, small_grid
    grid = small_grid()
    basis = basis_with_exact(grid, jr.key(0))
    coupling = hcmoe.Independent(mesh=hcmoe.expert_mesh(4))

    def loss(b):
        sol = hcmoe.solve(b, ForcedBurgers(), hcmoe.Partition(x=4), grid, data_for(grid),
                          coupling=coupling, throw=True)
        return jnp.sum(sol.u ** 2)

    print("OK", float(jax.jit(jax.grad(loss))(basis).sum()))
""")


def test_sharded_solve_compiles_without_rematerialization_warning():
    # The finiteness and convergence checks used to route the sharded weights through a
    # one-device conditional: XLA's "[SPMD] Involuntary full rematerialization" at every compile.
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SOLVE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
    assert "rematerialization" not in proc.stderr, proc.stderr[-4000:]


@pytest.mark.parametrize("layout", ["transposed", "flattened"])
def test_data_field_in_another_layout_is_a_clear_error(layout):
    grid, basis, u0 = _burgers_case()
    nu = jnp.full(grid.shape, 0.01)
    value = nu.T if layout == "transposed" else nu.reshape(-1)
    with pytest.raises(ValueError, match=r"data\['nu'\].*looks like a field on the grid"):
        hcmoe.solve(basis, _ViscousBurgers(), hcmoe.Partition(x=2), grid, {"u0": u0, "nu": value})


def test_parameter_vector_in_data_is_left_alone():
    class Weighted(_ViscousBurgers):
        def residual(self, v, coords, data):
            c = data["c"]  # three coefficients, not a field
            return c[0] * v["u_t"] + c[1] * v["u"] * v["u_x"] - c[2] * v["u_xx"]

    grid, basis, u0 = _burgers_case()
    sol = hcmoe.solve(
        basis, Weighted(), hcmoe.Partition(x=2), grid, {"u0": u0, "c": jnp.array([1.0, 1.0, 0.01])}
    )
    assert bool(jnp.all(sol.stats.converged))
