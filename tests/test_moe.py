"""PI-HC-MoE beyond the paper: condition scope, overlapping experts blended by a partition of
unity, exact conditions, one meaning of a condition weight, residual masks, grid data."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import hcmoe
from hcmoe import losses, ops
from hcmoe._execution import assemble

from .helpers import (
    ForcedBurgers,
    basis_with_exact,
    check_blended_solve,
    data_for,
    exact_field,
    small_grid,
)


class Straight(hcmoe.AbstractPDE):
    """`u_xx = 0` with `u = 0` at x = 0 and `u = 1` at x = 1: any line solves the PDE in a
    block, the conditions pick `u = x`."""

    linear = True
    scope: str = "owned"

    def operators(self):
        return {"u_xx": ops.FiniteDifference("x", order=2)}

    def residual(self, v, coords, data):
        return v["u_xx"]

    def conditions(self, grid, data):
        return (
            hcmoe.dirichlet("x", "low", 0.0, scope=self.scope),
            hcmoe.dirichlet("x", "high", 1.0, scope=self.scope),
        )


def _line_basis(grid):
    mesh = grid.mesh()
    x = jnp.asarray(mesh["x"])
    return jnp.stack([x, jnp.ones_like(x)], axis=-1)


def test_interior_experts_recover_non_constant_solution_with_global_conditions():
    grid = small_grid(nt=5, nx=17)
    basis = _line_basis(grid)
    x = jnp.asarray(grid.mesh()["x"])
    partition = hcmoe.Partition(x=4)
    with pytest.warns(hcmoe.ConditionWarning, match="receive none"):
        owned = hcmoe.solve(basis, Straight(), partition, grid, rows=hcmoe.Rows(ridge=1e-4))
    # Owned rows: the two interior experts see no condition and settle on (nearly) zero.
    interior = partition.labels(grid) == 1
    assert float(jnp.max(jnp.abs(owned.u - x)[interior])) > 0.1
    glob = hcmoe.solve(
        basis, Straight(scope="global"), partition, grid, rows=hcmoe.Rows(ridge=1e-8)
    )
    assert float(jnp.max(jnp.abs(glob.u - x))) < 1e-6
    np.testing.assert_allclose(glob.weights, np.tile([1.0, 0.0], (4, 1)), atol=1e-6)
    # The per-call override gives the same as the condition's own scope.
    override = hcmoe.solve(
        basis, Straight(), partition, grid, rows=hcmoe.Rows(ridge=1e-8, condition_scope="global")
    )
    np.testing.assert_allclose(override.u, glob.u, atol=1e-12)
    assert float(jnp.max(glob.stats.condition_error)) < 1e-6


@pytest.mark.parametrize(
    "axes, blocks, periodic",
    [
        (dict(t=(0.0, 1.0, 7), x=(0.0, 1.0, 33)), dict(x=4, overlap=0.1), ()),
        (dict(t=(0.0, 1.0, 9), x=(0.0, 2.0, 40)), dict(t=3, x=2, overlap={"x": 0.3}), ()),
        (
            dict(t=(0.0, 1.0, 3), x=(0.0, 1.0, 32), y=(0.0, 1.0, 16)),
            dict(x=2, y=4, overlap=0.1),
            ("x", "y"),
        ),
        (dict(t=(0.0, 1.0, 3), x=(0.0, 1.0, 41)), dict(x=4, overlap=0.3), ()),  # wide: normalised
        (dict(t=(0.0, 1.0, 3), x=(0.0, 1.0, 40)), dict(x=4, overlap=0.3), ("x",)),
    ],
)
def test_partition_of_unity_sums_to_one_and_is_supported_on_members(axes, blocks, periodic):
    grid = hcmoe.uniform_grid(periodic=periodic, **axes)
    partition = hcmoe.Partition(**blocks)
    phi = partition.blend(grid)
    assert phi.shape == (partition.num_experts(grid),) + grid.shape
    np.testing.assert_allclose(phi.sum(axis=0), 1.0, atol=1e-14)
    assert phi.min() >= 0.0 and phi.max() <= 1.0
    members = partition.members(grid)
    assert not np.any((phi > 0) & ~members)  # an expert's weight lives where its rows are
    labels = partition.labels(grid)
    own = labels[None] == np.arange(phi.shape[0]).reshape((-1,) + (1,) * grid.ndim)
    assert np.all(members[own])


def test_blended_field_is_continuous_where_the_piecewise_one_jumps():
    """Experts with different constant functions: the piecewise field jumps by their
    difference; the blended one changes by O(dx) between neighbours, shrinking with dx."""
    weights = jnp.array([[0.0], [1.0], [3.0], [2.0]])
    jumps = []
    for nx in (65, 129, 257):
        grid = hcmoe.uniform_grid(t=(0.0, 1.0, 3), x=(0.0, 1.0, nx))
        ones = jnp.ones(grid.shape + (1,))
        blended = hcmoe.Partition(x=4, overlap=0.1)
        u = assemble(ones, None, weights, blended.labels(grid), blended.blend(grid))
        jumps.append(float(losses.seam_jump(u, blended.labels(grid))))
        piecewise = hcmoe.Partition(x=4)
        v = assemble(ones, None, weights, piecewise.labels(grid), piecewise.blend(grid))
        assert float(losses.seam_jump(v, piecewise.labels(grid))) == pytest.approx(2.0)
    # Largest slope of the blend is 1.5 |w_k - w_j| / (2 delta) = 15: jump <= 15 dx.
    for nx, jump in zip((65, 129, 257), jumps):
        assert jump <= 15.0 / (nx - 1) + 1e-12
    assert jumps[2] < 0.6 * jumps[0]


def test_interface_jumps_per_interface():
    grid = hcmoe.uniform_grid(t=(0.0, 1.0, 2), x=(0.0, 1.0, 8))
    partition = hcmoe.Partition(x=2)
    u = jnp.where(jnp.asarray(grid.mesh()["x"]) < 0.5, 0.0, 0.7)
    jumps = losses.interface_jumps(u, partition.labels(grid))
    assert set(jumps) == {(0, 1)} and float(jumps[(0, 1)]) == pytest.approx(0.7)


def test_blended_moe_recovers_exact_solution_and_gradients_match_finite_differences(getkey):
    check_blended_solve(
        getkey, hcmoe.Partition(x=2, overlap=0.2), rows=hcmoe.Rows(condition_scope="global")
    )


def test_exact_initial_condition_holds_by_construction(getkey):
    class Heat(hcmoe.AbstractPDE):
        def operators(self):
            return {"u_t": ops.FiniteDifference("t"), "u_xx": ops.FiniteDifference("x", 2)}

        def residual(self, v, coords, data):
            return v["u_t"] - 0.1 * v["u_xx"]

        def conditions(self, grid, data):
            return (hcmoe.initial(data["u0"], exact=True), hcmoe.dirichlet("x", "low", 0.0))

    grid = small_grid(nt=9, nx=21)
    x = grid.coords("x")
    u0 = jnp.asarray(0.8 * np.sin(np.pi * x))
    basis = jr.normal(getkey(), grid.shape + (4,))  # a basis that knows nothing of u0
    sol = hcmoe.solve(
        basis,
        Heat(),
        hcmoe.Partition(x=2),
        grid,
        {"u0": u0},
        key=getkey(),
        rows=hcmoe.Rows(points_per_expert=20),
    )
    np.testing.assert_allclose(sol.u[0], u0, atol=1e-12)

    # Least-squares rows (the same condition without exact=True) miss it.
    class LeastSquares(Heat):
        def conditions(self, grid, data):
            return (hcmoe.initial(data["u0"]), hcmoe.dirichlet("x", "low", 0.0))

    soft = hcmoe.solve(
        basis,
        LeastSquares(),
        hcmoe.Partition(x=2),
        grid,
        {"u0": u0},
        key=getkey(),
        rows=hcmoe.Rows(points_per_expert=20),
    )
    assert float(jnp.max(jnp.abs(soft.u[0] - u0))) > 1e-3
    assert float(jnp.max(soft.stats.condition_error)) > 1e-3


def test_exact_faces_compose_when_corners_agree(getkey):
    class TwoFaces(hcmoe.AbstractPDE):
        def operators(self):
            return {"u_t": ops.FiniteDifference("t")}

        def residual(self, v, coords, data):
            return v["u_t"]

        def conditions(self, grid, data):
            return (
                hcmoe.initial(data["u0"], exact=True),
                hcmoe.dirichlet("x", "low", data["left"], exact=True),
            )

    grid = small_grid()
    x, t = grid.coords("x"), grid.coords("t")
    u0 = jnp.asarray(1.0 + x**2)
    left = jnp.asarray(1.0 + np.sin(t))  # left(0) = u0(x0) = 1: compatible corner
    basis = jr.normal(getkey(), grid.shape + (3,))
    sol = hcmoe.solve(basis, TwoFaces(), None, grid, {"u0": u0, "left": left})
    np.testing.assert_allclose(sol.u[0], u0, atol=1e-12)
    np.testing.assert_allclose(sol.u[:, 0], left, atol=1e-12)


def test_exact_is_only_for_value_conditions():
    with pytest.raises(ValueError, match="exact=True is available for value conditions"):
        hcmoe.Condition("x", 0, ops.FiniteDifference("x"), 0.0, exact=True)
    with pytest.raises(ValueError, match="scope must be one of"):
        hcmoe.dirichlet("x", "low", 0.0, scope="everyone")


def test_condition_weight_enters_squared_in_the_loss():
    grid = small_grid()
    u = exact_field(grid) + 0.1

    class Weighted(ForcedBurgers):
        weight: float = 1.0

        def conditions(self, grid, data):
            return tuple(
                hcmoe.Condition(c.axis, c.index, c.operator, c.target, self.weight)
                for c in super().conditions(grid, data)
            )

    one = losses.condition_loss(u, Weighted(), grid, data_for(grid))
    three = losses.condition_loss(u, Weighted(weight=3.0), grid, data_for(grid))
    assert float(three) == pytest.approx(9.0 * float(one), rel=1e-12)


@pytest.mark.parametrize("weight", [1.0, 10.0])
def test_mean_balance_solve_minimises_the_loss_functional(getkey, weight):
    """With every point and one expert, `balance="mean"` makes the solve's objective
    `m * (residual_loss + condition_loss) + ridge^2 |w|^2`: its gradient vanishes there."""

    class Heat(hcmoe.AbstractPDE):
        linear = True

        def operators(self):
            return {"u_t": ops.FiniteDifference("t"), "u_xx": ops.FiniteDifference("x", 2)}

        def residual(self, v, coords, data):
            return v["u_t"] - 0.5 * v["u_xx"] - 1.0

        def conditions(self, grid, data):
            return (
                hcmoe.initial(data["u0"], weight=weight),
                hcmoe.dirichlet("x", "low", 0.0, weight=weight),
            )

    grid = small_grid()
    basis = jr.normal(getkey(), grid.shape + (6,))
    data = {"u0": jnp.asarray(grid.coords("x"))}
    ridge = 1e-3
    sol = hcmoe.solve(basis, Heat(), None, grid, data, rows=hcmoe.Rows(ridge=ridge))

    def objective(w):
        u = basis @ w
        m = grid.size
        return m * (
            losses.residual_loss(u, Heat(), grid, data)
            + losses.condition_loss(u, Heat(), grid, data)
        ) + ridge**2 * jnp.sum(w**2)

    w = sol.weights[0]
    gradient = jax.grad(objective)(w)
    scale = jax.grad(objective)(jnp.zeros_like(w))
    assert float(jnp.max(jnp.abs(gradient))) < 1e-9 * float(jnp.max(jnp.abs(scale)))
    # With "sum" the minimiser is another one (fewer condition rows than PDE rows).
    other = hcmoe.solve(
        basis, Heat(), None, grid, data, rows=hcmoe.Rows(ridge=ridge, balance="sum")
    )
    assert float(jnp.max(jnp.abs(other.weights - sol.weights))) > 1e-6


def test_grid_fields_in_data_reach_the_residual_at_the_sampled_points(getkey):
    class Forced(hcmoe.AbstractPDE):
        """u_t = f(t, x), with the forcing given as a field on the grid."""

        def operators(self):
            return {"u": ops.Identity(), "u_t": ops.FiniteDifference("t")}

        def residual(self, v, coords, data):
            return v["u_t"] + 0.0 * v["u"] ** 2 - data["f"]

        def conditions(self, grid, data):
            return (hcmoe.initial(data["u0"]),)

    grid = small_grid()
    u_exact = exact_field(grid)
    forcing = ops.FiniteDifference("t")(u_exact, grid)
    basis = basis_with_exact(grid, getkey())
    sol = hcmoe.solve(
        basis,
        Forced(),
        hcmoe.Partition(x=2),
        grid,
        {"f": forcing, "u0": u_exact[0]},
        key=getkey(),
        solver=hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12),
        rows=hcmoe.Rows(points_per_expert=40, ridge=0.0),
        max_steps=100,
    )
    np.testing.assert_allclose(sol.u, u_exact, atol=1e-8)


def test_sampled_points_are_reported_and_respect_the_residual_mask(getkey):
    class Masked(ForcedBurgers):
        def residual_mask(self, grid):
            mask = np.ones(grid.shape, bool)
            mask[:3] = False  # no PDE rows on the first three time levels
            return mask

    grid = small_grid()
    partition = hcmoe.Partition(x=2, overlap=0.2)
    sol = hcmoe.solve(
        basis_with_exact(grid, getkey()),
        Masked(),
        partition,
        grid,
        data_for(grid),
        key=getkey(),
        rows=hcmoe.Rows(points_per_expert=30, condition_scope="global"),
    )
    points = np.asarray(sol.stats.points)
    assert points.shape == (2, 30)
    members = partition.members(grid).reshape(2, -1)
    for k in range(2):
        assert np.unique(points[k]).size == 30
        assert np.all(members[k, points[k]])
        t_index, _ = np.unravel_index(points[k], grid.shape)
        assert t_index.min() >= 3
    # The loss leaves the masked levels out as well.
    bad = exact_field(grid).at[:3].add(1.0)
    assert float(losses.residual_loss(exact_field(grid), Masked(), grid, data_for(grid))) < 1e-20
    masked = losses.residual_loss(
        bad.at[:2].set(exact_field(grid)[:2] + 5.0), Masked(), grid, data_for(grid)
    )
    full = losses.residual_loss(bad, ForcedBurgers(), grid, data_for(grid))
    assert float(masked) < float(full)


def test_bad_overlap_is_a_clear_error():
    grid = small_grid()
    with pytest.raises(ValueError, match="more than the axis' extent"):
        hcmoe.Partition(x=4, overlap=1.5).blend(grid)
    with pytest.raises(ValueError, match="non-negative float"):
        hcmoe.Partition(x=4, overlap=-0.1)
    with pytest.raises(ValueError, match="not split by this partition"):
        hcmoe.Partition(x=4, overlap={"t": 0.1})
    with pytest.raises(ValueError, match="condition_scope"):
        hcmoe.solve(
            jnp.ones(grid.shape + (2,)),
            Straight(),
            None,
            grid,
            rows=hcmoe.Rows(condition_scope="all"),
        )


@pytest.mark.slow  # 16 s: keeps the default suite under 15 min on 2 cores
def test_warm_start_reaches_the_same_minimiser_with_the_same_gradient(getkey):
    grid = small_grid()
    basis = basis_with_exact(grid, getkey()) * 5.0  # true weights far from the ones of init
    basis = basis + 0.05 * jr.normal(getkey(), basis.shape)
    readout = jr.normal(getkey(), grid.shape)
    solver = hcmoe.LevenbergMarquardt(rtol=1e-12, atol=1e-12)
    opts = dict(max_steps=200, rows=hcmoe.Rows(ridge=1e-3, condition_scope="global"))
    partition = hcmoe.Partition(x=2, overlap=0.2)

    def start(warm):
        return hcmoe.WarmStart(solver) if warm else solver

    def run(b, warm):
        sol = hcmoe.solve(
            b, ForcedBurgers(), partition, grid, data_for(grid), solver=start(warm), **opts
        )
        return jnp.sum(sol.u * readout), sol

    (cold_value, cold), cold_grad = jax.value_and_grad(run, has_aux=True)(basis, False)
    (warm_value, warm), warm_grad = jax.value_and_grad(run, has_aux=True)(basis, True)
    assert bool(jnp.all(cold.stats.converged)) and bool(jnp.all(warm.stats.converged))
    np.testing.assert_allclose(warm.weights, cold.weights, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(warm_grad, cold_grad, rtol=1e-6, atol=1e-9)
    # What the warm start is for: with few iterations it ends nearer the minimiser. (Step
    # counts to a 1e-12 tolerance are chaotic, so they are not compared.)
    capped = dict(opts, max_steps=3)
    few = {
        warm: hcmoe.solve(
            basis, ForcedBurgers(), partition, grid, data_for(grid), solver=start(warm), **capped
        )
        for warm in (False, True)
    }
    assert float(jnp.sum(few[True].stats.residual_norm)) < 0.7 * float(
        jnp.sum(few[False].stats.residual_norm)
    )


@pytest.mark.parametrize(
    "partition",
    [
        hcmoe.Partition(x=4),
        hcmoe.Partition(x=2, t=2),
        hcmoe.Partition(x=4, overlap=0.1),
        hcmoe.Partition(x=20),
    ],
    ids=["x4", "x2-t2", "blended", "20-experts"],
)
def test_u_from_the_fields_equals_the_reference_assembly(getkey, partition):
    """`solve` takes `u` from the experts' fields `T w_k + u_p` (`assemble_from_fields`, per
    expert up to 16 experts, a gather past that); it equals `assemble`'s `u_p + T W[label]`
    (or the blend of the fields)."""
    from hcmoe._adjoint import expert_fields
    from hcmoe._execution import assemble_from_fields

    grid = hcmoe.uniform_grid(t=(0.0, 1.0, 9), x=(0.0, 1.0, 41))
    labels, blend = partition.labels(grid), partition.blend(grid)
    num = int(labels.max()) + 1
    transformed = jr.normal(getkey(), grid.shape + (5,))
    particular = jr.normal(getkey(), grid.shape)
    weights = jr.normal(getkey(), (num, 5))
    fields = expert_fields(weights, transformed, particular)
    got = assemble_from_fields(fields, labels, blend)
    want = assemble(transformed, particular, weights, labels, blend)
    assert float(jnp.max(jnp.abs(got - want))) < 1e-12
    # and so does its gradient in the basis and the weights
    readout = jr.normal(getkey(), grid.shape)
    grads = jax.grad(
        lambda t, w: jnp.sum(
            readout * assemble_from_fields(expert_fields(w, t, particular), labels, blend)
        ),
        argnums=(0, 1),
    )(transformed, weights)
    wants = jax.grad(
        lambda t, w: jnp.sum(readout * assemble(t, particular, w, labels, blend)), argnums=(0, 1)
    )(transformed, weights)
    for g, w in zip(grads, wants):
        assert float(jnp.max(jnp.abs(g - w))) < 1e-11
