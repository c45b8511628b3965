"""Layer 3: second-order optimisers as optax transforms, and curvature monitoring.

Built on [`curvlib.operators`][curvlib.operators] (curvature products),
[`curvlib.krylov`][curvlib.krylov] (CG, eigsh, Hutchinson) and the base (``curvlib._loss``: the
``value_fn`` routing).

Every transform follows optax's contract: ``scale_by_<algo>(...)`` returns an
`optax.GradientTransformationExtraArgs` whose
``update(updates, state, params, *, value_fn, **extra_args)`` takes the loss on
the current batch as ``value_fn(params, **kw)`` (``kw``: the extra arguments
``value_fn`` names, the convention of optax's line searches) and outputs a
direction with the gradient's sign; ``<algo>(learning_rate, ...)`` is the
``optax.chain`` with the learning rate (sign flip) and an optional line search,
as `optax.lbfgs` is built. States are ``ScaleBy<Algo>State`` with an
``info`` NamedTuple of diagnostics. L-BFGS is not re-implemented: use
`optax.lbfgs` in the same loop.

One calling convention for all of them (``newton_cg``, ``newton``, ``bfgs``,
``svrg``, ``track_curvature``): ``value_fn`` is the only extra argument they
need. ``value=``/``grad=`` (the loss and gradient at ``params``) are reused
when passed, so they run unchanged in

* a plain step: ``opt.update(grads, state, params, value_fn=loss, batch=batch)``;
* the loop `optax.lbfgs` documents, with
  `optax.value_and_grad_from_state`;
* flax: ``nnx.Optimizer(model, opt, wrt=nnx.Param).update(model, grads,
  value_fn=loss)`` (``loss`` then takes the ``nnx.Param`` state) or a linen
  ``TrainState`` step.

``has_aux=True`` accepts a ``value_fn`` returning ``(loss, aux)``. Every error
about the call names the argument and what to pass (the extra arguments that
were received, a leaf of ``params`` by its pytree path).
"""

from curvlib.optim.dense_newton import NewtonInfo, ScaleByNewtonState, newton, scale_by_newton
from curvlib.optim.hessian_free import (
    NewtonCGInfo,
    ScaleByNewtonCGState,
    newton_cg,
    scale_by_newton_cg,
)
from curvlib.optim.quasi_newton import BFGSInfo, ScaleByBFGSState, bfgs, scale_by_bfgs
from curvlib.optim.report import curvature_history, format_curvature_table, plot_curvature
from curvlib.optim.track import (
    TrackCurvatureInfo,
    TrackCurvatureState,
    curvature_info,
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
