"""Benchmark problems: PDE, initial-condition sampler, reference solver and cached datasets.

- `hcmoe.problems.diffusion_sorption`: 1-D diffusion–sorption (PDEBench), implicit finite volumes.
- `hcmoe.problems.navier_stokes`: 2-D periodic Navier–Stokes (vorticity), pseudo-spectral.
- `hcmoe.problems.heat`: 1-D heat equation with an exact solution (tests, quickstart).

Each module has the same functions: `grid(size)`, `make_grid(...)`,
`sample_initial_conditions(key, n, grid)`, `reference_solution(initial_condition, grid,
**constants)` and `make_dataset(split, n, size, ...)`.
"""

from . import diffusion_sorption as diffusion_sorption, heat as heat, navier_stokes as navier_stokes
from .diffusion_sorption import DiffusionSorption as DiffusionSorption
from .heat import Heat as Heat
from .navier_stokes import NavierStokes as NavierStokes
