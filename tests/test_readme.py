import pathlib
import re

import jax


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    section = text.split("## A PDE of your own", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    try:
        exec(compile(code, str(README), "exec"), namespace)
    finally:
        jax.config.update("jax_enable_x64", True)
    solution = namespace["solution"]
    grid = namespace["grid"]
    assert solution.u.shape == grid.shape
    assert solution.weights.shape == (4, 8)
    assert bool(solution.stats.converged.all())
    assert "(32, 64) (4, 8)" in capsys.readouterr().out


def test_readme_forcing_field_example_runs(capsys):
    section = README.read_text().split("### Data on the grid", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    forced, grid = namespace["forced"], namespace["grid"]
    assert forced.u.shape == grid.shape
    assert "(16, 32) (2, 100)" in capsys.readouterr().out
    # The IC is exact, and the forcing reached the residual at the sampled points: the solve
    # with it fits the forced PDE better than the same solve told f = 0.
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    import hcmoe
    from hcmoe import losses

    np.testing.assert_allclose(forced.u[0], 0.0, atol=1e-12)
    pde, f, basis = namespace["ForcedHeat"](), namespace["f"], namespace["basis"]
    data = {"f": f, "u0": jnp.zeros(32)}
    unforced = hcmoe.solve(
        basis,
        pde,
        hcmoe.Partition(x=2),
        grid,
        {"f": jnp.zeros_like(f), "u0": jnp.zeros(32)},
        key=jr.key(1),
        rows=hcmoe.Rows(points_per_expert=100),
    )
    assert float(losses.residual_loss(forced.u, pde, grid, data)) < 0.5 * float(
        losses.residual_loss(unforced.u, pde, grid, data)
    )
