"""curvlib: curvature for JAX.

Three layers, each built only on the one below:

1. operators (:mod:`curvlib.operators`): Hessian-, Gauss-Newton- and
   microbatched curvature products on pytrees;
2. algorithms (:mod:`curvlib.krylov`): Lanczos, thick-restart eigsh, power
   iteration, CG, Hutchinson and stochastic Lanczos quadrature on any matvec;
3. uses: second-order optax transforms and :mod:`curvlib.landscape`.
"""

__version__ = "0.1.0"

from curvlib import kronecker as kronecker  # K-FAC; its own namespace: curvlib.kronecker.*
from curvlib import landscape as landscape  # its own namespace: curvlib.landscape.*
from curvlib import optim
from curvlib._compile import enable_compilation_cache
from curvlib._status import CurvatureError, Status, raise_if_failed, status_message
from curvlib.kronecker import (
    KfacCurvature,
    KfacInfo,
    ScaleByKfacState,
    kfac,
    kfac_curvature,
    scale_by_kfac,
)
from curvlib.krylov import (
    CG,
    Eigsh,
    Lanczos,
    PowerIteration,
    CGResult,
    EigshResult,
    LanczosResult,
    PowerIterationResult,
    SpectralDensity,
    StochasticEstimate,
    SymmetryCheck,
    cg,
    check_symmetric,
    eigsh,
    hutchinson_diag,
    hutchinson_trace,
    lanczos,
    power_iteration,
    spectral_density,
)
from curvlib.operators import (
    InverseMatvec,
    InverseSolve,
    StreamMatvec,
    block_eigsh,
    empirical_fisher_matvec,
    fisher_matvec,
    ggn_matvec,
    gradient,
    hessian_matvec,
    hvp,
    inverse_matvec,
    jacobian_matvec,
    jacobian_transpose_matvec,
    microbatch_mean,
    restrict,
    stream_gradient,
    stream_matvec,
    stream_mean,
)
from curvlib.optim import *  # noqa: F403  (the names in optim.__all__, listed there once)

__all__ = [
    "__version__",
    "enable_compilation_cache",
    # one status convention for every result
    "Status",
    "status_message",
    "raise_if_failed",
    "CurvatureError",
    # operators
    "hvp",
    "hessian_matvec",
    "ggn_matvec",
    "gradient",
    "microbatch_mean",
    "fisher_matvec",
    "empirical_fisher_matvec",
    "jacobian_matvec",
    "jacobian_transpose_matvec",
    "restrict",
    "block_eigsh",
    "inverse_matvec",
    "InverseMatvec",
    "InverseSolve",
    "stream_mean",
    "stream_matvec",
    "stream_gradient",
    "StreamMatvec",
    # algorithms; their options as solver values (one place of defaults and checks)
    "Eigsh",
    "CG",
    "PowerIteration",
    "Lanczos",
    "lanczos",
    "LanczosResult",
    "eigsh",
    "EigshResult",
    "power_iteration",
    "PowerIterationResult",
    "cg",
    "CGResult",
    "check_symmetric",
    "SymmetryCheck",
    "hutchinson_trace",
    "hutchinson_diag",
    "StochasticEstimate",
    "spectral_density",
    "SpectralDensity",
]
# optimizers (optax transforms) and curvature monitoring: re-exported from curvlib.optim
__all__ += optim.__all__
# K-FAC (curvlib.kronecker: layer discovery, factors, the optax transform)
__all__ += ["kfac_curvature", "KfacCurvature", "scale_by_kfac", "kfac", "ScaleByKfacState",
            "KfacInfo"]
