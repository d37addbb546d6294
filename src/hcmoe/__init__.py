"""hcmoe: physics-hard-constrained neural PDE solvers in JAX, scaled with mixture-of-experts."""

import importlib.metadata

from . import (
    data as data,
    losses as losses,
    methods as methods,
    models as models,
    ops as ops,
    problems as problems,
    training as training,
)
from ._constrain import Constrained as Constrained, constrain as constrain
from ._coupling import (
    AbstractCoupling as AbstractCoupling,
    Coupled as Coupled,
    Independent as Independent,
    Joint as Joint,
)
from ._grid import Grid as Grid, uniform_grid as uniform_grid
from ._jaxlib_check import JaxlibHangWarning as JaxlibHangWarning
from ._levenberg_marquardt import (
    LevenbergMarquardt as LevenbergMarquardt,
    TrustRegion as TrustRegion,
    WarmStart as WarmStart,
)
from ._partition import (
    AbstractPartition as AbstractPartition,
    LabelPartition as LabelPartition,
    Partition as Partition,
    random_labels as random_labels,
)
from ._pde import (
    AbstractPDE as AbstractPDE,
    Condition as Condition,
    dirichlet as dirichlet,
    initial as initial,
    neumann as neumann,
    require as require,
    robin as robin,
)
from ._pdedata import MissingDataError as MissingDataError, PDEData as PDEData
from ._results import RESULTS as RESULTS, Solution as Solution, SolveStats as SolveStats
from ._rows import ConditionWarning as ConditionWarning, Rows as Rows
from ._sharding import expert_mesh as expert_mesh
from ._solve import PrecisionWarning as PrecisionWarning, solve as solve


__version__ = importlib.metadata.version("hcmoe")
