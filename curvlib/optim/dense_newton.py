r"""Exact dense Newton's method for small models, as an optax transform.

Each step forms the full curvature matrix ``C`` (the Hessian of ``value_fn``,
or the Gauss-Newton matrix of a ``(model_fn, loss_fn)`` split, see
:mod:`curvlib.optim.hessian_free`) column by column as ``vmap`` of the product
operator over the identity, takes its eigendecomposition
:math:`C = Q \Lambda Q^\top` and outputs

.. math::

    p = Q\,\operatorname{diag}\!\big(1 / (\phi(\Lambda) + \lambda)\big)\,Q^\top g,
    \qquad
    \phi(\mu) = \begin{cases}
      \max(|\mu|, \mu_{\min}) & \texttt{"abs"} \\
      \max(\mu, \mu_{\min})   & \texttt{"clip"}
    \end{cases}

with the floor :math:`\mu_{\min} = \max(\texttt{min\_eigenvalue},
\sqrt{\epsilon}\,\max_i|\mu_i|)` (``epsilon`` the dtype's machine epsilon: a
numerical-rank threshold that keeps null directions of a singular Hessian, e.g.
softmax's shift invariance, from blowing up the step), so indefinite Hessians
give a descent direction (eigenvalue modification,
Nocedal & Wright 2006, sec. 3.4; the absolute value is the saddle-free Newton
of Dauphin et al. 2014). With a positive definite ``C`` and ``damping=0`` this is
the exact Newton step.

Cost per step: ``n`` curvature products (vmapped), an ``O(n^3)`` symmetric
eigendecomposition, ``O(n^2)`` memory, for ``n`` parameters; above
``max_params`` the transform refuses with a ``ValueError`` at ``init``.

References:
  J. Nocedal and S. Wright, *Numerical Optimization*, 2nd ed., 2006, sec. 3.4.
  Y. Dauphin et al., *Identifying and attacking the saddle point problem in
  high-dimensional non-convex optimization*, NeurIPS 2014.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from curvlib import _tree
from curvlib.optim import _common

PyTree = Any

MODIFICATIONS = ("abs", "clip")


class NewtonInfo(NamedTuple):
    """Diagnostics of the last :func:`scale_by_newton` step.

    Attributes:
      min_eigenvalue: smallest eigenvalue of the unmodified curvature.
      max_eigenvalue: largest eigenvalue of the unmodified curvature.
      num_modified: eigenvalues below the floor (raised to it, or to ``|mu|``).
      skipped: the loss, gradient or curvature was non-finite; the step output
        zeros.
      loss: the loss at the incoming ``params``.
    """

    min_eigenvalue: jax.Array
    max_eigenvalue: jax.Array
    num_modified: jax.Array
    skipped: jax.Array
    loss: jax.Array


class ScaleByNewtonState(NamedTuple):
    """State of :func:`scale_by_newton`: a step counter and :class:`NewtonInfo`."""

    count: jax.Array
    info: NewtonInfo


def dense_curvature(matvec: Callable, params: PyTree) -> jax.Array:
    """The ``(n, n)`` matrix of ``matvec`` in the ravelled basis of ``params`` (symmetrised)."""
    flat, unravel = ravel_pytree(params)
    eye = jnp.eye(flat.size, dtype=flat.dtype)
    cols = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0])(eye)
    return 0.5 * (cols + cols.T)


def modified_newton_direction(C, g, damping, min_eigenvalue, modification="abs"):
    """``Q diag(1/(phi(Lambda) + damping)) Q^T g`` and the eigenvalues of ``C``."""
    w, Q = jnp.linalg.eigh(C)
    floor = eigenvalue_floor(w, min_eigenvalue)
    mod = jnp.abs(w) if modification == "abs" else w
    wt = jnp.maximum(mod, floor) + damping
    coef = (Q.T @ g) / jnp.where(wt > 0, wt, 1.0)
    return Q @ coef, w


def eigenvalue_floor(w, min_eigenvalue):
    """``max(min_eigenvalue, sqrt(eps) * max|w|)``: the numerical-rank threshold."""
    rel = jnp.sqrt(jnp.finfo(w.dtype).eps) * jnp.max(jnp.abs(w))
    return jnp.maximum(min_eigenvalue, rel)


def scale_by_newton(
    damping: float = 0.0,
    *,
    min_eigenvalue: float = 1e-8,
    modification: str = "abs",
    max_params: int = 4096,
    ggn: tuple[Callable, Callable] | None = None,
    hvp_mode: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Dense Newton direction with damping and eigenvalue modification.

    ``update(updates, state, params, *, value_fn, **extra_args)`` with the
    routing of :mod:`curvlib.optim` (``value=`` is reused when given).

    Args:
      damping: ``lambda >= 0`` added to the modified eigenvalues (traceable).
      min_eigenvalue: absolute floor of the modified eigenvalues (the floor is
        also at least ``sqrt(eps) * max|mu|``).
      modification: ``"abs"`` (``|mu|``, saddle-free) or ``"clip"``
        (``max(mu, mu_min)``).
      max_params: refuse (``ValueError`` at ``init``) above this many
        parameters: the method is ``O(n^3)`` time and ``O(n^2)`` memory.
      ggn: optional ``(model_fn, loss_fn)`` Gauss-Newton split.
      hvp_mode: Hessian product mode of :func:`curvlib.hessian_matvec`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`ScaleByNewtonState`.

    Raises:
      ValueError: invalid settings at construction; too many parameters at
        ``init``.
      ValueError: from ``init``, for ``params`` with integer, bool or complex
        leaves (a :class:`TypeError` too) or an empty ``params``.
      TypeError: from ``update`` when ``value_fn`` is missing.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.optim import scale_by_newton
      >>> f = lambda p: 0.5 * p @ jnp.array([[3.0, 1.0], [1.0, 2.0]]) @ p - p.sum()
      >>> tx = scale_by_newton(); p = jnp.zeros(2); s = tx.init(p)
      >>> u, s = tx.update(jax.grad(f)(p), s, p, value_fn=f)
      >>> p - u
      Array([0.2, 0.4], dtype=float32)
    """
    _common.check_nonnegative("damping", damping)
    _common.check_positive("min_eigenvalue", min_eigenvalue)
    if modification not in MODIFICATIONS:
        raise ValueError(f"`modification` must be one of {MODIFICATIONS}; got {modification!r}.")
    _common.check_int("max_params", max_params, 1)
    _common.check_ggn(ggn)

    def init_fn(params):
        _common.check_params("scale_by_newton", params)
        n = _tree.size(params)
        if _common.is_concrete(max_params) and n > int(max_params):
            raise ValueError(
                f"scale_by_newton forms the dense {n} x {n} curvature matrix ({n} parameters > "
                f"max_params={int(max_params)}); use curvlib.newton_cg for large models "
                "or raise `max_params`."
            )
        dt = _common.float_dtype(params)
        zero = jnp.zeros((), dt)
        return ScaleByNewtonState(
            count=jnp.zeros((), jnp.int32),
            info=NewtonInfo(zero, zero, jnp.zeros((), jnp.int32), jnp.asarray(False), zero),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        value_fn, dt, value, matvec = _common.curvature_setup(
            "scale_by_newton", value_fn, params, extra_args,
            ggn=ggn, hvp_mode=hvp_mode, microbatch_size=None,
        )
        C = dense_curvature(matvec, params)
        g, unravel = ravel_pytree(updates)
        finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(C))
        C = jnp.where(finite, C, jnp.eye(C.shape[0], dtype=C.dtype))
        p, w = modified_newton_direction(
            C, g.astype(C.dtype), damping, min_eigenvalue, modification
        )
        finite = finite & jnp.all(jnp.isfinite(p))
        p = jnp.where(finite, p, 0.0).astype(g.dtype)
        info = NewtonInfo(
            min_eigenvalue=w[0].astype(dt),
            max_eigenvalue=w[-1].astype(dt),
            num_modified=jnp.sum(w < eigenvalue_floor(w, min_eigenvalue)).astype(jnp.int32),
            skipped=~finite,
            loss=value,
        )
        return unravel(p), ScaleByNewtonState(optax.safe_increment(state.count), info)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# the default line search of the alias: Armijo backtracking from the full step
_DEFAULT_LINESEARCH = optax.scale_by_backtracking_linesearch(
    max_backtracking_steps=20, decrease_factor=0.5
)


def newton(
    learning_rate: optax.ScalarOrSchedule | None = None,
    damping: float = 0.0,
    *,
    min_eigenvalue: float = 1e-8,
    modification: str = "abs",
    max_params: int = 4096,
    ggn: tuple[Callable, Callable] | None = None,
    hvp_mode: str | None = None,
    linesearch: optax.GradientTransformationExtraArgs | optax.GradientTransformation | None = (
        _DEFAULT_LINESEARCH
    ),
) -> optax.GradientTransformationExtraArgs:
    """Dense Newton: ``chain(scale_by_newton, -lr, linesearch)`` (see :func:`scale_by_newton`).

    The default line search is optax's Armijo backtracking starting from the
    full Newton step (so a quadratic is still solved in one step, while the far
    field of e.g. a logistic loss, where pure Newton overshoots, is
    globalised); ``update`` then needs ``value=``, ``grad=`` and ``value_fn=``.
    ``linesearch=None`` gives the pure (modified) Newton iteration.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.optim import newton
      >>> f = lambda p: jnp.sum(jnp.logaddexp(0.0, -p)) + 0.05 * jnp.sum(p ** 2)
      >>> opt = newton(); p = jnp.full(3, 5.0); s = opt.init(p)
      >>> for _ in range(8):
      ...     v, g = jax.value_and_grad(f)(p)
      ...     u, s = opt.update(g, s, p, value=v, grad=g, value_fn=f)
      ...     p = optax.apply_updates(p, u)
      >>> bool(jnp.linalg.norm(jax.grad(f)(p)) < 1e-5)
      True
    """
    base_scaling = (
        optax.scale(-1.0) if learning_rate is None else optax.scale_by_learning_rate(learning_rate)
    )
    parts = [
        scale_by_newton(
            damping, min_eigenvalue=min_eigenvalue, modification=modification,
            max_params=max_params, ggn=ggn, hvp_mode=hvp_mode,
        ),
        base_scaling,
    ]
    if linesearch is not None:
        parts.append(_common.strongly_typed(linesearch))
    return optax.chain(*parts)
