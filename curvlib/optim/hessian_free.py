r"""Newton-CG / Hessian-free optimisation as an optax transform (Martens 2010).

Each step solves the damped Newton system

.. math::

    (C + \lambda I)\, p = g

by truncated conjugate gradients (:func:`curvlib.cg`), with ``C`` the Hessian of
the loss (default) or a generalised Gauss-Newton matrix, and outputs ``p`` (the
gradient's sign; the learning rate and sign flip are the next link of the
chain). The Hessian-free ingredients of Martens (2010):

* **Levenberg-Marquardt damping from the reduction ratio.** After the solve the
  transform evaluates the loss at the full step and compares it with the
  undamped quadratic model :math:`q(-p) = -g^\top p + \tfrac12 p^\top C p`:

  .. math::

      \rho = \frac{f(\theta - p) - f(\theta)}{q(-p)},\qquad
      \lambda \leftarrow \begin{cases}
        \lambda \cdot \texttt{damping\_increase} & \rho < 1/4 \\
        \lambda \cdot \texttt{damping\_decrease} & \rho > 3/4 \\
        \lambda & \text{otherwise,}
      \end{cases}

  clipped to ``[min_damping, max_damping]``. A step that does not decrease the
  loss (``rho <= 0`` or a non-finite trial loss) is *rejected*: the transform
  outputs zeros, so the parameters stay put and the next step retries with more
  damping (a trust-region safeguard; ``info.accepted`` reports it); ``lambda``
  is then also raised at least to the curvature scale of the rejected
  direction, :math:`|p^\top C p| / \|p\|^2`, which roughly halves the next
  step whatever ``lambda`` was.
* **CG warm start** from ``warm_start_decay`` times the previous solution.
* **CG step cap** (``max_cg_steps``) and **relative-residual tolerance**
  ``||r|| <= eta ||g||`` with the superlinear forcing
  ``eta = min(cg_rtol, sqrt(||g||))`` (Nocedal & Wright 2006, Alg. 7.1).
* **Negative-curvature exit** (Steihaug 1983): CG stops at the last iterate
  before a direction of non-positive curvature. Should that iterate not be a
  descent direction (a negative direction at the very first CG step, a bad warm
  start) the transform falls back to the gradient scaled by its absolute
  Rayleigh quotient, :math:`p = g\,\|g\|^2 / (|g^\top C g| + \lambda\|g\|^2)`
  (one extra product, inside a ``lax.cond``: paid only when taken, except
  under ``vmap`` where both branches run).

Gauss-Newton curvature (``ggn=(model_fn, loss_fn)``)
---------------------------------------------------
The user splits the loss into a model and an output loss with the *same*
keyword routing as ``value_fn``::

    value_fn(params, **kw) == loss_fn(model_fn(params, **kw), **kw)

Each of ``value_fn``, ``model_fn`` and ``loss_fn`` receives the extra arguments
of ``update`` whose names appear in its own signature (e.g. ``model_fn(params,
x)``, ``loss_fn(logits, y)``, ``value_fn(params, x, y)`` and
``update(..., value_fn=value_fn, x=x, y=y)``), so a jitted training step passes
its batch once. ``C = J^T H_l J`` with ``J`` the Jacobian of ``model_fn`` and
``H_l`` the Hessian of ``loss_fn`` in the outputs (:func:`curvlib.ggn_matvec`):
positive semi-definite for a convex output loss (Schraudolph 2002).

Cost per step (``k`` CG steps): one gradient-sized linearisation, ``k + 1``
curvature products (one for :math:`\rho`), one loss evaluation at the trial
point (and one at ``params`` unless ``value=`` is passed, as optax's line
searches require anyway). Memory: the linearisation residuals plus five
parameter-sized CG vectors and the stored warm start.

References:
  J. Martens, *Deep learning via Hessian-free optimization*, ICML 2010.
  J. Martens and I. Sutskever, *Training deep and recurrent networks with
  Hessian-free optimization*, Neural Networks: Tricks of the Trade, 2012.
  T. Steihaug, *The conjugate gradient method and trust regions in large scale
  optimization*, SIAM J. Numer. Anal. 1983.
  J. Nocedal and S. Wright, *Numerical Optimization*, 2nd ed., 2006, ch. 7.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvlib import _tree
from curvlib.krylov import cg
from curvlib.optim import _common

PyTree = Any

DEFAULT_MAX_CG_STEPS = 100


class NewtonCGInfo(NamedTuple):
    """Diagnostics of the last :func:`scale_by_newton_cg` step.

    Attributes:
      num_cg_steps: CG iterations (curvature products) of the solve.
      residual_norm: final CG residual ``||g - (C + lambda I) p||``.
      damping: the ``lambda`` used in this step.
      rho: reduction ratio ``(f(theta - p) - f(theta)) / q(-p)``.
      negative_curvature: CG met a direction of non-positive curvature.
      accepted: the step decreased the loss and was output (else zeros).
      skipped: the loss, the gradient or a curvature product was non-finite;
        the step output zeros and the state was left as it was.
      loss: the loss at the incoming ``params``.
    """

    num_cg_steps: jax.Array
    residual_norm: jax.Array
    damping: jax.Array
    rho: jax.Array
    negative_curvature: jax.Array
    accepted: jax.Array
    skipped: jax.Array
    loss: jax.Array


class ScaleByNewtonCGState(NamedTuple):
    """State of :func:`scale_by_newton_cg`.

    Attributes:
      count: number of ``update`` calls.
      damping: the Levenberg-Marquardt ``lambda`` for the next step.
      solution: the last CG solution (the next warm start, before decay).
      info: :class:`NewtonCGInfo` of the last step.
    """

    count: jax.Array
    damping: jax.Array
    solution: PyTree
    info: NewtonCGInfo


def _validate(damping, damping_increase, damping_decrease, min_damping, max_damping,
              cg_rtol, warm_start_decay, max_cg_steps, microbatch_size, hvp_mode, ggn):
    _common.check_nonnegative("damping", damping)
    _common.check_nonnegative("min_damping", min_damping)
    _common.check_positive("max_damping", max_damping)
    _common.check_positive("cg_rtol", cg_rtol)
    if _common.is_concrete(damping_increase) and float(np.asarray(damping_increase)) < 1:
        raise ValueError(f"`damping_increase` must be >= 1; got {damping_increase}.")
    if _common.is_concrete(damping_decrease) and not 0 < float(np.asarray(damping_decrease)) <= 1:
        raise ValueError(f"`damping_decrease` must lie in (0, 1]; got {damping_decrease}.")
    _common.check_in_range("warm_start_decay", warm_start_decay, 0.0, 1.0)
    for name, value in (("max_cg_steps", max_cg_steps), ("microbatch_size", microbatch_size)):
        if value is not None and not _common.is_concrete(value):
            raise ValueError(
                f"`{name}` shapes the computation and must be a static int; with "
                f"`optax.inject_hyperparams` list it in `static_args=('{name}',)`."
            )
        _common.check_int(name, value, 1)
    if hvp_mode not in (None, "linearize", "fwd-rev", "rev-rev"):
        raise ValueError(
            f"`hvp_mode` must be None, 'linearize', 'fwd-rev' or 'rev-rev'; got {hvp_mode!r}."
        )
    _common.check_ggn(ggn)


def _solve(matvec, g, x0, damping, rtol, max_steps):
    """Truncated CG for ``(C + damping I) p = g`` with the descent fallback (testable helper)."""
    res = cg(matvec, g, x0=x0, damping=damping, rtol=rtol, max_steps=max_steps)
    descent = _tree.vdot(g, res.x) > 0

    def fallback(_):
        gg = _tree.vdot(g, g)
        gcg = _tree.vdot(g, matvec(g))
        den = jnp.abs(gcg) + damping * gg
        return _tree.scale(gg / jnp.where(den > 0, den, 1.0), g)

    p = jax.lax.cond(descent, lambda _: res.x, fallback, None)
    return p, res


def scale_by_newton_cg(
    damping: float = 1.0,
    *,
    damping_increase: float = 1.5,
    damping_decrease: float = 1.0 / 3.0,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    cg_rtol: float = 0.5,
    max_cg_steps: int | None = None,
    warm_start_decay: float = 0.95,
    ggn: tuple[Callable, Callable] | None = None,
    hvp_mode: str | None = None,
    microbatch_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Hessian-free / truncated Newton-CG direction with adaptive LM damping.

    Outputs :math:`p \approx (C + \lambda I)^{-1} g` where ``g`` is the incoming
    update (the gradient of ``value_fn``); see the module docstring for the
    damping rule, the step acceptance and the Gauss-Newton split.

    ``update(updates, state, params, *, value_fn, **extra_args)``: ``value_fn``
    is the loss on the current batch, called as ``value_fn(params, **kw)`` with
    the extra arguments it names (optax's line-search convention); ``value=``,
    when given, is reused as the loss at ``params``.

    Args:
      damping: initial Levenberg-Marquardt ``lambda >= 0`` (traceable). ``0``
        with enough CG steps gives the exact Newton step.
      damping_increase: factor (``>= 1``) applied when ``rho < 1/4``.
      damping_decrease: factor in ``(0, 1]`` applied when ``rho > 3/4``.
        Martens (2010) uses 3/2 and 2/3; the default 1/3 reaches the
        undamped (quadratically convergent) regime in a few steps on convex
        problems, while rejected steps still raise ``lambda`` quickly.
      min_damping: lower clip of the adapted ``lambda`` (the first step uses
        ``damping`` as given).
      max_damping: upper clip of the adapted ``lambda``.
      cg_rtol: relative residual tolerance cap; the solve stops at
        ``||r|| <= min(cg_rtol, sqrt(||g||)) ||g||``.
      max_cg_steps: static CG step cap (default ``min(100, dim)``).
      warm_start_decay: CG starts from ``warm_start_decay *`` the previous
        solution (``0`` disables the warm start).
      ggn: ``None`` for the Hessian of ``value_fn``, or ``(model_fn, loss_fn)``
        for the Gauss-Newton matrix of that split (module docstring).
      hvp_mode: Hessian product mode of :func:`curvlib.hessian_matvec`.
      microbatch_size: accumulate curvature products over chunks of the
        leading axis of every array extra argument the loss functions take.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`ScaleByNewtonCGState`.

    Raises:
      ValueError: at construction, for negative damping, ``max_cg_steps < 1``
        and other invalid static settings.
      ValueError: from ``init``, for ``params`` with integer, bool or complex
        leaves (a :class:`TypeError` too) or an empty ``params``.
      TypeError: from ``update`` when ``value_fn`` is missing.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from curvlib.optim import scale_by_newton_cg
      >>> f = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * p ** 2)
      >>> tx = optax.chain(scale_by_newton_cg(damping=0.0, cg_rtol=1e-6), optax.scale(-1.0))
      >>> p = jnp.array([1.0, 1.0]); state = tx.init(p)
      >>> u, state = tx.update(jax.grad(f)(p), state, p, value_fn=f)
      >>> optax.apply_updates(p, u)
      Array([0., 0.], dtype=float32)

    References:
      Martens, *Deep learning via Hessian-free optimization*, ICML 2010.
    """
    _validate(damping, damping_increase, damping_decrease, min_damping, max_damping,
              cg_rtol, warm_start_decay, max_cg_steps, microbatch_size, hvp_mode, ggn)

    def init_fn(params):
        _common.check_params("scale_by_newton_cg", params)
        dt = _common.float_dtype(params)
        zero = jnp.zeros((), dt)
        return ScaleByNewtonCGState(
            count=jnp.zeros((), jnp.int32),
            damping=jnp.asarray(damping, dt),
            solution=_tree.zeros_like(params),
            info=NewtonCGInfo(
                num_cg_steps=jnp.zeros((), jnp.int32),
                residual_norm=zero,
                damping=jnp.asarray(damping, dt),
                rho=zero,
                negative_curvature=jnp.asarray(False),
                accepted=jnp.asarray(False),
                skipped=jnp.asarray(False),
                loss=zero,
            ),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        value_fn, dt, value, matvec = _common.curvature_setup(
            "scale_by_newton_cg", value_fn, params, extra_args,
            ggn=ggn, hvp_mode=hvp_mode, microbatch_size=microbatch_size,
        )
        g = updates
        lam = state.damping
        max_steps = max_cg_steps
        if max_steps is None:
            max_steps = min(DEFAULT_MAX_CG_STEPS, _tree.size(params))
        gnorm = _tree.norm(g)
        rtol = jnp.minimum(cg_rtol, jnp.sqrt(gnorm))
        x0 = _tree.scale(jnp.asarray(warm_start_decay, dt), state.solution)
        p, res = _solve(matvec, g, x0, lam, rtol, int(max_steps))

        # reduction ratio against the undamped quadratic model q(-p)
        gp = _tree.vdot(g, p)
        pcp = _tree.vdot(p, matvec(p))
        predicted = -gp + 0.5 * pcp
        trial = jnp.asarray(_common.call(value_fn, _tree.sub(params, p), extra_args)).astype(dt)
        actual = trial - value
        tiny = jnp.finfo(dt).tiny
        rho = actual / jnp.minimum(predicted, -tiny)
        rho = jnp.where(jnp.isfinite(rho), rho, -jnp.inf).astype(dt)

        finite = (
            _common.all_finite(value, g, p) & res.finite & jnp.isfinite(pcp)
        )
        accepted = finite & jnp.isfinite(trial) & (actual <= 0)
        factor = jnp.where(
            rho < 0.25, damping_increase, jnp.where(rho > 0.75, damping_decrease, 1.0)
        )
        new_lam = lam * factor
        # a rejected step raises lambda at least to the curvature scale of its direction, so
        # recovery from a tiny lambda takes O(1) steps, not O(log(1 / lambda))
        rayleigh = jnp.abs(pcp) / jnp.maximum(_tree.vdot(p, p), tiny)
        new_lam = jnp.where(accepted, new_lam, jnp.maximum(new_lam, rayleigh))
        new_lam = jnp.clip(new_lam, min_damping, max_damping).astype(dt)
        new_lam = jnp.where(finite, new_lam, lam)

        zeros = _tree.zeros_like(p)
        out = _common.select_tree(accepted, p, zeros)
        out = jax.tree.map(lambda o, u: o.astype(jnp.result_type(u)), out, updates)
        solution = _common.select_tree(finite, p, state.solution)
        info = NewtonCGInfo(
            num_cg_steps=jnp.asarray(res.num_steps, jnp.int32),
            residual_norm=jnp.asarray(res.residual_norm, dt),
            damping=jnp.asarray(lam, dt),
            rho=rho,
            negative_curvature=res.negative_curvature,
            accepted=accepted,
            skipped=~finite,
            loss=value,
        )
        new_state = ScaleByNewtonCGState(
            count=optax.safe_increment(state.count),
            damping=new_lam,
            solution=solution,
            info=info,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def newton_cg(
    learning_rate: optax.ScalarOrSchedule | None = None,
    damping: float = 1.0,
    *,
    damping_increase: float = 1.5,
    damping_decrease: float = 1.0 / 3.0,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    cg_rtol: float = 0.5,
    max_cg_steps: int | None = None,
    warm_start_decay: float = 0.95,
    ggn: tuple[Callable, Callable] | None = None,
    hvp_mode: str | None = None,
    microbatch_size: int | None = None,
    linesearch: optax.GradientTransformationExtraArgs | optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Newton-CG / Hessian-free optimiser: ``chain(scale_by_newton_cg, -lr, linesearch)``.

    Built as :func:`optax.lbfgs` is: the direction of
    :func:`scale_by_newton_cg`, then :func:`optax.scale_by_learning_rate` (or
    ``scale(-1)`` when ``learning_rate`` is ``None``: the full Newton step,
    globalised by the adaptive damping and step rejection), then an optional
    optax line search (e.g. :func:`optax.scale_by_zoom_linesearch`, which needs
    ``value=`` and ``grad=`` extra arguments). Works under
    ``optax.inject_hyperparams(newton_cg)(learning_rate=...)``.

    Args:
      learning_rate: optional scale or schedule; ``None`` means 1.
      damping: initial Levenberg-Marquardt damping.
      damping_increase, damping_decrease, min_damping, max_damping, cg_rtol,
      max_cg_steps, warm_start_decay, ggn, hvp_mode, microbatch_size: see
        :func:`scale_by_newton_cg`.
      linesearch: optional optax line search appended to the chain.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.optim import newton_cg
      >>> f = lambda p: jnp.sum((p - 1.0) ** 4) + jnp.sum((p - 1.0) ** 2)
      >>> opt = newton_cg(); p = jnp.zeros(3); state = opt.init(p)
      >>> for _ in range(10):
      ...     u, state = opt.update(jax.grad(f)(p), state, p, value_fn=f)
      ...     p = optax.apply_updates(p, u)
      >>> bool(jnp.allclose(p, 1.0, atol=1e-3))
      True
    """
    base_scaling = (
        optax.scale(-1.0) if learning_rate is None else optax.scale_by_learning_rate(learning_rate)
    )
    parts = [
        scale_by_newton_cg(
            damping,
            damping_increase=damping_increase,
            damping_decrease=damping_decrease,
            min_damping=min_damping,
            max_damping=max_damping,
            cg_rtol=cg_rtol,
            max_cg_steps=max_cg_steps,
            warm_start_decay=warm_start_decay,
            ggn=ggn,
            hvp_mode=hvp_mode,
            microbatch_size=microbatch_size,
        ),
        base_scaling,
    ]
    if linesearch is not None:
        parts.append(_common.strongly_typed(linesearch))
    return optax.chain(*parts)
