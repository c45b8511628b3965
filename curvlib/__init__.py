"""curvlib: curvature for JAX.

Layers, each built only on those below it (as its imports say):

0. the base, private top-level modules every package shares: pytree algebra
   and layouts (``_tree``), argument checks (``_validate``), compile caching
   and operator properties (``_compile``), the routing of an optax
   transform's ``value_fn`` (``_loss``) and the status codes (``_status``);
1. algorithms ([`curvlib.krylov`][curvlib.krylov]): Lanczos, thick-restart eigsh, power
   iteration, CG, Hutchinson and stochastic Lanczos quadrature on any matvec;
   they know nothing about losses;
2. operators ([`curvlib.operators`][curvlib.operators]): Hessian-, Gauss-Newton- and
   microbatched curvature products on pytrees, and the operators built on
   layer 1 (``inverse_matvec`` on CG or eigsh, ``block_eigsh``);
3. uses: second-order optax transforms ([`curvlib.optim`][curvlib.optim], and K-FAC in
   [`curvlib.kronecker`][curvlib.kronecker], which needs only the base) and
   [`curvlib.landscape`][curvlib.landscape].

No package imports another's private modules or names: what two packages
share lives in the base.
"""

__version__ = "0.1.0"

from curvlib import kronecker as kronecker  # K-FAC; its own namespace: curvlib.kronecker.*
from curvlib import landscape as landscape  # its own namespace: curvlib.landscape.*
from curvlib import operators, optim
from curvlib._compile import compile_behind, enable_compilation_cache
from curvlib._progress import show_progress
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
    CGResult,
    Eigsh,
    EigshResult,
    Lanczos,
    LanczosResult,
    MonteCarloEstimate,
    PowerIteration,
    PowerIterationResult,
    SpectralDensity,
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
from curvlib.operators import *  # noqa: F403  (the names in operators.__all__, listed there once)
from curvlib.optim import *  # noqa: F403  (the names in optim.__all__, listed there once)

__all__ = [
    "__version__",
    "enable_compilation_cache",
    "compile_behind",
    "show_progress",
    # one status convention for every result
    "Status",
    "status_message",
    "raise_if_failed",
    "CurvatureError",
    # operators: the names in operators.__all__, listed there once
    *operators.__all__,
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
    "MonteCarloEstimate",
    "spectral_density",
    "SpectralDensity",
]
# optimizers (optax transforms) and curvature monitoring: re-exported from curvlib.optim
__all__ += optim.__all__
# K-FAC (curvlib.kronecker: layer discovery, factors, the optax transform)
__all__ += ["kfac_curvature", "KfacCurvature", "scale_by_kfac", "kfac", "ScaleByKfacState",
            "KfacInfo"]


def __getattr__(name):
    if name == "StochasticEstimate":  # deprecated alias of MonteCarloEstimate (warns)
        from curvlib.krylov import stochastic

        return stochastic.__getattr__(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
