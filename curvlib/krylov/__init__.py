"""Layer 2: matrix-free algorithms on any symmetric matvec over pytrees."""

from curvlib.krylov.cg import CGResult, cg
from curvlib.krylov.checks import SymmetryCheck, check_symmetric
from curvlib.krylov.eigsh import EigshResult, eigsh
from curvlib.krylov.lanczos import LanczosResult, lanczos
from curvlib.krylov.power import PowerIterationResult, power_iteration
from curvlib.krylov.stochastic import (
    SpectralDensity,
    StochasticEstimate,
    hutchinson_diag,
    hutchinson_trace,
    spectral_density,
)

__all__ = [
    "CGResult",
    "cg",
    "SymmetryCheck",
    "check_symmetric",
    "EigshResult",
    "eigsh",
    "LanczosResult",
    "lanczos",
    "PowerIterationResult",
    "power_iteration",
    "SpectralDensity",
    "StochasticEstimate",
    "hutchinson_diag",
    "hutchinson_trace",
    "spectral_density",
]
