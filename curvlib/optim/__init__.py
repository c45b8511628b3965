"""Layer 3: second-order optimisers as optax transforms.

Every transform follows optax's contract: ``scale_by_<algo>(...)`` returns an
:class:`optax.GradientTransformationExtraArgs` whose
``update(updates, state, params, *, value_fn, **extra_args)`` takes the loss on
the current batch as ``value_fn(params, **kw)`` (``kw``: the extra arguments
``value_fn`` names, the convention of optax's line searches) and outputs a
direction with the gradient's sign; ``<algo>(learning_rate, ...)`` is the
``optax.chain`` with the learning rate (sign flip) and an optional line search,
as :func:`optax.lbfgs` is built. States are ``ScaleBy<Algo>State`` with an
``info`` NamedTuple of diagnostics. L-BFGS is not re-implemented: use
:func:`optax.lbfgs` in the same loop.
"""

from curvlib.optim.dense_newton import NewtonInfo, ScaleByNewtonState, newton, scale_by_newton
from curvlib.optim.hessian_free import (
    NewtonCGInfo,
    ScaleByNewtonCGState,
    newton_cg,
    scale_by_newton_cg,
)
from curvlib.optim.quasi_newton import BFGSInfo, ScaleByBFGSState, bfgs, scale_by_bfgs
from curvlib.optim.track import (
    TrackCurvatureInfo,
    TrackCurvatureState,
    curvature_history,
    curvature_info,
    format_curvature_table,
    plot_curvature,
    track_curvature,
)
from curvlib.optim.variance_reduced import ScaleBySVRGState, SVRGInfo, scale_by_svrg, svrg

__all__ = [
    "scale_by_newton_cg",
    "newton_cg",
    "ScaleByNewtonCGState",
    "NewtonCGInfo",
    "scale_by_newton",
    "newton",
    "ScaleByNewtonState",
    "NewtonInfo",
    "scale_by_bfgs",
    "bfgs",
    "ScaleByBFGSState",
    "BFGSInfo",
    "scale_by_svrg",
    "svrg",
    "ScaleBySVRGState",
    "SVRGInfo",
    "track_curvature",
    "TrackCurvatureState",
    "TrackCurvatureInfo",
    "curvature_info",
    "curvature_history",
    "format_curvature_table",
    "plot_curvature",
]
