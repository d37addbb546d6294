"""Operators evaluated at sampled points equal the whole-grid operators gathered there."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import hcmoe
from hcmoe import ops
from hcmoe._operators import (
    _base,
    evaluate_at_expert_points,
    evaluate_at_points,
    flat_field,
    operators_at_points,
)


def _close(a, b, tol=1e-12):
    # float64 rounding, relative to the size of the values (third derivatives reach 1e3)
    return bool(jnp.max(jnp.abs(a - b)) <= tol * (1.0 + jnp.max(jnp.abs(b))))


def _grid(periodic):
    axes = dict(t=(0.0, 1.0, 7), x=(0.0, 2.0, 10), y=(0.0, 1.0, 6))
    return hcmoe.uniform_grid(**axes, periodic=periodic)


LOCAL = {
    "identity": ops.Identity(),
    "d_t": ops.FiniteDifference("t"),
    "d_xx": ops.FiniteDifference("x", order=2),
    "d_y4": ops.FiniteDifference("y", order=1, accuracy=4),
    "d_xxx": ops.FiniteDifference("x", order=3),
    "backward_t": ops.BackwardDifference("t", accuracy=2),
    "backward_t3": ops.BackwardDifference("t", accuracy=3),
    "combination": 2.0 * ops.Identity()
    - 0.5 * ops.FiniteDifference("x")
    + ops.FiniteDifference("y", order=2),
    "laplacian_fd": ops.Laplacian(("x", "y"), method="fd"),
    "compose": ops.Compose(ops.FiniteDifference("t"), ops.FiniteDifference("x")),
    "compose_xx": ops.Compose(ops.FiniteDifference("x"), ops.FiniteDifference("x")),
    "compose_x_xx4": ops.Compose(
        ops.FiniteDifference("x", order=2, accuracy=4), ops.FiniteDifference("x")
    ),
    "compose_t_backward": ops.Compose(ops.BackwardDifference("t"), ops.FiniteDifference("t")),
    "compose_nested": ops.Compose(
        ops.FiniteDifference("y"), ops.Compose(ops.FiniteDifference("y"), ops.FiniteDifference("x"))
    ),
    "compose_combination": ops.Compose(
        2.0 * ops.Identity() - ops.FiniteDifference("x"), ops.FiniteDifference("y", order=2)
    ),
    "user": ops.Linear(lambda f, g: jnp.cumsum(f, axis=g.axis("x"))),
}
SPECTRAL = {
    "spectral_x": ops.Spectral("x"),
    "spectral_yy": ops.Spectral("y", order=2),
    "spectral_x3": ops.Spectral("x", order=3),
    "laplacian": ops.Laplacian(("x", "y")),
    "inverse_laplacian": ops.InverseLaplacian(("x", "y")),
    "u": ops.VelocityFromVorticity("u"),
    "v": ops.VelocityFromVorticity("v"),
    "spectral_mix": ops.Spectral("x") - 0.1 * ops.Laplacian(("x", "y")),
    "mixed": ops.Identity() + ops.Spectral("y"),
}


def _points(grid, key, shape):
    # Random points, plus every edge and corner of the grid.
    edges = np.flatnonzero(
        np.any(
            [
                np.isin(np.indices(grid.shape)[a], [0, 1, n - 2, n - 1])
                for a, n in enumerate(grid.shape)
            ],
            axis=0,
        )
    )
    rand = jr.randint(key, shape, 0, grid.size)
    return rand, jnp.asarray(edges)


@pytest.mark.parametrize("periodic", [(), ("x",), ("x", "y")], ids=["none", "x", "xy"])
@pytest.mark.parametrize("trailing", [(), (3,)], ids=["field", "basis"])
def test_local_operators_at_points_equal_full_grid(getkey, periodic, trailing):
    grid = _grid(periodic)
    field = jr.normal(getkey(), grid.shape + trailing)
    for points in _points(grid, getkey(), (2, 25)):
        for name, op in LOCAL.items():
            expected = flat_field(op(field, grid), grid)[points]
            got = op.at_points(field, grid, points)
            assert got.shape == points.shape + trailing, name
            assert _close(got, expected), name


@pytest.mark.parametrize("trailing", [(), (3,)], ids=["field", "basis"])
def test_spectral_operators_share_one_fft(getkey, trailing):
    grid = _grid(("x", "y"))
    field = jr.normal(getkey(), grid.shape + trailing)
    points = jr.randint(getkey(), (3, 17), 0, grid.size)
    operators = LOCAL | SPECTRAL
    got = operators_at_points(operators, field, grid, points)
    for name, op in operators.items():
        expected = flat_field(op(field, grid), grid)[points]
        assert got[name].shape == points.shape + trailing
        assert _close(got[name], expected), name
        assert _close(op.at_points(field, grid, points), expected), name


@pytest.mark.parametrize("chunk", [7, 4096], ids=["many-chunks", "one-chunk"])
def test_evaluate_at_points_mixed_requests_and_transpose(getkey, monkeypatch, chunk):
    # Several operators at differently shaped point sets (as the PDE rows and the condition
    # rows are), fused into one scan over row chunks: values equal the whole-grid operators
    # gathered, and so does the transpose (the vjp the gradient of a solve uses).
    monkeypatch.setattr(_base, "CHUNK_ROWS", chunk)
    grid = _grid(("x",))
    field = jr.normal(getkey(), grid.shape + (3,))
    names = ["identity", "d_t", "d_y4", "combination", "backward_t3", "user"]
    shapes = [(2, 25), (2, 25), (4, 3), (11,), (2, 25), (5,)]
    requests = [
        (LOCAL[n], jr.randint(getkey(), shape, 0, grid.size)) for n, shape in zip(names, shapes)
    ]
    requests.append((ops.Spectral("x"), requests[0][1]))

    def fused(f):
        return evaluate_at_points(requests, f, grid)

    def reference(f):
        return [flat_field(op(f, grid), grid)[points] for op, points in requests]

    got, expected = fused(field), reference(field)
    for (op, points), a, b in zip(requests, got, expected):
        assert a.shape == points.shape + (3,)
        assert _close(a, b)
    cotangents = [jr.normal(getkey(), a.shape) for a in got]
    (ct_fused,) = jax.vjp(fused, field)[1](cotangents)
    (ct_reference,) = jax.vjp(reference, field)[1](cotangents)
    assert _close(ct_fused, ct_reference)
    assert _close(jax.jit(fused)(field)[2], expected[2])


def test_expert_points_equal_each_experts_own_field(getkey):
    # Every expert's requests on its own field, all experts at once (one flat gather): equal
    # to evaluating each expert alone, for local stencils, Fourier multipliers and whole-grid
    # operators, and so are the transposes.
    grid = _grid(("x", "y"))
    experts = 3
    fields = jr.normal(getkey(), grid.shape + (experts,))
    operators = [LOCAL[n] for n in ("identity", "d_t", "compose_xx", "combination", "user")]
    operators += [SPECTRAL["laplacian"], SPECTRAL["mixed"]]
    shapes = [
        (experts, 25),
        (experts, 25),
        (experts, 4, 3),
        (experts, 11),
        (experts, 5),
        (experts, 25),
        (experts, 7),
    ]
    requests = [
        (op, jr.randint(getkey(), shape, 0, grid.size)) for op, shape in zip(operators, shapes)
    ]

    def together(f):
        return evaluate_at_expert_points(requests, f, grid)

    def one_by_one(f):
        per_expert = [
            evaluate_at_points([(op, points[k]) for op, points in requests], f[..., k], grid)
            for k in range(experts)
        ]
        return [jnp.stack([values[i] for values in per_expert]) for i in range(len(requests))]

    got, expected = together(fields), one_by_one(fields)
    for (_, points), a, b in zip(requests, got, expected):
        assert a.shape == points.shape
        assert _close(a, b)
    cotangents = [jr.normal(getkey(), a.shape) for a in got]
    (ct_together,) = jax.vjp(together, fields)[1](cotangents)
    (ct_one_by_one,) = jax.vjp(one_by_one, fields)[1](cotangents)
    assert _close(ct_together, ct_one_by_one)


def _complex_fft_reference(op, field, grid):
    # The spectral operators as complex FFTs (the definition), to check the real-FFT path.
    names, symbol = op.fourier_symbol(grid)
    axes = tuple(grid.axis(a) for a in names)
    symbol = symbol.reshape(symbol.shape + (1,) * (field.ndim - grid.ndim))
    return jnp.fft.ifftn(jnp.fft.fftn(field, axes=axes) * symbol, axes=axes).real


@pytest.mark.parametrize("sizes", [(10, 6), (9, 7)], ids=["even", "odd"])
def test_real_fft_equals_complex_fft(getkey, sizes):
    grid = hcmoe.uniform_grid(
        t=(0.0, 1.0, 3), x=(0.0, 1.0, sizes[0]), y=(0.0, 1.0, sizes[1]), periodic=("x", "y")
    )
    field = jr.normal(getkey(), grid.shape + (2,))
    for name, op in SPECTRAL.items():
        if op.fourier_symbol(grid) is None:
            continue
        expected = _complex_fft_reference(op, field, grid)
        assert _close(op(field, grid), expected), name


def test_gradients_through_points_equal_full_grid(getkey):
    grid = _grid(("x",))
    field = jr.normal(getkey(), grid.shape + (3,))
    points = jr.randint(getkey(), (40,), 0, grid.size)
    cotangent = jr.normal(getkey(), (40, 3))
    for name, op in (LOCAL | {"spectral_x": ops.Spectral("x")}).items():

        def full(f, op=op):
            return jnp.sum(flat_field(op(f, grid), grid)[points] * cotangent)

        def sampled(f, op=op):
            return jnp.sum(op.at_points(f, grid, points) * cotangent)

        # jitted: one program per operator instead of one per eager op (same arithmetic)
        assert _close(jax.jit(jax.grad(sampled))(field), jax.jit(jax.grad(full))(field)), name


def test_compose_of_stencils_is_a_stencil():
    # Same axis: one merged per-position stencil, each neighbour once (d_x d_x inside: the
    # 5-point stencil with zero weights at +-1 dropped); across axes: the product of widths;
    # with an operator that is not local: not a stencil (whole grid, then gathered).
    grid = _grid(("y",))
    points = jnp.arange(grid.size)
    neighbours, weights = LOCAL["compose_xx"].point_stencil(grid, points)
    assert neighbours.shape == (grid.size, 4)  # 3 inside, 4 next to the (one-sided) ends
    inside = np.asarray(weights)[np.asarray(neighbours)[:, 0] // 6 % 10 == 3]
    h = grid.spacing("x")
    assert np.allclose(
        np.sort(np.abs(inside[:, :3]), axis=1)[0], np.array([0.25, 0.25, 0.5]) / h**2, rtol=1e-14
    )
    for index in np.asarray(neighbours):
        assert len(set(index.tolist())) >= 3
    assert LOCAL["compose"].point_stencil(grid, points)[0].shape == (grid.size, 9)
    user = ops.Compose(ops.FiniteDifference("x"), LOCAL["user"])
    assert user.point_stencil(grid, points) is None
    field = jnp.sin(jnp.arange(grid.size, dtype=jnp.float64)).reshape(grid.shape)
    assert _close(user.at_points(field, grid, points), flat_field(user(field, grid), grid))


def test_custom_operator_falls_back_to_full_grid(getkey):
    class Shift(ops.AbstractOperator):
        def __call__(self, field, grid):
            return jnp.roll(field, 1, axis=grid.axis("x"))

    grid = _grid(())
    field = jr.normal(getkey(), grid.shape)
    points = jnp.arange(0, grid.size, 7)
    op = 3.0 * Shift() + ops.FiniteDifference("t")
    assert op.point_stencil(grid, points) is None
    expected = flat_field(op(field, grid), grid)[points]
    assert _close(op.at_points(field, grid, points), expected)


def _full_grid_rows(pde, basis, grid, data, partition, scope, problems):
    """The stacks and condition matrices as the whole-grid operators gathered (the previous
    construction), for comparison."""
    from hcmoe._partition import ExpertRows
    from hcmoe._pde import ansatz

    transformed, particular, conditions = ansatz(pde, basis, grid, data)
    rows = jnp.maximum(problems.points, 0)
    stacks = {
        name: flat_field(op(transformed, grid), grid)[rows] for name, op in pde.operators().items()
    }
    offsets = {
        name: (
            jnp.zeros(rows.shape)
            if particular is None
            else flat_field(op(particular, grid), grid)[rows]
        )
        for name, op in pde.operators().items()
    }
    members = partition.members(grid)
    matrices = []
    for cond in (c for c in conditions if not c.exact):
        axis, face = grid.axis(cond.axis), cond.face_index(grid)
        if (cond.scope if scope is None else scope) == "global":
            owned = np.ones((members.shape[0], int(np.prod(cond.face_shape(grid)))), bool)
        else:
            owned = np.take(members, face, axis=axis + 1).reshape(members.shape[0], -1)
        face_rows = jnp.take(cond.operator(transformed, grid), face, axis=axis)
        matrices.append(face_rows.reshape(-1, basis.shape[-1])[ExpertRows.from_masks(owned).index])
    return stacks, offsets, jnp.concatenate(matrices, axis=1) if matrices else None


def _shipped_problems(key):
    from hcmoe.problems import diffusion_sorption as ds, heat, navier_stokes as ns

    ds_grid = ds.make_grid(nt=9, nx=16)
    u0 = {"u0": jnp.full((16,), 0.1)}
    heat_grid = heat.make_grid(nt=8, nx=12)
    ns_grid = ns.make_grid(nt=5, n=8)
    w0 = {"w0": ns.sample_initial_conditions(key, 1, ns_grid)[0]}
    return [
        (ds.formulation("hcmoe"), ds_grid, u0, hcmoe.Partition(x=3), None),
        (
            ds.formulation("paper", time_derivative="backward"),
            ds_grid,
            u0,
            hcmoe.Partition(t=2, x=2, overlap=0.1),
            "owned",
        ),
        (
            heat.Heat(),
            heat_grid,
            {"u0": jnp.sin(np.pi * jnp.asarray(heat_grid.coords("x")))},
            hcmoe.Partition(x=2),
            None,
        ),
        (ns.NavierStokes(), ns_grid, w0, hcmoe.Partition(x=2, y=2), None),
    ]


@pytest.mark.filterwarnings("ignore::hcmoe.ConditionWarning")
@pytest.mark.parametrize("case", range(4), ids=["ds", "ds_paper_bdf", "heat", "ns"])
def test_shipped_problems_rows_equal_full_grid(getkey, case):
    from hcmoe._rows import build_problems

    pde, grid, data, partition, scope = _shipped_problems(getkey())[case]
    basis = jr.normal(getkey(), grid.shape + (4,))
    problems, _, _ = build_problems(
        basis, pde, grid, data, partition, 20, getkey(), condition_scope=scope
    )
    stacks, offsets, matrix = _full_grid_rows(pde, basis, grid, data, partition, scope, problems)
    valid = problems.pde_valid[..., None]
    for name in stacks:
        assert _close(
            jnp.where(valid, problems.stacks[name], 0.0), jnp.where(valid, stacks[name], 0.0)
        ), name
        assert _close(
            jnp.where(valid[..., 0], problems.offsets[name], 0.0),
            jnp.where(valid[..., 0], offsets[name], 0.0),
        ), name
    if matrix is not None:
        assert _close(problems.cond_matrix, matrix)
