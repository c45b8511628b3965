r"""Newton-CG / Hessian-free optimisation as an optax transform (Martens 2010).

Each step solves the damped Newton system

$$
(C + \lambda I)\, p = g
$$

by truncated conjugate gradients ([`curvlib.cg`][curvlib.cg]), with ``C`` the Hessian of
the loss (default) or a generalised Gauss-Newton matrix, and outputs ``p`` (the
gradient's sign; the learning rate and sign flip are the next link of the
chain). The Hessian-free ingredients of Martens (2010):

* **Levenberg-Marquardt damping from the reduction ratio.** After the solve the
  transform evaluates the loss at the full step and compares it with the
  undamped quadratic model $q(-p) = -g^\top p + \tfrac12 p^\top C p$:

  $$
  \rho = \frac{f(\theta - p) - f(\theta)}{q(-p)},\qquad
  \lambda \leftarrow \begin{cases}
    \lambda \cdot \texttt{damping\_increase} & \rho < 1/4 \\
    \lambda \cdot \texttt{damping\_decrease} & \rho > 3/4 \\
    \lambda & \text{otherwise,}
  \end{cases}
  $$

  clipped to ``[min_damping, max_damping]``. A step that does not decrease the
  loss (``rho <= 0`` or a non-finite trial loss) is *rejected*: the transform
  outputs zeros, so the parameters stay put and the next step retries with more
  damping (a trust-region safeguard; ``info.accepted`` reports it); ``lambda``
  is then also raised at least to the curvature scale of the rejected
  direction, $|p^\top C p| / \|p\|^2$, which roughly halves the next
  step whatever ``lambda`` was. A step the parameters cannot take (below their
  precision: ``theta - p == theta``) lowers ``lambda`` by ``damping_decrease``: more
  damping would only shrink the next step further below it, and a longer one moves
  them (a rejected step then raises ``lambda`` back in O(1) steps).
* **CG warm start** from ``warm_start_decay`` times the previous solution.
* **CG step cap** (``cg.max_steps``) and **relative-residual tolerance**
  ``||r|| <= eta ||g||`` with the superlinear forcing
  ``eta = min(cg.rtol, sqrt(||g||))`` (Nocedal & Wright 2006, Alg. 7.1).
* **Negative-curvature exit** (Steihaug 1983): CG stops at the last iterate
  before a direction of non-positive curvature. Should that iterate not be a
  descent direction (a bad warm start), or be the warm start itself (a negative
  direction at the very first CG step) the transform falls back to the gradient
  scaled by its absolute
  Rayleigh quotient, $p = g\,\|g\|^2 / (|g^\top C g| + \lambda\|g\|^2)$
  (one extra product, inside a ``lax.cond``: paid only when taken, except
  under ``vmap`` where both branches run).

Gauss-Newton curvature (``ggn=(model_fn, loss_fn)``)
---------------------------------------------------
The user splits the loss into a model and an output loss with the *same*
keyword routing as ``value_fn``:

    value_fn(params, **kw) == loss_fn(model_fn(params, **kw), **kw)

Each of ``value_fn``, ``model_fn`` and ``loss_fn`` receives the extra arguments
of ``update`` whose names appear in its own signature (e.g. ``model_fn(params,
x)``, ``loss_fn(logits, y)``, ``value_fn(params, x, y)`` and
``update(..., value_fn=value_fn, x=x, y=y)``), so a jitted training step passes
its batch once. ``C = J^T H_l J`` with ``J`` the Jacobian of ``model_fn`` and
``H_l`` the Hessian of ``loss_fn`` in the outputs ([`curvlib.ggn_matvec`][curvlib.ggn_matvec]):
positive semi-definite for a convex output loss (Schraudolph 2002).

The reduction ratio measures the objective whose gradient is the incoming
update. Where the update is ``value_fn``'s own gradient (to rounding) that is
``value_fn``; where a transform earlier in the chain changed it (weight decay,
clipping, an accumulated gradient) by ``d = updates - grad``, the difference is
taken as the gradient of a term linear over the step: the model uses the
update as its gradient and the measured change is
$f(w - p) - f(w) - d^\top p$ (`upstream_shift`). So
``chain(optax.add_decayed_weights(wd), newton_cg())`` has the minimiser of
$f + \tfrac{wd}{2}\|w\|^2$ as its fixed point, as optax's first-order chains do, and
reaches it while ``wd`` is small beside the curvature of $f$. The decay's own curvature
$wd\,I$ and the $\tfrac{wd}{2}\|p\|^2$ it adds to a step's change are not in the model
(only ``value_fn`` is differentiated): where ``wd`` exceeds the smallest curvature of $f$
the model's steps overshoot along the flat directions, steps that raise the regularised
objective are accepted, and the iteration can circle without converging (measured: ``wd =
0.7`` over a quartic whose Hessian's smallest eigenvalue is 0.12). Put such a regulariser
in ``value_fn`` (``loss(w) + wd / 2 * sum(w**2)``), where the products see it.

Hyperparameters and wrappers
----------------------------
* ``optax.inject_hyperparams(newton_cg)(damping=...)``: every numeric
  argument is read at each step; ``damping`` is the *initial* value of an
  adapted quantity kept in the state, and a newly injected value (different
  from the one seen at the previous step, ``state.damping_setting``) replaces
  the adapted damping, which then adapts from it. The ``cg`` value (a
  [`curvlib.CG`][curvlib.CG]) and ``microbatch_size`` fix loop bounds and shapes:
  they are static.
* ``optax.MultiSteps(newton_cg(), k)`` averages the gradient over ``k``
  micro-batches but passes the inner update only the last micro-step's extra
  arguments. The step then solves ``(C_B + lambda I) p = mean gradient`` with
  ``C_B`` the curvature of the last micro-batch's ``value_fn`` (a
  sub-sampled-curvature Newton step, Byrd et al. 2011), and ``rho`` measures
  that ``value_fn`` plus the other micro-batches' gradient as a linear term (the
  mean loss to first order in the other batches, above). MultiSteps also runs the
  inner update, CG solve included, at every micro-step and keeps only the last.
  To use a large batch at bounded memory prefer ``microbatch_size`` (the
  curvature of the whole batch,
  accumulated chunk by chunk); for the full-batch step under MultiSteps pass a
  ``value_fn`` over the whole accumulated batch at the last micro-step.

Cost per step (``k`` CG steps): one linearisation of the loss's gradient (it
also gives the loss and gradient at ``params``), up to ``k + 3`` curvature
products (``k`` for CG's steps, one for its warm start, one for its true
residual, one for $\rho$'s model decrease; ``info.num_matvecs`` counts them),
one loss evaluation at the trial point. With a
Gauss-Newton split, another ``mode`` or ``microbatch_size``, the loss and
gradient at ``params`` cost one gradient evaluation unless ``value=`` and
``grad=`` are passed. Memory: the linearisation residuals plus five
parameter-sized CG vectors and the stored warm start.

References:
  J. Martens, *Deep learning via Hessian-free optimization*, ICML 2010.
  J. Martens and I. Sutskever, *Training deep and recurrent networks with
  Hessian-free optimization*, Neural Networks: Tricks of the Trade, 2012.
  T. Steihaug, *The conjugate gradient method and trust regions in large scale
  optimization*, SIAM J. Numer. Anal. 1983.
  J. Nocedal and S. Wright, *Numerical Optimization*, 2nd ed., 2006, ch. 7.
  R. Byrd, G. Chin, W. Neveitt and J. Nocedal, *On the use of stochastic Hessian
  information in optimization methods for machine learning*, SIAM J. Optim. 2011.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvlib import _deprecation, _tree, _validate, _xp
from curvlib._status import Status, from_flags
from curvlib.krylov import cg
from curvlib.krylov.solvers import CG, resolve
from curvlib.optim import _common

# the inner solve of a truncated Newton step: a forcing-term cap of 1/2, not an exact solve
TRUNCATED_CG = CG(rtol=0.5)

PyTree = Any

DEFAULT_MAX_CG_STEPS = 100


def _deprecated_field(cls: str, old: str, new: str):
    """A read-only property ``old`` that warns and returns the field ``new``."""

    def get(self):
        _deprecation.deprecated(f"`{cls}.{old}` is deprecated; use `{cls}.{new}`.")
        return getattr(self, new)

    get.__doc__ = f"Deprecated: the old name of ``{new}``."
    return property(get)


class NewtonCGInfo(NamedTuple):
    """Diagnostics of the last [`scale_by_newton_cg`][curvlib.scale_by_newton_cg] step.

    Attributes:
      num_steps: CG iterations of the solve (the name of [`curvlib.CGResult`][curvlib.CGResult]'s
        field; ``num_cg_steps``, its old name, still reads it with a
        ``DeprecationWarning``).
      residual_norm: final CG residual ``||g - (C + lambda I) p||``.
      damping: the ``lambda`` used in this step.
      rho: reduction ratio ``(f(theta - p) - f(theta)) / q(-p)``.
      negative_curvature: CG met a direction of non-positive curvature.
      accepted: the step decreased the loss and was output (else zeros); a step that
        leaves the loss unchanged is accepted only where the quadratic model predicts
        no decrease either (a stationary point), else it is a stall (below the precision
        of the parameters or of the loss).
      skipped: the loss, the gradient or a curvature product was non-finite;
        the step output zeros and the state was left as it was.
      loss: the loss at the incoming ``params``.
      converged: CG met its tolerance (``cg``'s ``rtol``, the forcing term) within its
        ``max_steps``.
      finite: the loss, gradient, products and step were finite (``~skipped``).
      num_matvecs: curvature products of the step: CG's, one for the model decrease
        ``p^T C p``, and one for the gradient fallback when CG's iterate was not a
        descent direction.
      status: the [`curvlib.Status`][curvlib.Status] code, most serious first: ``NONFINITE``
        (skipped), ``STALLED`` (the step was rejected: zeros were output; inside
        an alias with a line search, also a line search that failed to decrease
        the loss), ``NEGATIVE_CURVATURE`` (an accepted step on which CG met it;
        informational: the step handles it), ``STALLED`` also for an accepted step whose
        CG stopped short of its tolerance before ``max_steps`` (the attainable accuracy,
        as its [`CGResult`][curvlib.CGResult] reports), ``MAX_STEPS`` (CG spent its
        ``max_steps`` without converging), else ``SUCCESS``. A rejected step reads
        ``STALLED`` also when CG met negative curvature (``negative_curvature`` still
        says so).
    """

    num_steps: jax.Array
    residual_norm: jax.Array
    damping: jax.Array
    rho: jax.Array
    negative_curvature: jax.Array
    accepted: jax.Array
    skipped: jax.Array
    loss: jax.Array
    converged: jax.Array = True
    finite: jax.Array = True
    num_matvecs: jax.Array = 0
    status: jax.Array = Status.SUCCESS

    num_cg_steps = _deprecated_field("NewtonCGInfo", "num_cg_steps", "num_steps")


class ScaleByNewtonCGState(NamedTuple):
    """State of [`scale_by_newton_cg`][curvlib.scale_by_newton_cg].

    Attributes:
      count: number of ``update`` calls.
      damping: the Levenberg-Marquardt ``lambda`` for the next step (adapted).
      damping_setting: the ``damping`` argument seen at the last step; when the
        argument changes (e.g. a new value injected with
        ``optax.inject_hyperparams``) the adapted ``damping`` restarts from it.
      solution: the last CG solution (the next warm start, before decay).
      info: [`NewtonCGInfo`][curvlib.NewtonCGInfo] of the last step.
    """

    count: jax.Array
    damping: jax.Array
    damping_setting: jax.Array
    solution: PyTree
    info: NewtonCGInfo


# ------------------------------------------------------------- named steps


def current_damping(state: ScaleByNewtonCGState, damping) -> jax.Array:
    """The ``lambda`` of this step: the adapted one, or ``damping`` when the setting changed.

    ``damping`` is the transform's argument (a traced value under
    ``optax.inject_hyperparams``); a value different from ``state.damping_setting``
    is a new setting and replaces the adapted damping.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim import scale_by_newton_cg
      >>> from curvlib.optim.hessian_free import current_damping
      >>> state = scale_by_newton_cg(damping=1.0).init(jnp.zeros(2))
      >>> state = state._replace(damping=jnp.asarray(0.1))  # adapted since
      >>> round(float(current_damping(state, 1.0)), 6), float(current_damping(state, 5.0))
      (0.1, 5.0)
    """
    setting = jnp.asarray(damping).astype(state.damping.dtype)
    return jnp.where(setting != state.damping_setting, setting, state.damping)


def _solve(matvec, g, x0, damping, rtol, max_steps, atol=0.0):
    """Truncated CG for ``(C + damping I) p = g`` with the descent fallback.

    Returns ``(p, cg_result, fell_back)``. When CG's iterate is not a descent direction
    (``g^T p <= 0``: a bad warm start) or CG met negative curvature on its first
    direction (its iterate is then the warm start, unimproved),
    ``p`` is the gradient scaled by its absolute Rayleigh quotient,
    ``g ||g||^2 / (|g^T C g| + damping ||g||^2)`` (one product, in a ``lax.cond``
    branch).
    """
    res = cg(matvec, g, x0=x0, damping=damping, rtol=rtol, atol=atol, max_steps=max_steps)
    # (negative curvature on CG's first direction leaves the warm start as it was: a decayed
    # old direction, descent by a hair or not, whose steps shrank geometrically while the
    # gradient stayed, each reported as accepted)
    stuck = res.negative_curvature & (res.num_steps <= 1)
    descent = (_tree.vdot(g, res.x) > 0) & ~stuck

    def fallback(_):
        # g ||g||^2 / (|g^T C g| + damping ||g||^2) = g / (|u^T C u| + damping) with the unit
        # u = g / ||g||: no square of g to overflow or underflow at any gradient scale
        gn = _tree.norm(g)
        u = _tree.scale(1.0 / jnp.where(gn > 0, gn, 1.0), g)
        den = jnp.abs(_tree.vdot(u, matvec(u))) + damping
        return _tree.scale(1.0 / jnp.where(den > 0, den, 1.0), g)

    p = _xp.cond(descent, lambda _: res.x, fallback, None)
    return p, res, ~descent


def model_decrease(grad, p, matvec):
    r"""``(q(-p), p^T C p)``: the undamped quadratic model of the loss along the step ``-p``.

    $q(-p) = -\nabla f^\top p + \tfrac12 p^\top C p$, with ``grad`` the
    gradient of the loss whose curvature ``C`` is (so the model and the
    measured decrease describe the same function). One product.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim.hessian_free import model_decrease
      >>> C = jnp.diag(jnp.array([2.0, 4.0])); g = jnp.array([2.0, 4.0])
      >>> p = jnp.linalg.solve(C, g)  # the Newton step: q(-p) = -g^T C^-1 g / 2
      >>> [float(v) for v in model_decrease(g, p, lambda v: C @ v)]
      [-3.0, 6.0]
    """
    pcp = _tree.vdot(p, matvec(p))
    return -_tree.vdot(grad, p) + 0.5 * pcp, pcp


def upstream_shift(updates, grad) -> PyTree:
    r"""``updates - grad`` where it exceeds rounding, else zeros: what the chain added upstream.

    A transform before this one (``optax.add_decayed_weights``, clipping) makes
    the incoming ``updates`` the gradient of another objective than ``value_fn``;
    the difference ``d`` is taken as the gradient of a term linear over one step,
    $f(w) + d^\top w$, so the acceptance test and the model measure the objective
    the direction descends (weight decay: the steps reach the regularised
    minimiser). A difference within ``sqrt(eps)`` of the gradients' norm is
    rounding (``value_fn``'s own gradient): zeros, and the test is the plain loss.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim.hessian_free import upstream_shift
      >>> g = jnp.array([1.0, -2.0])
      >>> upstream_shift(g + 0.5 * jnp.array([2.0, 2.0]), g).tolist()  # weight decay 0.5 w
      [1.0, 1.0]
      >>> upstream_shift(g * (1 + 1e-7), g).tolist()  # rounding
      [0.0, 0.0]
    """
    d = _tree.sub(updates, grad)
    eps = jnp.finfo(_tree.dtype(grad)).eps
    scale = jnp.maximum(_tree.norm(updates), _tree.norm(grad))
    return _tree.scale((_tree.norm(d) > jnp.sqrt(eps) * scale).astype(_tree.dtype(grad)), d)


def reduction_ratio(actual, predicted, dt) -> jax.Array:
    """``rho = actual / predicted``; ``-inf`` when non-finite (a model that never decreases).

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim.hessian_free import reduction_ratio
      >>> float(reduction_ratio(jnp.asarray(-1.5), jnp.asarray(-3.0), jnp.float32))
      0.5
      >>> float(reduction_ratio(jnp.asarray(jnp.nan), jnp.asarray(-3.0), jnp.float32))
      -inf
    """
    tiny = jnp.finfo(dt).tiny
    rho = actual / jnp.minimum(predicted, -tiny)
    return jnp.where(jnp.isfinite(rho), rho, -jnp.inf).astype(dt)


def new_damping(lam, rho, accepted, pcp, p, *, increase, decrease, min_damping, max_damping,
                moved=True):
    r"""The Levenberg-Marquardt rule (Martens 2010, sec. 4.1) with a rejection floor.

    ``lam * increase`` for ``rho < 1/4``, ``lam * decrease`` for ``rho > 3/4``;
    a rejected step raises ``lam`` at least to the curvature scale of its
    direction, $|p^\top C p| / \|p\|^2$, so recovery from a tiny ``lam``
    takes O(1) steps instead of O(log(1/lam)); clipped to
    ``[min_damping, max_damping]``, and to a quarter of the largest number of ``lam``'s
    dtype (float16: 16376; CG's damped products must stay finite). A step that ``moved``
    no parameter (below their precision) lowers ``lam`` by ``decrease``, lengthening the
    next one.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim.hessian_free import new_damping
      >>> kw = dict(increase=1.5, decrease=0.5, min_damping=1e-8, max_damping=1e8)
      >>> p = jnp.array([1.0, 0.0]); pcp = jnp.asarray(10.0)  # curvature 10 along p
      >>> lam = jnp.asarray(1.0)
      >>> float(new_damping(lam, jnp.asarray(0.9), jnp.asarray(True), pcp, p, **kw))
      0.5
      >>> float(new_damping(lam, jnp.asarray(-1.0), jnp.asarray(False), pcp, p, **kw))
      10.0
    """
    dt = lam.dtype
    factor = jnp.where(rho < 0.25, increase, jnp.where(rho > 0.75, decrease, 1.0))
    lam_new = lam * factor
    rayleigh = jnp.abs(pcp) / jnp.maximum(_tree.vdot(p, p), jnp.finfo(dt).tiny)
    lam_new = jnp.where(accepted, lam_new, jnp.maximum(lam_new, rayleigh))
    # a step below the parameters' precision (none moved) tells nothing of the model but
    # that it was too short: raised, lambda pushed the next steps further below it, up to
    # max_damping, where the parameters stayed for good (at a minimum, then on every later
    # batch); kept, a damped step below the precision whose undamped step is not (a
    # flat loss far from its minimum) never moved; lowered, the steps lengthen until they
    # move the parameters (a rejected step then raises lambda back in O(1) steps)
    lam_new = jnp.where(moved, lam_new, lam * decrease)
    # and below a quarter of the dtype's largest number: CG's damped products of its
    # directions (norm < 2) stay finite. float16 cannot hold max_damping = 1e8: rejected steps
    # (a stall at float16's precision) raised lambda past 32752, where every later product
    # overflowed and each step was skipped as NONFINITE, the damping frozen there for good
    top = jnp.minimum(max_damping, float(jnp.finfo(dt).max) / 4)
    return jnp.clip(lam_new, min_damping, top).astype(dt)


@_deprecation.renamed("curvlib.scale_by_newton_cg", hvp_mode="mode")
@_deprecation.moved_to_solver("curvlib.scale_by_newton_cg", "cg", CG, static=("max_cg_steps",),
                              cg_rtol="rtol", max_cg_steps="max_steps")
def scale_by_newton_cg(
    damping: float = 1.0,
    *,
    damping_increase: float = 1.5,
    damping_decrease: float = 1.0 / 3.0,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    cg: CG = TRUNCATED_CG,
    warm_start_decay: float = 0.95,
    ggn: tuple[Callable, Callable] | None = None,
    mode: str | None = None,
    microbatch_size: int | None = None,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Hessian-free / truncated Newton-CG direction with adaptive LM damping.

    Outputs $p \approx (C + \lambda I)^{-1} u$ where ``u`` is the incoming
    update (usually the gradient); see the module docstring for the damping
    rule, the step acceptance and the Gauss-Newton split.

    ``update(updates, state, params, *, value_fn, **extra_args)``: ``value_fn``
    is the loss on the current batch, called as ``value_fn(params, **kw)`` with
    the extra arguments it names (optax's line-search convention). Its loss and
    gradient at ``params`` come free from the linearisation that serves the
    default Hessian products; with a Gauss-Newton split, another ``mode``
    or ``microbatch_size``, ``value=`` and ``grad=`` are reused when given
    (else one gradient evaluation).

    Args:
      damping: initial Levenberg-Marquardt ``lambda >= 0`` (traceable). ``0``
        with enough CG steps gives the exact Newton step. Under
        ``optax.inject_hyperparams`` a new value takes effect at the next step
        (the adaptation restarts from it).
      damping_increase: factor (``>= 1``) applied when ``rho < 1/4``.
      damping_decrease: factor in ``(0, 1]`` applied when ``rho > 3/4``.
        Martens (2010) uses 3/2 and 2/3; the default 1/3 reaches the
        undamped (quadratically convergent) regime in a few steps on convex
        problems, while rejected steps still raise ``lambda`` quickly.
      min_damping: lower clip of the adapted ``lambda`` (the first step uses
        ``damping`` as given).
      max_damping: upper clip of the adapted ``lambda`` (which also stays below a quarter
        of the parameters' dtype's largest number: 16376 for float16, whose CG products
        overflow past it).
      cg: the inner CG's options, a [`curvlib.CG`][curvlib.CG]. Its ``rtol`` is the
        cap of the forcing term: the solve stops at
        ``||r|| <= max(min(rtol, sqrt(||u||)) ||u||, atol)`` (a truncated
        Newton solve, so the default value is ``TRUNCATED_CG = CG(rtol=0.5)``,
        not ``CG()``; ``None`` is the default too); its ``max_steps`` (static) caps
        the CG steps, ``None`` meaning ``min(100, dim)`` here. The former ``cg_rtol`` and
        ``max_cg_steps`` still work, with a warning.
      warm_start_decay: CG starts from ``warm_start_decay *`` the previous
        solution (``0`` disables the warm start).
      ggn: ``None`` for the Hessian of ``value_fn``, or ``(model_fn, loss_fn)``
        for the Gauss-Newton matrix of that split (module docstring).
      mode: Hessian product mode of [`curvlib.hessian_matvec`][curvlib.hessian_matvec] (renamed
        from ``hvp_mode``, which still works with a warning); refused with ``ggn=``
        (the Gauss-Newton product takes none).
      microbatch_size: accumulate curvature products over chunks of every
        batched extra argument (the leaves sharing the batch's leading axis;
        other arguments are passed whole), at the memory of one chunk.
      has_aux: ``value_fn`` returns ``(loss, aux)``; ``aux`` is ignored.

    Returns:
      An `optax.GradientTransformationExtraArgs` with state
      [`ScaleByNewtonCGState`][curvlib.ScaleByNewtonCGState].

    Raises:
      ValueError: at construction, for negative damping, ``cg.max_steps < 1``
        and other invalid static settings.
      ValueError: from ``init``, for ``params`` with integer, bool, complex or
        key leaves (a `TypeError` too) or an empty ``params``.
      TypeError: from ``update`` when ``value_fn`` is missing, cannot take the
        extra arguments passed, or does not return a scalar loss.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib import CG
      >>> from curvlib.optim import scale_by_newton_cg
      >>> f = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * p ** 2)
      >>> tx = optax.chain(scale_by_newton_cg(damping=0.0, cg=CG(rtol=1e-6)), optax.scale(-1.0))
      >>> p = jnp.array([1.0, 1.0]); state = tx.init(p)
      >>> u, state = tx.update(jax.grad(f)(p), state, p, value_fn=f)
      >>> bool(jnp.allclose(optax.apply_updates(p, u), 0.0, atol=1e-6))  # the minimiser
      True

    References:
      Martens, *Deep learning via Hessian-free optimization*, ICML 2010.
    """
    cg = _checked_options(damping, min_damping, max_damping, damping_increase,
                          damping_decrease, warm_start_decay, cg, microbatch_size, mode, ggn)
    name = "scale_by_newton_cg"

    def init_fn(params):
        _validate.float_leaves(params, "params", init=name)
        return _tree.unaliased(_init_state(params, damping), damping)  # donatable

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        setup = _common.curvature_setup(
            name, value_fn, params, extra_args, ggn=ggn, hvp_mode=mode,
            microbatch_size=microbatch_size, has_aux=has_aux, updates=updates,
        )
        _common.check_state(name, init_fn, state, params)
        dt = setup.dtype
        lam = current_damping(state, damping)
        max_steps = cg.max_steps or min(DEFAULT_MAX_CG_STEPS, _tree.size(params))
        rtol = jnp.minimum(cg.rtol, jnp.sqrt(_tree.norm(updates)))
        x0 = _tree.scale(jnp.asarray(warm_start_decay, dt), state.solution)
        p, res, fallback = _solve(setup.matvec, updates, x0, lam, rtol, int(max_steps),
                                  cg.atol)
        # updates changed upstream (weight decay, clipping: ``shift``, beyond rounding)
        # are the gradient of the loss plus a term linear over the step; the model and
        # the measured change describe that objective, whose minimiser the steps seek
        shift = upstream_shift(updates, setup.grad)
        predicted, pcp = model_decrease(_tree.add(setup.grad, shift), p, setup.matvec)
        trial_params = _tree.sub(params, p)
        trial = jnp.asarray(setup.loss(trial_params)).astype(setup.value.dtype)
        # the linear term is charged on the step the parameters can take (a step below
        # their precision moves nothing, and stays a stall)
        taken = _tree.sub(params, trial_params)
        change = (trial - setup.value) - _tree.vdot(shift, taken).astype(trial.dtype)
        rho = reduction_ratio(change, predicted, trial.dtype).astype(dt)
        finite = (
            _tree.all_finite(setup.value, setup.grad, updates, p)
            & res.finite & jnp.isfinite(pcp)
        )
        # a step must lower the objective; one that leaves it equal is accepted only where
        # the model predicts no decrease either (a stationary point): below the precision
        # of the parameters or the loss, an equal loss is a stall, not progress
        accepted = finite & jnp.isfinite(trial) & (
            (change < 0) | ((change == 0) & ~(predicted < 0)))
        lam_next = new_damping(
            lam, rho, accepted, pcp, p, increase=damping_increase, decrease=damping_decrease,
            min_damping=min_damping, max_damping=max_damping,
            moved=_tree.max_abs(taken) > 0,
        )
        info = _step_info(res, lam, rho, accepted, finite, setup.value, fallback, dt)
        return _commit(updates, state, p, lam_next, finite, accepted, info, damping)

    return optax.GradientTransformationExtraArgs(init_fn, _common.compiled_when_eager(
        update_fn, damping, damping_increase, damping_decrease, min_damping, max_damping, cg,
        warm_start_decay))


def _checked_options(damping, min_damping, max_damping, damping_increase, damping_decrease,
                     warm_start_decay, cg, microbatch_size, mode, ggn) -> CG:
    """`scale_by_newton_cg`'s options checked at construction; the resolved ``cg``."""
    _validate.number(damping, "damping", minimum=0)
    _validate.number(min_damping, "min_damping", minimum=0)
    _validate.number(max_damping, "max_damping", minimum=0, exclusive=True, finite=False,
                     above=(min_damping, "min_damping"))
    cg = resolve(CG, TRUNCATED_CG if cg is None else cg, "cg")  # None: the default, as left out
    _validate.number(damping_increase, "damping_increase", minimum=1, finite=False)
    _validate.number(damping_decrease, "damping_decrease", minimum=0, maximum=1, exclusive=True,
                     finite=False)
    _validate.number(warm_start_decay, "warm_start_decay", minimum=0.0, maximum=1.0, finite=False)
    if cg.max_steps is not None:
        _validate.static_int(cg.max_steps, "max_steps", minimum=1)
    _validate.static_int(microbatch_size, "microbatch_size", minimum=1, optional=True)
    _validate.functions(ggn, "ggn", 2, what=_common.GGN, optional=True)
    _validate.mode(mode, ggn=ggn, microbatch_size=microbatch_size)
    return cg


def _init_state(params, damping) -> ScaleByNewtonCGState:
    """The state before the first step: damping ``damping``, a zero warm start, neutral info."""
    dt = _common.float_dtype(params)
    zero = jnp.zeros((), dt)
    lam = jnp.asarray(damping, dt)
    return ScaleByNewtonCGState(
        count=jnp.zeros((), jnp.int32),
        damping=lam,
        damping_setting=lam,
        solution=_tree.zeros_like(params),
        info=NewtonCGInfo(
            num_steps=jnp.zeros((), jnp.int32),
            residual_norm=zero,
            damping=lam,
            rho=zero,
            negative_curvature=jnp.asarray(False),
            accepted=jnp.asarray(False),
            skipped=jnp.asarray(False),
            loss=jnp.zeros((), _common.loss_dtype(dt)),
            converged=jnp.asarray(True),
            finite=jnp.asarray(True),
            num_matvecs=jnp.zeros((), jnp.int32),
            status=jnp.asarray(Status.SUCCESS, jnp.int32),
        ),
    )


def _step_info(res, lam, rho, accepted, finite, value, fallback, dt) -> NewtonCGInfo:
    """The step's `NewtonCGInfo` from the CG result; products: CG's, the model's, a fallback."""
    return NewtonCGInfo(
        num_steps=jnp.asarray(res.num_steps, jnp.int32),
        residual_norm=jnp.asarray(res.residual_norm, dt),
        damping=jnp.asarray(lam, dt),
        rho=rho,
        negative_curvature=res.negative_curvature,
        accepted=accepted,
        skipped=~finite,
        loss=value,
        converged=res.converged & finite,  # a skipped step met no tolerance (conventions)
        finite=finite,
        num_matvecs=(res.num_matvecs + 1 + fallback).astype(jnp.int32),
        # CG stopped short of its tolerance before ``max_steps`` (its own STALLED: the
        # attainable accuracy) is not an exhausted budget
        status=from_flags(finite=finite, converged=res.converged,
                          negative_curvature=res.negative_curvature & accepted,
                          stalled=~accepted | (res.status == Status.STALLED)),
    )


def _commit(updates, state, p, lam_next, finite, accepted, info, damping):
    """Output ``p`` if accepted (else zeros); advance the state unless the step was non-finite."""
    out = _tree.select_tree(accepted, p, _tree.zeros_like(p))
    out = jax.tree.map(lambda o, u: o.astype(jnp.result_type(u)), out, updates)
    dt = state.damping.dtype
    setting = jnp.asarray(damping).astype(dt)
    new_state = ScaleByNewtonCGState(
        count=optax.safe_increment(state.count),
        damping=jnp.where(finite, lam_next, state.damping).astype(dt),
        damping_setting=jnp.where(finite, setting, state.damping_setting).astype(dt),
        solution=_tree.select_tree(finite, p, state.solution),
        info=info,
    )
    return out, new_state


@_deprecation.renamed("curvlib.newton_cg", hvp_mode="mode")
@_deprecation.moved_to_solver("curvlib.newton_cg", "cg", CG, static=("max_cg_steps",),
                              cg_rtol="rtol", max_cg_steps="max_steps")
def newton_cg(
    learning_rate: optax.ScalarOrSchedule | None = None,
    damping: float = 1.0,
    *,
    damping_increase: float = 1.5,
    damping_decrease: float = 1.0 / 3.0,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    cg: CG = TRUNCATED_CG,
    warm_start_decay: float = 0.95,
    ggn: tuple[Callable, Callable] | None = None,
    mode: str | None = None,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    linesearch: optax.GradientTransformationExtraArgs | optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Newton-CG / Hessian-free optimiser: ``chain(scale_by_newton_cg, -lr, linesearch)``.

    Built as `optax.lbfgs` is: the direction of
    [`scale_by_newton_cg`][curvlib.scale_by_newton_cg], then `optax.scale_by_learning_rate` (or
    ``scale(-1)`` when ``learning_rate`` is ``None``: the full Newton step,
    globalised by the adaptive damping and step rejection), then an optional
    optax line search (e.g. `optax.scale_by_zoom_linesearch`).

    ``update(grads, state, params, value_fn=loss, **batch)`` is all it needs:
    with a line search and no ``value=``/``grad=``, the loss and gradient are
    computed once and shared by every link. It runs in the loop
    `optax.lbfgs` documents (`optax.value_and_grad_from_state`),
    under ``optax.inject_hyperparams(newton_cg)(learning_rate=..., damping=...)``
    and inside ``nnx.Optimizer.update(model, grads, value_fn=...)``. For the
    ``optax.lbfgs`` loop the state holds, without a line search, a
    ``value = +inf`` marker with a zero gradient placeholder (one
    parameter-sized buffer) that tells `optax.value_and_grad_from_state`
    to evaluate them afresh; ``optax.chain(scale_by_newton_cg(...),
    optax.scale(-lr))`` does without it.

    The arguments ``damping_increase``, ``damping_decrease``, ``min_damping``,
    ``max_damping``, ``cg``, ``warm_start_decay``,
    ``ggn``, ``mode`` and ``microbatch_size`` are those of
    [`scale_by_newton_cg`][curvlib.scale_by_newton_cg].

    Args:
      learning_rate: optional scale or schedule; ``None`` means 1.
      damping: initial Levenberg-Marquardt damping (a new injected value takes
        effect at the next step, see [`scale_by_newton_cg`][curvlib.scale_by_newton_cg]).
      damping_increase: factor (``>= 1``) applied to the damping when ``rho < 1/4``.
      damping_decrease: factor in ``(0, 1]`` applied when ``rho > 3/4``.
      min_damping: lower clip of the adapted damping.
      max_damping: upper clip of the adapted damping.
      cg: the inner solve's options, a [`CG`][curvlib.CG] (default ``TRUNCATED_CG =
        CG(rtol=0.5)``, a truncated Newton forcing term; ``max_steps=None`` means
        ``min(100, dim)``). The former ``cg_rtol`` and ``max_cg_steps`` still work, with a
        warning.
      warm_start_decay: CG starts from ``warm_start_decay *`` the previous
        solution (``0`` disables the warm start).
      ggn: ``None`` for the Hessian of ``value_fn``, or ``(model_fn, loss_fn)``
        for the Gauss-Newton matrix of that split.
      mode: Hessian product mode of [`curvlib.hessian_matvec`][curvlib.hessian_matvec]
        (renamed from ``hvp_mode``, which still works with a warning); refused with
        ``ggn=`` (the Gauss-Newton product takes none).
      microbatch_size: accumulate curvature products over chunks of every
        batched extra argument, at the memory of one chunk.
      has_aux: ``value_fn`` returns ``(loss, aux)``.
      linesearch: optional optax line search appended to the chain.

    Returns:
      An `optax.GradientTransformationExtraArgs`; its state is the
      chain's tuple, ``state[0]`` the [`ScaleByNewtonCGState`][curvlib.ScaleByNewtonCGState].

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.optim import newton_cg
      >>> f = lambda p: jnp.sum((p - 1.0) ** 4) + jnp.sum((p - 1.0) ** 2)
      >>> opt = newton_cg(); p = jnp.zeros(3); state = opt.init(p)
      >>> @jax.jit
      ... def step(p, state):
      ...     u, state = opt.update(jax.grad(f)(p), state, p, value_fn=f)
      ...     return optax.apply_updates(p, u), state
      >>> for _ in range(10):
      ...     p, state = step(p, state)
      >>> bool(jnp.allclose(p, 1.0, atol=1e-3))
      True
    """
    direction = scale_by_newton_cg(
        damping,
        damping_increase=damping_increase,
        damping_decrease=damping_decrease,
        min_damping=min_damping,
        max_damping=max_damping,
        cg=cg,
        warm_start_decay=warm_start_decay,
        ggn=ggn,
        mode=mode,
        microbatch_size=microbatch_size,
        has_aux=has_aux,
    )
    return _common.alias(
        "newton_cg", [direction, _common.learning_rate_link(learning_rate)],
        linesearch=linesearch, has_aux=has_aux, options=(learning_rate,),
    )
