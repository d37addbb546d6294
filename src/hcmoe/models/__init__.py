"""Reference backbones that output basis functions on a grid."""

from ._input import grid_input as grid_input
from .fno import (
    FNO as FNO,
    FourierLayer as FourierLayer,
    Pointwise as Pointwise,
    SpectralConvolution as SpectralConvolution,
    fno_input as fno_input,
)
