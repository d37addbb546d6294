import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optimistix as optx
import pytest

import hcmoe
from hcmoe import losses

from .helpers import (
    ForcedBurgers,
    ForcedHeat,
    basis_with_exact,
    data_for,
    exact_field,
    finite_difference_jvp,
    small_grid,
)


# Some partitions here give an expert no condition row on purpose (owned scope).
pytestmark = pytest.mark.filterwarnings("ignore::hcmoe.ConditionWarning")


TIGHT = dict(
    solver=hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12),
    max_steps=100,
    rows=hcmoe.Rows(ridge=0.0),
)


@pytest.mark.parametrize("boundary", ["neumann", "robin"])
@pytest.mark.parametrize("blocks", [dict(), dict(x=2), dict(t=2, x=3)])
def test_nonlinear_exact_solution_recovered(getkey, boundary, blocks):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey())
    pde = ForcedBurgers(boundary=boundary)
    sol = hcmoe.solve(basis, pde, hcmoe.Partition(**blocks), grid, data_for(grid), **TIGHT)
    assert bool(jnp.all(sol.stats.converged))
    assert jnp.max(jnp.abs(sol.u - exact_field(grid))) < 1e-8
    expected = jnp.zeros_like(sol.weights).at[:, 0].set(1.0)
    assert jnp.max(jnp.abs(sol.weights - expected)) < 1e-8
    assert sol.weights.shape == (hcmoe.Partition(**blocks).num_experts(grid), 5)


@pytest.mark.parametrize("blocks", [dict(), dict(x=2), dict(t=3, x=2)])
def test_linear_fast_path_recovers_exact_solution(getkey, blocks):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey())
    sol = hcmoe.solve(
        basis,
        ForcedHeat(),
        hcmoe.Partition(**blocks),
        grid,
        data_for(grid),
        rows=hcmoe.Rows(ridge=0.0),
    )
    assert bool(jnp.all(sol.stats.converged))
    assert bool(jnp.all(sol.stats.num_steps == 0))  # no iterations: one least-squares solve
    assert jnp.max(jnp.abs(sol.u - exact_field(grid))) < 1e-8


def test_linear_fast_path_matches_levenberg_marquardt(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    pde = ForcedHeat()
    direct = hcmoe.solve(basis, pde, hcmoe.Partition(x=2), grid, data_for(grid))

    class NotFlaggedLinear(ForcedHeat):
        linear = False

    iterative = hcmoe.solve(
        basis,
        NotFlaggedLinear(),
        hcmoe.Partition(x=2),
        grid,
        data_for(grid),
        max_steps=100,
        solver=hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12),
    )
    assert jnp.max(jnp.abs(direct.weights - iterative.weights)) < 1e-7


@pytest.mark.parametrize("pde", [ForcedBurgers(), ForcedHeat()], ids=["nonlinear", "linear"])
def test_residual_below_tolerance_with_complete_basis(getkey, pde):
    # A complete random basis reaches every grid field, so the solve must drive the residual
    # at every constrained point (all of them here) and every condition to rounding level.
    grid = small_grid(nt=6, nx=7)
    basis = jr.normal(getkey(), grid.shape + (grid.size,))
    # From w = ones a random 42-function basis starts far away; LM converges from zeros.
    init = jnp.zeros(grid.size)
    sol = hcmoe.solve(basis, pde, None, grid, data_for(grid), init=init, **TIGHT)
    assert bool(jnp.all(sol.stats.converged))
    assert jnp.max(jnp.abs(losses.pointwise_residual(sol.u, pde, grid, data_for(grid)))) < 1e-8
    assert losses.condition_loss(sol.u, pde, grid, data_for(grid)) < 1e-16
    assert bool(jnp.all(sol.stats.residual_norm < 1e-8))


def _loss_through_solve(pde, grid, partition, direction_key, **options):
    weights_out = jr.normal(direction_key, grid.shape)

    def loss(basis):
        sol = hcmoe.solve(basis, pde, partition, grid, data_for(grid), **options)
        return jnp.sum(sol.u * weights_out) + jnp.sum(sol.weights**2)

    return loss


@pytest.mark.parametrize("pde", [ForcedBurgers(), ForcedHeat()], ids=["nonlinear", "linear"])
@pytest.mark.parametrize("blocks", [dict(), dict(x=2)])
def test_gradient_matches_finite_differences(getkey, pde, blocks):
    grid = small_grid(nt=7, nx=9)
    noise = 0.1 * jr.normal(getkey(), grid.shape + (4,))
    basis = basis_with_exact(grid, getkey(), n_basis=4) + noise
    loss = _loss_through_solve(
        pde,
        grid,
        hcmoe.Partition(**blocks),
        getkey(),
        solver=hcmoe.LevenbergMarquardt(rtol=1e-13, atol=1e-13),
        max_steps=200,
        rows=hcmoe.Rows(ridge=1e-3),
    )
    direction = jr.normal(getkey(), basis.shape)
    grad = jax.grad(loss)(basis)
    analytic = jnp.sum(grad * direction)
    # eps = 1e-5: the central difference's truncation error (~eps^2) and the solves' own
    # convergence error (~1e-11, amplified by 1/eps) are then both far below the tolerance.
    numeric = finite_difference_jvp(loss, basis, direction, eps=1e-5)
    assert jnp.abs(analytic - numeric) <= 1e-5 * (1 + jnp.abs(numeric))
    jvp = jax.jvp(loss, (basis,), (direction,))[1]
    assert jnp.abs(jvp - analytic) <= 1e-8 * (1 + jnp.abs(analytic))


def test_experts_equal_independent_per_block_solves(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    pde = ForcedBurgers()
    partition = hcmoe.Partition(t=2, x=2)
    labels = partition.labels(grid)
    opts = dict(solver=hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12), max_steps=100)
    moe = hcmoe.solve(basis, pde, partition, grid, data_for(grid), **opts)
    # The loss (about 14 here) stops decreasing at rounding level, where LM's trust region
    # accepts or rejects steps at random: over random problems like this one, 5% of the
    # experts stop more than 1e-9 from the optimum (with QR or normal-equation steps alike).
    for k in range(4):
        alone = hcmoe.solve(
            basis, pde, (labels != k).astype(np.int32), grid, data_for(grid), **opts
        )
        assert jnp.max(jnp.abs(alone.weights[0] - moe.weights[k])) < 1e-8
        block = labels == k
        assert jnp.max(jnp.abs(jnp.where(block, alone.u - moe.u, 0.0))) < 1e-8


def test_expert_ignores_basis_outside_its_stencils(getkey):
    # Changing the basis deep inside block 1 must not move expert 0's weights.
    grid = small_grid(nt=9, nx=21)
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    pde = ForcedBurgers()
    partition = hcmoe.Partition(x=2)
    opts = dict(solver=hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12), max_steps=100)
    before = hcmoe.solve(basis, pde, partition, grid, data_for(grid), **opts)
    changed = basis.at[:, 15:].add(jr.normal(getkey(), (9, 6, 5)))
    after = hcmoe.solve(changed, pde, partition, grid, data_for(grid), **opts)
    assert jnp.max(jnp.abs(before.weights[0] - after.weights[0])) < 1e-10
    assert jnp.max(jnp.abs(before.weights[1] - after.weights[1])) > 1e-3


def test_single_expert_is_plain_hard_constraint(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) + 0.05 * jr.normal(getkey(), grid.shape + (5,))
    pde = ForcedBurgers()
    opts = dict(solver=hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12), max_steps=100)
    none = hcmoe.solve(basis, pde, None, grid, data_for(grid), **opts)
    one = hcmoe.solve(basis, pde, hcmoe.Partition(t=1, x=1), grid, data_for(grid), **opts)
    assert none.weights.shape == (1, 5)
    assert jnp.max(jnp.abs(none.u - one.u)) == 0
    assert jnp.max(jnp.abs(none.u - basis @ none.weights[0])) < 1e-12


def test_jit_vmap_grad_compose_and_keys(getkey):
    grid = small_grid()
    pde = ForcedBurgers()
    bases = jnp.stack([basis_with_exact(grid, getkey()) for _ in range(3)])
    data = {"u0": jnp.stack([data_for(grid)["u0"]] * 3)}
    partition = hcmoe.Partition(x=2)

    @jax.jit
    def batched(bases, data, key):
        keys = jr.split(key, bases.shape[0])
        return jax.vmap(
            lambda b, d, k: hcmoe.solve(
                b, pde, partition, grid, d, key=k, rows=hcmoe.Rows(points_per_expert=40)
            )
        )(bases, data, keys)

    key = getkey()
    first, second = batched(bases, data, key), batched(bases, data, key)
    assert first.u.shape == (3,) + grid.shape and first.weights.shape == (3, 2, 5)
    assert first.stats.converged.shape == (3, 2)
    assert jnp.array_equal(first.u, second.u)  # same key, same result
    other = batched(bases, data, getkey())
    assert not jnp.array_equal(first.weights, other.weights)  # other points sampled

    def loss(bases):
        return jnp.mean(batched(bases, data, key).u ** 2)

    grads = jax.jit(jax.grad(loss))(bases)
    assert grads.shape == bases.shape and bool(jnp.all(jnp.isfinite(grads)))


def test_points_per_expert_clipped_to_expert_size(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey())
    everything = hcmoe.solve(basis, ForcedHeat(), hcmoe.Partition(x=2), grid, data_for(grid))
    clipped = hcmoe.solve(
        basis,
        ForcedHeat(),
        hcmoe.Partition(x=2),
        grid,
        data_for(grid),
        key=getkey(),
        rows=hcmoe.Rows(points_per_expert=10_000),
    )
    assert jnp.max(jnp.abs(everything.u - clipped.u)) < 1e-12


def test_uneven_blocks_and_label_partitions(getkey):
    grid = small_grid(nt=7, nx=10)
    basis = basis_with_exact(grid, getkey())
    for partition in (hcmoe.Partition(x=3), hcmoe.random_labels(grid, 3, seed=1)):
        sol = hcmoe.solve(basis, ForcedBurgers(), partition, grid, data_for(grid), **TIGHT)
        assert sol.weights.shape == (3, 5)
        assert jnp.max(jnp.abs(sol.u - exact_field(grid))) < 1e-8


def test_other_optimistix_solvers(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey())
    # rtol = atol = 1e-10: at 1e-12 the Cauchy test sits at rounding level (residual ~6e-14),
    # where Dogleg's termination flips with the compiler's fusion choices.
    for solver in (optx.GaussNewton(rtol=1e-10, atol=1e-10), optx.Dogleg(rtol=1e-10, atol=1e-10)):
        sol = hcmoe.solve(
            basis,
            ForcedBurgers(),
            hcmoe.Partition(x=2),
            grid,
            data_for(grid),
            solver=solver,
            max_steps=100,
            rows=hcmoe.Rows(ridge=0.0),
        )
        assert bool(jnp.all(sol.stats.converged))
        assert jnp.max(jnp.abs(sol.u - exact_field(grid))) < 1e-8


def test_float32_backbone_solved_in_float64(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()).astype(jnp.float32)
    sol = hcmoe.solve(basis, ForcedBurgers(), None, grid, data_for(grid), **TIGHT)
    assert sol.u.dtype == jnp.float32 and sol.weights.dtype == jnp.float32
    # the basis itself was rounded to float32, so the exact solution is recovered to ~1e-7
    assert jnp.max(jnp.abs(sol.u - exact_field(grid))) < 1e-5


def test_non_converged_expert_is_reported_and_can_raise(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) + 0.2 * jr.normal(getkey(), grid.shape + (5,))
    args = (basis, ForcedBurgers(), hcmoe.Partition(x=2), grid, data_for(grid))
    strict = hcmoe.LevenbergMarquardt(rtol=1e-14, atol=1e-14)
    sol = hcmoe.solve(*args, max_steps=1, solver=strict)
    assert not bool(jnp.any(sol.stats.converged))
    assert int(sol.stats.num_failed) == 2
    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(hcmoe.solve(*args, max_steps=1, solver=strict, throw=True))
