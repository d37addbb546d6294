"""hcmoe's field-form implicit adjoint (`_adjoint`) against optimistix's and finite differences.

The default adjoint of a nonlinear solve is `_adjoint.implicit_solve`: the same implicit
function theorem as `optimistix.ImplicitAdjoint`, taken through the operators applied to each
expert's field instead of through the operator stacks. So the two must agree to rounding,
for every differentiable input (the basis, the data, PDE parameters, `init` when the ridge
pulls toward it), in forward and reverse mode, on every schedule and partition.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import hcmoe
from hcmoe.problems import diffusion_sorption as ds, navier_stokes as ns

from .helpers import (
    ForcedBurgers,
    basis_with_exact,
    data_for,
    finite_difference_jvp,
    small_grid,
)


OPTIMISTIX = optx.ImplicitAdjoint(lx.AutoLinearSolver(well_posed=None))  # the previous default
TIGHT = dict(solver=hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12), max_steps=200)


def _relative(a, b):
    return float(jnp.linalg.norm(jnp.ravel(a - b)) / jnp.linalg.norm(jnp.ravel(b)))


def _burgers_case(getkey, n_basis=4):
    grid = small_grid(nt=7, nx=9)
    basis = basis_with_exact(grid, getkey(), n_basis=n_basis)
    basis = basis + 0.1 * jr.normal(getkey(), basis.shape)
    return grid, basis, data_for(grid)


def _readout_loss(pde, partition, grid, data_fn, readout, **options):
    """`loss(basis, x)`: a fixed read-out of `u` plus the weights' squares (both outputs
    carry gradient), with `data_fn(x)` the data."""

    def loss(basis, x):
        sol = hcmoe.solve(basis, pde, partition, grid, data_fn(x), **options)
        return jnp.sum(sol.u * readout) + 0.1 * jnp.sum(sol.weights**2)

    return loss


@pytest.mark.parametrize(
    "blocks, schedule, ridge_toward",
    [
        (dict(), "auto", "zero"),
        # the map schedule is also the ridge-init case's (and test_schedule's map gradient)
        pytest.param(dict(x=2), "map", "zero", marks=pytest.mark.slow),
        (dict(x=2, t=2), "vmap", "zero"),
        (dict(x=2), "map", "init"),
    ],
    ids=["one-expert", "map", "vmap-4", "ridge-init"],
)
def test_matches_optimistix_adjoint_for_basis_and_data(getkey, blocks, schedule, ridge_toward):
    grid, basis, data = _burgers_case(getkey)
    readout = jr.normal(getkey(), grid.shape)
    u0 = data["u0"]
    common = dict(
        **TIGHT,
        rows=hcmoe.Rows(ridge=1e-2, ridge_toward=ridge_toward),
        coupling=hcmoe.Independent(schedule=schedule),
        init=jnp.linspace(0.5, 1.5, basis.shape[-1]),
    )
    partition = hcmoe.Partition(**blocks)
    new = _readout_loss(ForcedBurgers(), partition, grid, lambda x: {"u0": x}, readout, **common)
    old = _readout_loss(
        ForcedBurgers(), partition, grid, lambda x: {"u0": x}, readout, adjoint=OPTIMISTIX, **common
    )
    grads_new = jax.grad(new, argnums=(0, 1))(basis, u0)
    grads_old = jax.grad(old, argnums=(0, 1))(basis, u0)
    for g_new, g_old in zip(grads_new, grads_old):
        assert bool(jnp.all(jnp.isfinite(g_new)))
        assert _relative(g_new, g_old) < 1e-8
    # Forward mode gives the same directional derivative as the transpose.
    directions = (jr.normal(getkey(), basis.shape), jr.normal(getkey(), u0.shape))
    tangent = jax.jvp(new, (basis, u0), directions)[1]
    from_grad = sum(jnp.sum(g * d) for g, d in zip(grads_new, directions))
    assert abs(float(tangent - from_grad)) <= 1e-9 * (1 + abs(float(from_grad)))


def test_matches_finite_differences_in_a_pde_parameter(getkey):
    grid, basis, data = _burgers_case(getkey)
    readout = jr.normal(getkey(), grid.shape)

    def loss(nu):
        sol = hcmoe.solve(
            basis,
            ForcedBurgers(nu=nu),
            hcmoe.Partition(x=2),
            grid,
            data,
            **TIGHT,
            rows=hcmoe.Rows(ridge=1e-2),
        )
        return jnp.sum(sol.u * readout)

    nu = jnp.asarray(0.1)
    analytic = jax.grad(loss)(nu)
    numeric = finite_difference_jvp(loss, nu, jnp.asarray(1.0), eps=1e-5)
    assert abs(float(analytic - numeric)) <= 1e-6 * (1 + abs(float(numeric)))
    old = jax.grad(
        lambda nu: jnp.sum(
            hcmoe.solve(
                basis,
                ForcedBurgers(nu=nu),
                hcmoe.Partition(x=2),
                grid,
                data,
                **TIGHT,
                rows=hcmoe.Rows(ridge=1e-2),
                adjoint=OPTIMISTIX,
            ).u
            * readout
        )
    )(nu)
    assert abs(float(analytic - old)) <= 1e-8 * (1 + abs(float(old)))


def test_diffusion_sorption_exact_initial_condition_and_robin_boundary(getkey):
    """The benchmark PDE (exact IC in the ansatz, Robin rows, a t > 0 residual mask, sampled
    points), four experts: the field-form gradient equals optimistix's and finite
    differences."""
    grid = ds.make_grid(nt=9, nx=16)
    pde = ds.DiffusionSorption(exact_initial=False, boundary_weight=1.0)  # hcmoe 0.1's default
    mesh = grid.mesh()
    t, x = jnp.asarray(mesh["t"]), jnp.asarray(mesh["x"])
    basis = jnp.stack([jnp.cos(k * np.pi * x) * (1 + 0.1 * k * t) for k in range(5)], -1)
    basis = basis + 0.05 * jr.normal(getkey(), basis.shape)
    data = {"u0": 0.1 + 0.05 * jnp.sin(np.pi * jnp.asarray(grid.coords("x")))}
    readout = jr.normal(getkey(), grid.shape)
    key = getkey()

    def loss(basis, adjoint=None):
        sol = hcmoe.solve(
            basis,
            pde,
            hcmoe.Partition(x=4),
            grid,
            data,
            key=key,
            rows=hcmoe.Rows(points_per_expert=20, ridge=1e-2),
            **TIGHT,
            adjoint=adjoint,
        )
        return jnp.sum(sol.u * readout)

    sol = hcmoe.solve(
        basis,
        pde,
        hcmoe.Partition(x=4),
        grid,
        data,
        key=key,
        rows=hcmoe.Rows(points_per_expert=20, ridge=1e-2),
        **TIGHT,
    )
    assert bool(jnp.all(sol.stats.converged))
    grad = jax.grad(loss)(basis)
    assert _relative(grad, jax.grad(lambda b: loss(b, OPTIMISTIX))(basis)) < 1e-8
    direction = jr.normal(getkey(), basis.shape)
    # This constrained u leaves [0, 1] (down to -10), where the retardation's guard
    # max(u, 0) makes the residual non-smooth, and the perturbed solves stop after 6 to 40
    # steps: their error over eps limits the difference quotient. Measured on one machine
    # (relative error): eps 1e-3 1.6e-5, 1e-4 1.6e-7, 1e-5 5.6e-6, 1e-6 1.3e-6; with 1e-5 it
    # passed at 1e-6 on another. eps 1e-4 with a 1e-5 bound keeps a wide margin either way;
    # an adjoint error shows at O(1).
    numeric = finite_difference_jvp(loss, basis, direction, eps=1e-4)
    analytic = jnp.sum(grad * direction)
    assert abs(float(analytic - numeric)) <= 1e-5 * (1 + abs(float(numeric)))


def test_navier_stokes_spectral_operators_and_joint_coupling(getkey):
    """Fourier multipliers (one shared FFT), the particular part `u_p = w0`, and the joint
    blended solve (one solve on the windowed basis): gradients equal optimistix's."""
    grid = ns.make_grid(nt=4, n=8)
    pde = ns.NavierStokes()
    w0 = ns.sample_initial_conditions(getkey(), 1, grid)[0]
    basis = 0.1 * jr.normal(getkey(), grid.shape + (3,))
    readout = jr.normal(getkey(), grid.shape)

    def loss(basis, adjoint, **options):
        sol = hcmoe.solve(
            basis,
            pde,
            hcmoe.Partition(x=2, overlap=0.25),
            grid,
            {"w0": w0},
            **TIGHT,
            rows=hcmoe.Rows(ridge=1e-2),
            adjoint=adjoint,
            **options,
        )
        return jnp.sum(sol.u * readout)

    for options in (dict(), dict(coupling="joint")):
        new = jax.grad(lambda b: loss(b, None, **options))(basis)
        old = jax.grad(lambda b: loss(b, OPTIMISTIX, **options))(basis)
        assert _relative(new, old) < 1e-8, options


def test_jit_and_vmap_over_a_batch(getkey):
    grid, basis, data = _burgers_case(getkey)
    batch = jnp.stack([basis, basis + 0.02 * jr.normal(getkey(), basis.shape)])
    readout = jr.normal(getkey(), grid.shape)

    def loss(basis, adjoint=None):
        sol = hcmoe.solve(
            basis,
            ForcedBurgers(),
            hcmoe.Partition(x=2),
            grid,
            data,
            **TIGHT,
            rows=hcmoe.Rows(ridge=1e-2),
            adjoint=adjoint,
        )
        return jnp.sum(sol.u * readout)

    new = jax.jit(jax.vmap(jax.grad(loss)))(batch)
    old = jax.vmap(jax.grad(lambda b: loss(b, OPTIMISTIX)))(batch)
    assert _relative(new, old) < 1e-8


def test_diagnostics_keep_their_gradient(getkey):
    """`stats.residual_norm` is computed from the fields, so it differentiates (it is not a
    constant of the custom rule): its gradient matches finite differences."""
    grid, basis, data = _burgers_case(getkey)

    def norm(basis):
        sol = hcmoe.solve(
            basis,
            ForcedBurgers(),
            hcmoe.Partition(x=2),
            grid,
            data,
            **TIGHT,
            rows=hcmoe.Rows(ridge=1e-2),
        )
        return jnp.sum(sol.stats.residual_norm)

    direction = jr.normal(getkey(), basis.shape)
    analytic = jnp.sum(jax.grad(norm)(basis) * direction)
    numeric = finite_difference_jvp(norm, basis, direction, eps=1e-5)
    assert abs(float(analytic)) > 1e-6  # not a constant
    assert abs(float(analytic - numeric)) <= 1e-5 * (1 + abs(float(numeric)))


@pytest.mark.parametrize("per_expert", [True, False], ids=["per-expert", "matrix-product"])
def test_product_tangents_match_the_plain_products(getkey, per_expert):
    """`T W^T` and `F^T T` carry their own tangents (per expert, so that the transposes
    fuse, or one matrix product): both forms give the plain products' JVPs and VJPs in every
    argument."""
    from hcmoe import _adjoint

    basis, weights, fields = (jr.normal(getkey(), s) for s in ((50, 6), (4, 6), (50, 4)))
    cases = [
        (
            lambda t, w: _adjoint._fields_product(t, w, per_expert),
            lambda t, w: t @ w.T,
            (basis, weights),
        ),
        (
            lambda f, t: _adjoint._transpose_product(f, t, per_expert),
            lambda f, t: f.T @ t,
            (fields, basis),
        ),
    ]
    for custom, plain, args in cases:
        tangents = tuple(jr.normal(getkey(), a.shape) for a in args)
        out, tangent = jax.jvp(custom, args, tangents)
        expected, expected_tangent = jax.jvp(plain, args, tangents)
        assert _relative(out, expected) < 1e-14
        assert _relative(tangent, expected_tangent) < 1e-14
        cotangent = jr.normal(getkey(), out.shape)
        for got, want in zip(
            jax.vjp(custom, *args)[1](cotangent), jax.vjp(plain, *args)[1](cotangent)
        ):
            assert _relative(got, want) < 1e-14


def test_per_expert_products_only_for_few_experts_and_local_or_spectral_operators(getkey):
    """The per-expert tangents are used for stencils and Fourier multipliers, not behind an
    opaque whole-grid operator (`ops.Linear`), nor past `_UNROLL_MAX` experts."""
    from hcmoe import ops
    from hcmoe._adjoint import per_expert_products
    from hcmoe._rows import problem_rows

    grid, basis, data = _burgers_case(getkey)

    class Opaque(ForcedBurgers):
        def operators(self):
            return {
                **super().operators(),
                "u_t": ops.Linear(lambda f, g: jnp.gradient(f, g.spacing("t"), axis=g.axis("t"))),
            }

    ns_grid = ns.make_grid(nt=4, n=8)
    ns_data = {"w0": ns.sample_initial_conditions(getkey(), 1, ns_grid)[0]}
    ns_basis = jr.normal(getkey(), ns_grid.shape + (3,))
    cases = [
        (ForcedBurgers(), grid, basis, data, hcmoe.Partition(x=2), True),
        (ns.NavierStokes(), ns_grid, ns_basis, ns_data, hcmoe.Partition(x=2), True),
        (Opaque(), grid, basis, data, hcmoe.Partition(x=2), False),
        (
            ForcedBurgers(),
            hcmoe.uniform_grid(t=(0.0, 1.0, 7), x=(0.0, 1.0, 40)),
            None,
            None,
            hcmoe.Partition(x=20),
            False,
        ),
    ]
    for pde, grid_, basis_, data_, partition, expected in cases:
        if basis_ is None:
            basis_ = jr.normal(getkey(), grid_.shape + (3,))
            data_ = data_for(grid_)
        rows, _, _ = problem_rows(basis_, pde, grid_, data_, partition, 4, getkey())
        assert per_expert_products(rows, grid_) is expected, type(pde).__name__


def test_gradient_is_the_same_with_either_product_form(getkey, monkeypatch):
    """Four experts on the per-expert tangents (the default) and on matrix products give the
    same gradient in the basis and data (rounding only)."""
    from hcmoe import _adjoint

    grid, basis, data = _burgers_case(getkey)
    readout = jr.normal(getkey(), grid.shape)
    loss = _readout_loss(
        ForcedBurgers(),
        hcmoe.Partition(x=2, t=2),
        grid,
        lambda x: {"u0": x},
        readout,
        **TIGHT,
        rows=hcmoe.Rows(ridge=1e-2),
    )
    per_expert = jax.grad(loss, argnums=(0, 1))(basis, data["u0"])
    monkeypatch.setattr(_adjoint, "_UNROLL_MAX", 0)
    jax.clear_caches()  # `hcmoe.solve` is jitted: retrace it with the other form
    matrix = jax.grad(loss, argnums=(0, 1))(basis, data["u0"])
    for a, b in zip(per_expert, matrix):
        assert _relative(a, b) < 1e-10


def _hessian_cases(getkey):
    grid = ds.make_grid(nt=9, nx=16)
    t, x = (jnp.asarray(c) for c in (grid.mesh()["t"], grid.mesh()["x"]))
    ds_basis = jnp.stack([jnp.cos(k * np.pi * x) * (1 + 0.1 * k * t) for k in range(5)], -1)
    ds_data = {"u0": 0.1 + 0.05 * jnp.sin(np.pi * jnp.asarray(grid.coords("x")))}
    pde = ds.DiffusionSorption(exact_initial=False, boundary_weight=1.0)  # hcmoe 0.1's default
    yield "ds", pde, grid, ds_basis, ds_data
    ns_grid = ns.make_grid(nt=4, n=8)
    w0 = ns.sample_initial_conditions(getkey(), 1, ns_grid)[0]
    yield (
        "ns",
        ns.NavierStokes(),
        ns_grid,
        0.1 * jr.normal(getkey(), ns_grid.shape + (3,)),
        {"w0": w0},
    )
    b_grid, b_basis, b_data = _burgers_case(getkey)
    yield "burgers", ForcedBurgers(), b_grid, b_basis, b_data


def test_stack_hessian_equals_jax_hessian(getkey):
    """`_expert.hessian` (from the stacks, used for batched experts) is the Hessian of
    `½‖residual‖²` that `jax.hessian` gives, second-order terms included, for a pointwise
    nonlinear PDE (diffusion–sorption), spectral operators (Navier–Stokes) and Burgers, with
    the ridge, at random weights."""
    from hcmoe._expert import hessian, residual
    from hcmoe._rows import build_problems

    for name, pde, grid, basis, data in _hessian_cases(getkey):
        problems, _, _ = build_problems(basis, pde, grid, data, hcmoe.Partition(x=2), 12, getkey())
        problem = jax.tree.map(lambda a: a[1] if isinstance(a, jax.Array) else a, problems)
        w = jr.normal(getkey(), (basis.shape[-1],))

        @jax.jit
        def both(w):
            def objective(v):
                r = residual(v, problem, pde, data, 1e-2)
                return 0.5 * jnp.sum(r * r)

            return hessian(w, problem, pde, data, 1e-2), jax.hessian(objective)(w)

        got, want = both(w)
        assert _relative(got, want) < 1e-12, name
        symmetry = jnp.linalg.norm(got - got.T) / jnp.linalg.norm(want)
        assert float(symmetry) < 1e-13, name
