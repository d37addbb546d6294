"""Linear operators on grid fields (implemented in `hcmoe._operators`)."""

from ._operators import (
    AbstractOperator as AbstractOperator,
    BackwardDifference as BackwardDifference,
    Combination as Combination,
    Compose as Compose,
    FiniteDifference as FiniteDifference,
    Identity as Identity,
    InverseLaplacian as InverseLaplacian,
    Laplacian as Laplacian,
    Linear as Linear,
    Spectral as Spectral,
    VelocityFromVorticity as VelocityFromVorticity,
    fd_weights as fd_weights,
)
