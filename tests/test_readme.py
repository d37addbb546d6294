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
