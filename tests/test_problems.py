"""The benchmark problems: exact solutions, convergence orders, residuals, samplers, datasets."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hcmoe._grid import Grid
from hcmoe.problems import diffusion_sorption as ds, heat, navier_stokes as ns


def pde_residual(pde, u, grid, data):
    """`pde.residual` on every grid point, with the operators applied to `u` on the grid."""
    values = {name: op(u, grid) for name, op in pde.operators().items()}
    return pde.residual(values, grid.mesh(), data)


def condition_residual(condition, u, grid):
    values = condition.operator(u, grid)
    face = jnp.take(values, condition.face_index(grid), axis=grid.axis(condition.axis))
    return face - condition.target_on_face(grid)


def rms(a):
    return float(jnp.sqrt(jnp.mean(jnp.square(a))))


def order_from_differences(d_coarse, d_fine):
    """Observed order from three resolutions at ratio 2: the two successive differences."""
    return float(np.log2(d_coarse / d_fine))


# ------------------------------------------------------------------------------------------
# Heat
# ------------------------------------------------------------------------------------------


def test_heat_reference_is_exact(getkey):
    grid = heat.grid("small")
    coefficients = heat.sample_coefficients(getkey(), 3, n_modes=5)
    u0 = heat.initial_condition(coefficients, grid)
    u = jax.jit(jax.vmap(lambda v: heat.reference_solution(v, grid, kappa=0.1)))(u0)
    exact = jax.vmap(lambda a: heat.Heat(kappa=0.1).exact_solution(grid, a))(coefficients)
    assert u.shape == (3, *grid.shape)
    np.testing.assert_allclose(u, exact, atol=1e-12)
    np.testing.assert_allclose(u[:, 0], u0, atol=1e-12)
    pde = heat.Heat(kappa=0.1)
    for condition in pde.conditions(grid, {"u0": u0[0]}):
        assert float(jnp.abs(condition_residual(condition, exact[0], grid)).max()) < 1e-12


def test_heat_residual_falls_under_refinement(getkey):
    pde = heat.Heat()
    coefficients = heat.sample_coefficients(getkey(), 1)[0]
    levels = []
    for nt, nx in ((17, 33), (33, 65), (65, 129)):
        grid = heat.make_grid(nt=nt, nx=nx)
        u = pde.exact_solution(grid, coefficients)
        levels.append(rms(pde_residual(pde, u, grid, {"u0": u[0]})))
    # Interior O(h^2); the one-sided u_xx at the two ends is O(h): O(h^1.5) in RMS.
    assert levels[0] / levels[1] > 2.5 and levels[1] / levels[2] > 2.5, levels
    assert levels[-1] < 1e-2


def test_heat_sampler_and_errors(getkey):
    grid = heat.grid("small")
    u0 = heat.sample_initial_conditions(getkey(), 4, grid)
    assert u0.shape == (4, 65)
    np.testing.assert_allclose(u0[:, [0, -1]], 0.0, atol=1e-14)
    with pytest.raises(ValueError, match=r"initial_condition: expected shape \(65,\)"):
        heat.reference_solution(u0, grid)
    with pytest.raises(ValueError, match="unknown constants \\['nu'\\]"):
        heat.reference_solution(u0[0], grid, nu=1.0)
    with pytest.raises(ValueError, match="grid: expected a Grid with axes"):
        heat.reference_solution(u0[0], Grid(x=grid.coords("x"), t=grid.coords("t")))
    with pytest.raises(ValueError, match="size: expected one of"):
        heat.grid("huge")


# ------------------------------------------------------------------------------------------
# Diffusion–sorption
# ------------------------------------------------------------------------------------------


def test_diffusion_sorption_time_order():
    grid = ds.make_grid(nt=6, nx=32)
    u = [ds.reference_solution(0.1, grid, max_dt=dt) for dt in (20.0, 10.0, 5.0)]
    d = [float(jnp.abs(a - b).max()) for a, b in zip(u, u[1:])]
    order = order_from_differences(*d)
    assert 1.6 < order < 2.4, (d, order)  # SDIRK2


def test_diffusion_sorption_space_order():
    def cell_average(u, factor):
        return u.reshape(u.shape[0], -1, factor).mean(-1)

    u = [ds.reference_solution(0.1, ds.make_grid(nt=6, nx=nx), max_dt=2.5) for nx in (32, 64, 128)]
    d = [float(jnp.abs(cell_average(fine, 2) - coarse).max()) for coarse, fine in zip(u, u[1:])]
    order = order_from_differences(*d)
    # PDEBench's ghost cells put the boundary values half a cell outside: first order overall.
    assert 0.8 < order < 1.2, (d, order)


def test_diffusion_sorption_mass_balance():
    pde = ds.DiffusionSorption()
    grid = ds.make_grid(nt=101, nx=64)
    dx = grid.spacing("x")
    u = ds.reference_solution(0.1, grid, max_dt=0.5)
    mass = jnp.sum(u + pde.sorbed(u), axis=1) * dx
    ghost_right = pde.D * (u[:, -2] - u[:, -1]) / dx
    net_flux = pde.D * (1.0 - u[:, 0]) / dx - pde.D * (u[:, -1] - ghost_right) / dx
    t = grid.coords("t")
    late = t >= 100.0  # away from the initial boundary layer, where the flux is ~ 1/sqrt(t)
    inflow = float(np.trapezoid(np.asarray(net_flux[late]), t[late]))
    gained = float(mass[-1] - mass[late][0])
    assert abs(gained - inflow) < 1e-3 * abs(inflow), (gained, inflow)
    assert gained > 0


def test_diffusion_sorption_boundaries_and_robustness():
    grid = ds.make_grid(nt=26, nx=64)
    levels = jnp.array([0.0, 1e-8, 0.1, 0.2])
    u = jax.jit(jax.vmap(lambda c: ds.reference_solution(c, grid)))(levels)
    assert bool(jnp.all(jnp.isfinite(u)))
    assert float(u.min()) > -1e-10 and float(u.max()) <= 1.0
    np.testing.assert_allclose(u[:, 0], jnp.broadcast_to(levels[:, None], (4, 64)))
    first_cell = u[:, :, 0]
    assert bool(jnp.all(jnp.diff(first_cell, axis=1) > 0)) and float(first_cell.min(1)[0]) >= 0
    assert float(first_cell[:, -1].min()) > 0.95  # approaches the inflow value 1
    assert bool(jnp.all(jnp.diff(u[:, -1], axis=1) < 0))  # profile decreases into the domain
    single = ds.reference_solution(0.1, grid)
    np.testing.assert_allclose(u[2], single, rtol=1e-9, atol=1e-12)
    # hcmoe 0.1's default formulation: IC rows, boundary weight 1
    pde = ds.DiffusionSorption(exact_initial=False, boundary_weight=1.0)
    initial, inflow, outflow = pde.conditions(grid, {"u0": single[0]})
    assert float(jnp.abs(condition_residual(initial, single, grid)).max()) == 0.0
    # Ghost-cell rows (the default): the finite-volume reference meets them to O(dx^2) for
    # t > t0, and they carry no weight on the IC's level, where u = c contradicts them.
    for cond in (inflow, outflow):
        weight = np.asarray(cond.weight_on_face(grid))
        assert weight[0] == 0.0 and np.all(weight[1:] == 1.0)
    assert float(jnp.abs(condition_residual(inflow, single, grid)[1:]).max()) < 1e-3
    late = grid.coords("t") >= 100
    assert float(jnp.abs(condition_residual(outflow, single, grid)[late]).max()) < grid.spacing("x")
    # "cell": u = 1 on the first centre, half a cell inside the ghost value 1: there the
    # residual is about one cell's difference u[0] - u[1], O(dx).
    _, inflow_cell, outflow_cell = ds.DiffusionSorption(
        exact_initial=False, boundary_weight=1.0, boundary="cell"
    ).conditions(grid, {"u0": single[0]})
    inflow_gap = -condition_residual(inflow_cell, single, grid)[late]
    np.testing.assert_allclose(inflow_gap, (single[:, 0] - single[:, 1])[late], rtol=0.2)
    outflow_residual = condition_residual(outflow_cell, single, grid)[late]
    assert float(jnp.abs(outflow_residual).max()) < grid.spacing("x")


def test_diffusion_sorption_newton_failure_is_reported():
    grid = ds.make_grid(nt=3, nx=16)
    with pytest.raises(Exception, match="did not converge"):
        jax.jit(lambda c: ds.reference_solution(c, grid, max_newton_steps=1))(0.1)
    u = ds.reference_solution(0.1, grid, max_newton_steps=1, throw=False)
    assert u.shape == grid.shape


def test_diffusion_sorption_residual_falls_under_refinement():
    pde = ds.DiffusionSorption()
    levels, medians = [], []
    for nt, nx in ((26, 64), (51, 128), (101, 256)):
        grid = ds.make_grid(nt=nt, nx=nx)
        u = ds.reference_solution(0.1, grid)
        residual = pde_residual(pde, u, grid, {"u0": u[0]})
        assert bool(jnp.all(jnp.isfinite(residual)))
        # The jump between the initial level and the inflow value 1 at (t=0, x=0) is not
        # resolvable by any grid; measure from t = 100 on.
        levels.append(rms(residual[grid.coords("t") >= 100]))
        medians.append(float(jnp.median(jnp.abs(residual))))
    assert levels[0] / levels[1] > 2 and levels[1] / levels[2] > 2, levels
    assert medians[0] / medians[1] > 3 and medians[1] / medians[2] > 3, medians
    assert levels[-1] < 1e-5  # u_t is O(1e-3) there


def test_diffusion_sorption_sampler_and_errors(getkey):
    grid = ds.grid("small")
    assert grid.shape == (26, 64)
    np.testing.assert_allclose(grid.coords("x")[:2], [0.5 / 64, 1.5 / 64])
    u0 = ds.sample_initial_conditions(getkey(), 500, grid)
    assert u0.shape == (500, 64)
    assert bool(jnp.all(u0 == u0[:, :1])) and float(u0.min()) >= 0 and float(u0.max()) < 0.2
    assert 0.08 < float(u0.mean()) < 0.12
    with pytest.raises(ValueError, match=r"initial_condition: expected shape \(64,\) or a scalar"):
        ds.reference_solution(u0[:, :3], grid)
    with pytest.raises(ValueError, match="max_dt: expected a positive number"):
        ds.reference_solution(0.1, grid, max_dt=0.0)
    uneven = Grid(t=np.array([0.0, 1.0, 3.0]), x=grid.coords("x"))
    with pytest.raises(ValueError, match="grid axis 't' must be uniform"):
        ds.reference_solution(0.1, uneven)
    with pytest.raises(ValueError, match="data: DiffusionSorption needs data\\['u0'\\]"):
        ds.DiffusionSorption().conditions(grid, {})


# ------------------------------------------------------------------------------------------
# Navier–Stokes
# ------------------------------------------------------------------------------------------


def _mesh(grid):
    return np.meshgrid(grid.coords("x"), grid.coords("y"), indexing="ij")


@pytest.mark.parametrize("refine", [1, 2])
def test_navier_stokes_taylor_green(refine):
    nu = 1e-2
    grid = ns.make_grid(nt=5, n=16, t_final=1.0)
    x, y = _mesh(grid)
    two_pi = 2 * np.pi
    # Modes of one shell |k|^2 = 2 (2 pi)^2: w is proportional to the stream function, so the
    # advection vanishes and every mode decays at nu |k|^2.
    w0 = (
        np.sin(two_pi * x) * np.sin(two_pi * y)
        + 0.5 * np.cos(two_pi * (x + y))
        + 0.3 * np.sin(two_pi * (x - y))
    )
    w = ns.reference_solution(w0, grid, nu=nu, refine=refine)
    t = grid.coords("t")[:, None, None]
    exact = w0 * np.exp(-nu * 2 * two_pi**2 * t)
    np.testing.assert_allclose(w, exact, atol=1e-7)


def test_navier_stokes_conserves_mean(getkey):
    grid = ns.make_grid(nt=4, n=32, t_final=1.0)
    w0 = ns.sample_initial_conditions(getkey(), 1, grid)[0] + 0.3
    w = ns.reference_solution(w0, grid, max_dt=0.01)
    np.testing.assert_allclose(w.mean(axis=(1, 2)), 0.3, atol=1e-12)
    assert float(jnp.abs(w[-1] - w0).max()) > 0.1  # it did evolve


def test_navier_stokes_time_order(getkey):
    grid = ns.make_grid(nt=3, n=32, t_final=1.0)
    w0 = ns.sample_initial_conditions(getkey(), 1, grid)[0]
    w = [ns.reference_solution(w0, grid, max_dt=dt) for dt in (0.1, 0.05, 0.025)]
    d = [float(jnp.abs(a - b).max()) for a, b in zip(w, w[1:])]
    order = order_from_differences(*d)
    assert 1.7 < order < 2.3, (d, order)  # Crank–Nicolson / Heun


def test_navier_stokes_space_is_spectral(getkey):
    grid = ns.make_grid(nt=3, n=16, t_final=1.0)
    w0 = ns.sample_initial_conditions(getkey(), 1, grid)[0]
    w = [ns.reference_solution(w0, grid, max_dt=0.01, refine=r) for r in (2, 4, 8)]
    np.testing.assert_allclose(w[0][0], w0, atol=1e-13)
    d = [float(jnp.abs(a - b).max()) for a, b in zip(w, w[1:])]
    order = order_from_differences(*d)
    assert order > 4, (d, order)  # faster than any fixed order


def test_navier_stokes_residual_falls_under_refinement(getkey):
    pde = ns.NavierStokes()
    key = getkey()
    levels = []
    for nt, n in ((9, 16), (17, 32), (33, 64)):
        grid = ns.make_grid(nt=nt, n=n, t_final=1.0)
        w0 = ns.sample_initial_conditions(key, 1, grid)[0]
        w = ns.reference_solution(w0, grid, max_dt=5e-3)
        levels.append(rms(pde_residual(pde, w, grid, {"w0": w0})))
    assert levels[0] / levels[1] > 3 and levels[1] / levels[2] > 3, levels
    assert levels[-1] < 5e-3  # |w_t| is O(0.5); at 64^2 x 33 levels the FD in t dominates


def test_navier_stokes_ansatz(getkey):
    pde = ns.NavierStokes()
    grid = ns.make_grid(nt=5, n=8)
    w0 = ns.sample_initial_conditions(getkey(), 1, grid)[0]
    basis = jax.random.normal(getkey(), (*grid.shape, 3))
    transformed = pde.transform_basis(basis, grid, {"w0": w0})
    assert transformed.shape == basis.shape
    np.testing.assert_allclose(transformed[0], 0.0)
    np.testing.assert_allclose(transformed.mean(axis=(1, 2)), 0.0, atol=1e-15)
    centred = basis[-1] - basis[-1].mean((0, 1), keepdims=True)
    np.testing.assert_allclose(transformed[-1], 0.005 * centred, rtol=1e-12)
    particular = pde.particular(grid, {"w0": w0})
    assert particular.shape == grid.shape
    np.testing.assert_allclose(particular[3], w0)
    assert pde.conditions(grid, {"w0": w0}) == ()
    with pytest.raises(ValueError, match=r"data\['w0'\]: expected shape \(8, 8\)"):
        pde.particular(grid, {"w0": w0[:4]})


def test_navier_stokes_sampler_and_errors(getkey):
    grid = ns.make_grid(nt=2, n=32)
    w0 = ns.sample_initial_conditions(getkey(), 256, grid)
    assert w0.shape == (256, 32, 32)
    np.testing.assert_allclose(w0.mean(axis=(1, 2)), 0.0, atol=1e-13)
    # Unit-variance kernel minus its mean mode: variance 1 - (e^{-a} I_0(a))^2, a = 1/0.8^2.
    assert 0.6 < float(w0.var()) < 0.9
    spectrum = jnp.abs(jnp.fft.fft2(w0)).mean(0)
    assert float(spectrum[8:25, :].max()) < 1e-2 * float(spectrum.max())  # smooth
    assert float(spectrum[12:21, 12:21].max()) < 1e-6 * float(spectrum.max())
    with pytest.raises(ValueError, match="expected periodic x and y"):
        ns.reference_solution(
            w0[0], Grid(t=grid.coords("t"), x=grid.coords("x"), y=grid.coords("y"))
        )
    with pytest.raises(ValueError, match="refine: expected a positive int"):
        ns.reference_solution(w0[0], grid, refine=0)
    with pytest.raises(ValueError, match=r"initial_condition: expected shape \(32, 32\)"):
        ns.reference_solution(w0[0, :4], grid)
    assert ns.grid("paper", "train").shape == (64, 64, 64)
    assert ns.grid("paper", "test").shape == (64, 256, 256)
    assert ns.grid("small").shape == (16, 32, 32)


# ------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------


def test_diffusion_sorption_dataset_is_cached(tmp_path):
    kwargs = dict(cache_dir=tmp_path, progress=False)
    train = ds.make_dataset("train", 3, "small", **kwargs)
    assert train["u0"].shape == (3, 64) and train["u"].shape == (3, 26, 64)
    assert train["u"].dtype == np.float32
    archive = tmp_path / "diffusion_sorption-small-train.npz"
    stamp = archive.stat().st_mtime_ns
    again = ds.make_dataset("train", 3, "small", **kwargs)
    assert archive.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again["u"], train["u"])
    expected = ds.reference_solution(train["u0"][1].astype(np.float64), ds.grid("small"))
    np.testing.assert_allclose(train["u"][1], expected, rtol=1e-6, atol=1e-7)
    test = ds.make_dataset("test", 3, "small", **kwargs)
    assert not np.array_equal(test["u0"], train["u0"])
    rebuilt = ds.make_dataset("train", 3, "small", D=1e-3, **kwargs)
    assert archive.stat().st_mtime_ns != stamp
    assert not np.allclose(rebuilt["u"], train["u"])
    with pytest.raises(ValueError, match="split: expected one of"):
        ds.make_dataset("validation", 3, **kwargs)


def test_navier_stokes_and_heat_datasets(tmp_path):
    kwargs = dict(cache_dir=tmp_path, progress=False)
    flow = ns.make_dataset("test", 2, "small", max_dt=0.01, **kwargs)
    assert flow["w0"].shape == (2, 32, 32) and flow["w"].shape == (2, 16, 32, 32)
    np.testing.assert_array_equal(flow["w"][:, 0], flow["w0"])
    record = json.loads((tmp_path / "navier_stokes-small-test.json").read_text())
    # The small size's horizon is its own (not the paper's t = 5), in the grid and the cache.
    horizon = ns.SIZES["small"]["t_final"]
    assert ns.grid("small", "test").extent("t") == (0.0, horizon)
    assert record["params"]["t_final"] == horizon
    assert ns.grid("paper", "train").extent("t") == (0.0, ns.T_FINAL)
    warm = heat.make_dataset("train", 5, **kwargs)
    assert warm["u"].shape == (5, 33, 65) and warm["coefficients"].shape == (5, 4)
    np.testing.assert_allclose(warm["u"][:, 0], warm["u0"], atol=1e-6)
