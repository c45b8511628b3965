"""Layer 2: matrix-free algorithms on any symmetric matvec over pytrees.

Modules: :mod:`~curvlib.krylov.tridiag` (``lanczos``), :mod:`~curvlib.krylov.eigen`
(``eigsh``), :mod:`~curvlib.krylov.power` (``power_iteration``),
:mod:`~curvlib.krylov.linear` (``cg``), :mod:`~curvlib.krylov.solvers` (the solver
values ``Eigsh``, ``CG``, ``PowerIteration``, ``Lanczos``),
:mod:`~curvlib.krylov.stochastic` (Hutchinson trace and diagonal),
:mod:`~curvlib.krylov.density` (``spectral_density``),
:mod:`~curvlib.krylov.checks` (``check_symmetric``). The Lanczos-type algorithms
share one engine (:mod:`~curvlib.krylov._band`) and one product loop
(:mod:`~curvlib.krylov._driver`), which also drives host-streamed operators.
"""

from curvlib.krylov.checks import SymmetryCheck, check_symmetric
from curvlib.krylov.density import SpectralDensity, spectral_density
from curvlib.krylov.eigen import EigshResult, eigsh
from curvlib.krylov.linear import CGResult, cg
from curvlib.krylov.solvers import CG, Eigsh, Lanczos, PowerIteration
from curvlib.krylov.power import PowerIterationResult, power_iteration
from curvlib.krylov.stochastic import StochasticEstimate, hutchinson_diag, hutchinson_trace
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
    "StochasticEstimate",
    "hutchinson_diag",
    "hutchinson_trace",
    "spectral_density",
]
