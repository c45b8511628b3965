"""Layer 1: matrix-free algorithms on any symmetric matvec over pytrees (built on the base only).

Modules: `tridiag` (``lanczos``), `eigen`
(``eigsh``), `power` (``power_iteration``),
`linear` (``cg``), `solvers` (the solver
values ``Eigsh``, ``CG``, ``PowerIteration``, ``Lanczos``),
`stochastic` (Hutchinson trace and diagonal),
`density` (``spectral_density``),
`checks` (``check_symmetric``). The Lanczos-type algorithms
share one engine (`_band`) and one product loop
(`_driver`), which also drives host-streamed operators.
"""

from curvlib.krylov.checks import SymmetryCheck, check_symmetric
from curvlib.krylov.density import SpectralDensity, spectral_density
from curvlib.krylov.eigen import EigshResult, eigsh
from curvlib.krylov.linear import CGResult, cg
from curvlib.krylov.power import PowerIterationResult, power_iteration
from curvlib.krylov.solvers import CG, Eigsh, Lanczos, PowerIteration
from curvlib.krylov.stochastic import MonteCarloEstimate, hutchinson_diag, hutchinson_trace
from curvlib.krylov.tridiag import LanczosResult, lanczos

__all__ = [
    # solver values: the options of each algorithm, defaulted and checked once
    "Eigsh",
    "CG",
    "PowerIteration",
    "Lanczos",
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
    "MonteCarloEstimate",
    "hutchinson_diag",
    "hutchinson_trace",
    "spectral_density",
]


def __getattr__(name):
    if name == "StochasticEstimate":  # deprecated alias of MonteCarloEstimate (warns)
        from curvlib.krylov import stochastic

        return stochastic.__getattr__(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
