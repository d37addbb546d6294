"""Linear operators on grid fields.

Every operator maps a field of shape `(*grid.shape, *trailing)` to one of the same shape,
acting on the grid axes only, so the same code applies it to a solution `u` (no trailing
axes) and to a whole stack of basis functions `B` (one trailing basis axis) at once.
Operators combine linearly: `ops.Identity() - 0.5 * ops.FiniteDifference("x")`.

The constraint solve needs an operator's values only at the sampled points, so every operator
also has `at_points(field, grid, points)`. Local operators (finite differences, identity, their
combinations) say which neighbours each point needs (`point_stencil`) and are evaluated there
directly, `O(points x stencil)` instead of `O(grid)`; the others (spectral operators, user
callables, compositions) are applied on the whole grid and gathered. `operators_at_points`
evaluates a dict of operators at once, sharing one real FFT among the Fourier multipliers.

Modules: `_base` (the algebra), `_finite_difference`, `_spectral`, `_evaluation`.
"""

from ._base import (
    AbstractOperator as AbstractOperator,
    Combination as Combination,
    Compose as Compose,
    Identity as Identity,
    Linear as Linear,
    flat_field as flat_field,
)
from ._evaluation import (
    evaluate_at_expert_points as evaluate_at_expert_points,
    evaluate_at_points as evaluate_at_points,
    operators_at_points as operators_at_points,
    whole_grid_values as whole_grid_values,
)
from ._finite_difference import (
    BackwardDifference as BackwardDifference,
    FiniteDifference as FiniteDifference,
    fd_weights as fd_weights,
)
from ._spectral import (
    InverseLaplacian as InverseLaplacian,
    Laplacian as Laplacian,
    Spectral as Spectral,
    VelocityFromVorticity as VelocityFromVorticity,
)
