r"""Dense BFGS (inverse-Hessian form) as an optax transform.

Keeps the dense inverse-Hessian approximation $H_k \approx \nabla^2
f^{-1}$ and outputs $p_k = H_k g_k$. With $s = \theta_k -
\theta_{k-1}$, $y = g_k - g_{k-1}$ and $\rho = 1/(s^\top y)$ the
update (Nocedal & Wright 2006, eq. 6.17) is

$$
H_k = (I - \rho\, s y^\top) H_{k-1} (I - \rho\, y s^\top) + \rho\, s s^\top,
$$

applied only when the curvature condition
$s^\top y > \texttt{curvature\_rtol}\,\|s\|\,\|y\|$ holds (otherwise the
pair is skipped, ``info.updated`` is ``False``). Before the first accepted
pair, $H_0 = (s^\top y / y^\top y) I$ (eq. 6.20); before any pair exists
the direction is the gradient scaled by ``min(1, 1/||g||)`` (as
`optax.scale_by_lbfgs`).

Like `optax.scale_by_lbfgs`, the state is updated from the parameters and
gradient it *receives*, so a line search later in the chain sees only
accepted steps. Cost: ``O(n^2)`` time and memory per step, no extra gradient
evaluation, and one loss evaluation (the finiteness check) unless ``value=`` is
passed; for large models use `optax.lbfgs`.

References:
  J. Nocedal and S. Wright, *Numerical Optimization*, 2nd ed., 2006, ch. 6.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from curvlib import _tree, _validate
from curvlib._status import Status, from_flags
from curvlib.optim import _common

PyTree = Any


class BFGSInfo(NamedTuple):
    """Diagnostics of the last [`scale_by_bfgs`][curvlib.scale_by_bfgs] step.

    Attributes:
      curvature: ``s^T y`` of the last pair (``0`` before a pair exists: the first
        finite call).
      updated: the inverse Hessian was updated (curvature condition held).
      skipped: the loss or gradient was non-finite; the step output zeros and
        the state was left as it was.
      loss: the loss at the incoming ``params``.
      converged: the direction was computed (a product with the stored inverse
        Hessian: no inner solve, so ``== finite``).
      finite: the loss, gradient, parameters and step were finite (``~skipped``).
      num_matvecs: curvature products of the step (``0``: BFGS uses gradients only).
      status: the [`curvlib.Status`][curvlib.Status] code: ``NONFINITE`` (skipped), else
        ``SUCCESS``; inside [`bfgs`][curvlib.bfgs] (or any alias with a line search)
        ``STALLED`` when the line search failed to decrease the loss (a step that
        would not lower it is withheld: zeros).
    """

    curvature: jax.Array
    updated: jax.Array
    skipped: jax.Array
    loss: jax.Array
    converged: jax.Array = True
    finite: jax.Array = True
    num_matvecs: jax.Array = 0
    status: jax.Array = Status.SUCCESS


class ScaleByBFGSState(NamedTuple):
    """State of [`scale_by_bfgs`][curvlib.scale_by_bfgs].

    Attributes:
      count: number of ``update`` calls.
      num_finite: calls whose loss, gradient and step were finite, the ones that store
        ``prev_params`` and ``prev_grad`` (a pair ``s, y`` needs one before it).
      num_updates: accepted ``(s, y)`` pairs so far.
      inv_hessian: the dense ``(n, n)`` inverse-Hessian approximation.
      prev_params: the parameters at the last (finite) step.
      prev_grad: the gradient at the last (finite) step (named so that
        `optax.value_and_grad_from_state` finds only the line search's).
      info: [`BFGSInfo`][curvlib.BFGSInfo].
    """

    count: jax.Array
    num_finite: jax.Array
    num_updates: jax.Array
    inv_hessian: jax.Array
    prev_params: PyTree
    prev_grad: PyTree
    info: BFGSInfo


def bfgs_inverse_update(H, s, y, rho):
    """``(I - rho s y^T) H (I - rho y s^T) + rho s s^T`` in ``O(n^2)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim.quasi_newton import bfgs_inverse_update
      >>> s, y = jnp.array([1.0, 0.0]), jnp.array([2.0, 1.0])
      >>> H = bfgs_inverse_update(jnp.eye(2), s, y, 1.0 / (s @ y))
      >>> (H @ y).tolist()  # the secant equation H y = s
      [1.0, 0.0]
    """
    Hy = H @ y
    yHy = y @ Hy
    return (
        H
        - rho * (jnp.outer(s, Hy) + jnp.outer(Hy, s))
        + (rho * rho * yHy + rho) * jnp.outer(s, s)
    )


def _unit(x):
    """``(x / |x|, |x|)`` free of overflow and underflow (``x`` scaled by ``max |x_i|``
    first: two reductions, no loop); ``(0, 0)`` for the zero vector."""
    big = jnp.max(jnp.abs(x))
    x = x / jnp.where(big > 0, big, 1.0)
    n = jnp.sqrt(x @ x)
    return x / jnp.where(n > 0, n, 1.0), big * n


def secant_update(state: ScaleByBFGSState, x, g, finite, curvature_rtol):
    r"""The inverse Hessian after the pair ``s = x - x_prev``, ``y = g - g_prev``.

    Skipped (the old matrix kept) unless $s^\top y > \texttt{curvature\_rtol}
    \|s\|\|y\|$, the step is finite and so is the new matrix in the parameters'
    dtype (formed in at least float32, from $s/\|s\|$ and $y/\|y\|$: no intermediate
    overflows where $s^\top y$ is tiny); before the first accepted pair the
    matrix is first reset to $(s^\top y / y^\top y) I$ (Nocedal & Wright,
    eq. 6.20).

    Returns:
      ``(inv_hessian, num_updates, s^T y, accepted)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim import scale_by_bfgs
      >>> from curvlib.optim.quasi_newton import secant_update
      >>> state = scale_by_bfgs().init(jnp.zeros(2))
      >>> state = state._replace(count=jnp.asarray(1), num_finite=jnp.asarray(1))  # from x = 0
      >>> H, n, sy, ok = secant_update(state, jnp.array([1.0, 0.0]), jnp.array([2.0, 1.0]),
      ...                              jnp.asarray(True), 1e-10)
      >>> (H @ jnp.array([2.0, 1.0])).tolist(), int(n), bool(ok)  # H y = s
      ([1.0, 0.0], 1, True)
    """
    dt = x.dtype
    s = x - ravel_pytree(state.prev_params)[0].astype(dt)
    y = g - ravel_pytree(state.prev_grad)[0].astype(dt)
    # In at least float32, on the unit vectors ``u = s/|s|``, ``w = y/|y|``: with
    # ``c = u^T w`` the update is ``(I - u w^T/c) H (I - w u^T/c) + (|s|/|y|) u u^T/c``,
    # the same matrix without ``rho = 1/(s^T y)`` and ``rho^2 y^T H y``, which overflow for
    # pairs the test accepts (float16 steps of 4e-3; float32 ones of 1e-10)
    acc = jnp.promote_types(dt, jnp.float32)
    u, s_norm = _unit(s.astype(acc))
    w, y_norm = _unit(y.astype(acc))
    c = u @ w
    sy = s_norm * y_norm * c
    ok = (
        finite
        & (state.num_finite > 0)  # (a skipped first step stored no pair start)
        & (c > curvature_rtol)
        & (s_norm > 0) & (y_norm > 0)
    )
    H = state.inv_hessian
    scale = s_norm / jnp.where(y_norm > 0, y_norm, 1.0)  # (s^T y / y^T y = scale * c)
    H0 = jnp.where(state.num_updates == 0, scale * c * jnp.eye(H.shape[0], dtype=acc),
                   H.astype(acc))
    c_safe = jnp.where(ok, c, 1.0)
    H_up = bfgs_inverse_update(H0, u, w, 1.0 / c_safe) + ((scale - 1.0) / c_safe) * jnp.outer(
        u, u)
    H_up = H_up.astype(dt)
    ok = ok & jnp.all(jnp.isfinite(H_up))  # (beyond the parameters' range: the pair skipped)
    H_new = jnp.where(ok, H_up, H)
    return H_new, state.num_updates + ok.astype(jnp.int32), sy, ok


def bfgs_direction(inv_hessian, g, num_updates):
    """``H g``, or before any pair ``min(1, 1/||g||) g`` (as `optax.scale_by_lbfgs`).

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim.quasi_newton import bfgs_direction
      >>> g = jnp.array([3.0, 4.0])
      >>> [round(v, 6) for v in bfgs_direction(jnp.eye(2), g, 0).tolist()]  # unit length
      [0.6, 0.8]
      >>> bfgs_direction(2.0 * jnp.eye(2), g, 1).tolist()
      [6.0, 8.0]
    """
    gnorm = _tree.norm(g)  # scale-safe: a gradient of norm 1e25 (float32) is not infinite
    first_scale = jnp.minimum(1.0, 1.0 / jnp.where(gnorm > 0, gnorm, 1.0))
    return jnp.where(num_updates == 0, first_scale * g, inv_hessian @ g)


def scale_by_bfgs(
    *,
    curvature_rtol: float = 1e-10,
    max_params: int = 4096,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Dense BFGS direction ``H_k g_k`` with skipped updates on failed curvature.

    ``update(updates, state, params, *, value_fn, **extra_args)``: ``value_fn``
    is used only to detect a non-finite loss (``value=`` is reused when given,
    as optax's line searches require anyway).

    Args:
      curvature_rtol: a pair is used only if ``s^T y > curvature_rtol ||s|| ||y||``.
      max_params: refuse (``ValueError`` at ``init``) above this many
        parameters (``O(n^2)`` memory).
      has_aux: ``value_fn`` returns ``(loss, aux)``; ``aux`` is ignored.

    Returns:
      An `optax.GradientTransformationExtraArgs` with state
      [`ScaleByBFGSState`][curvlib.ScaleByBFGSState].

    Raises:
      ValueError: invalid settings at construction; too many parameters at init.
      ValueError: from ``init``, for ``params`` with integer, bool, complex or
        key leaves (a `TypeError` too) or an empty ``params``.
      TypeError: from ``update`` when ``value_fn`` is missing, cannot take the
        extra arguments passed, or does not return a scalar loss.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.optim import scale_by_bfgs
      >>> A = jnp.array([[2.0, 0.5], [0.5, 1.0]])
      >>> f = lambda p: 0.5 * p @ A @ p
      >>> tx = scale_by_bfgs(); p0, p1 = jnp.array([1.0, 1.0]), jnp.array([0.9, 0.8])
      >>> s = tx.init(p0)
      >>> _, s = tx.update(jax.grad(f)(p0), s, p0, value_fn=f)
      >>> _, s = tx.update(jax.grad(f)(p1), s, p1, value_fn=f)
      >>> # the secant equation H y = s holds after the update
      >>> bool(jnp.allclose(s.inv_hessian @ (A @ (p1 - p0)), p1 - p0, atol=1e-6))
      True
    """
    _validate.number(curvature_rtol, "curvature_rtol", minimum=0, finite=False)
    # a guard read at ``init`` only: an integer value, concrete there (under
    # ``optax.inject_hyperparams`` an array, traced when ``update`` rebuilds it)
    _validate.number(max_params, "max_params", minimum=1, integer=True)
    name = "scale_by_bfgs"

    def init_fn(params):
        n, dt = _common.dense_init(name, params, max_params, "stores a dense {n} x {n} matrix",
                                   "use optax.lbfgs")
        zero = jnp.zeros((), dt)
        return _tree.unaliased(ScaleByBFGSState(
            count=jnp.zeros((), jnp.int32),
            num_finite=jnp.zeros((), jnp.int32),
            num_updates=jnp.zeros((), jnp.int32),
            inv_hessian=jnp.eye(n, dtype=dt),
            prev_params=_tree.zeros_like(params),
            prev_grad=_tree.zeros_like(params),
            info=BFGSInfo(zero, jnp.asarray(False), jnp.asarray(False),
                          jnp.zeros((), _common.loss_dtype(dt)),
                          converged=jnp.asarray(True), finite=jnp.asarray(True),
                          num_matvecs=jnp.zeros((), jnp.int32),
                          status=jnp.asarray(Status.SUCCESS, jnp.int32)),
        ))  # donatable

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        loss = _common.bind_loss(name, value_fn, extra_args, has_aux=has_aux)
        params = _common.require_params(name, params, updates)
        _common.check_state(name, init_fn, state, params)
        dt = _common.float_dtype(params)
        value = _common.loss_value(loss, params, extra_args, dt)
        g, unravel = ravel_pytree(updates)
        x, g = ravel_pytree(params)[0].astype(dt), g.astype(dt)
        finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(x))
        H_new, num_updates, sy, ok = secant_update(state, x, g, finite, curvature_rtol)
        p = bfgs_direction(H_new, g, num_updates)
        finite = finite & jnp.all(jnp.isfinite(p))
        p = jnp.where(finite, p, 0.0)
        new_state = ScaleByBFGSState(
            count=optax.safe_increment(state.count),
            num_finite=jnp.where(finite, optax.safe_increment(state.num_finite), state.num_finite),
            num_updates=jnp.where(finite, num_updates, state.num_updates),
            inv_hessian=jnp.where(finite, H_new, state.inv_hessian).astype(dt),
            prev_params=_tree.select_tree(finite, params, state.prev_params),
            prev_grad=_tree.select_tree(finite, updates, state.prev_grad),
            info=BFGSInfo(
                # (no pair before a finite call stored its start: 0, not x^T g)
                curvature=jnp.where(finite & (state.num_finite > 0), sy, 0.0).astype(dt),
                updated=ok & finite,
                skipped=~finite,
                loss=value,
                converged=finite,
                finite=finite,
                num_matvecs=jnp.zeros((), jnp.int32),
                status=from_flags(finite=finite),
            ),
        )
        return unravel(p.astype(jnp.result_type(g))), new_state

    return optax.GradientTransformationExtraArgs(init_fn, _common.compiled_when_eager(
        update_fn, curvature_rtol, max_params))


@functools.cache
def default_linesearch() -> optax.GradientTransformationExtraArgs:
    """The line search of [`bfgs`][curvlib.bfgs]: optax's zoom (strong Wolfe), as in `optax.lbfgs`.

    One object for every call (a pure pair of functions): an alias rebuilt at every step
    (`optax.inject_hyperparams`) shares its eager search's compiled program.

    Examples:
      >>> from curvlib.optim.quasi_newton import default_linesearch
      >>> import jax.numpy as jnp
      >>> state = default_linesearch().init(jnp.zeros(2))
      >>> float(state.value)  # +inf: optax.value_and_grad_from_state computes it afresh
      inf
    """
    return optax.scale_by_zoom_linesearch(max_linesearch_steps=20, initial_guess_strategy="one")


_DEFAULT = _common.Default("default_linesearch(): zoom, strong Wolfe")


def bfgs(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    curvature_rtol: float = 1e-10,
    max_params: int = 4096,
    has_aux: bool = False,
    linesearch: Any = _DEFAULT,
) -> optax.GradientTransformationExtraArgs:
    """Dense BFGS: ``chain(scale_by_bfgs, -lr, zoom line search)``, built as `optax.lbfgs`.

    ``update(grads, state, params, value_fn=loss, **batch)`` is all it needs:
    the loss and gradient the zoom line search takes are computed when
    ``value=``/``grad=`` are not passed. In the loop of `optax.lbfgs`,
    `optax.value_and_grad_from_state` reuses the ones the line search
    stored.

    Args:
      learning_rate: optional scale or schedule; ``None`` means 1.
      curvature_rtol: see [`scale_by_bfgs`][curvlib.scale_by_bfgs].
      max_params: see [`scale_by_bfgs`][curvlib.scale_by_bfgs].
      has_aux: ``value_fn`` returns ``(loss, aux)``.
      linesearch: an optax line search, ``None``, or the default
        (`default_linesearch`).

    Returns:
      An `optax.GradientTransformationExtraArgs`; ``state[0]`` is the
      [`ScaleByBFGSState`][curvlib.ScaleByBFGSState].

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.optim import bfgs
      >>> f = lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2
      >>> opt = bfgs(); p = jnp.array([-1.2, 1.0]); s = opt.init(p)
      >>> vg = optax.value_and_grad_from_state(f)  # the loop optax.lbfgs documents
      >>> @jax.jit
      ... def step(p, s):
      ...     v, g = vg(p, state=s)
      ...     u, s = opt.update(g, s, p, value=v, grad=g, value_fn=f)
      ...     return optax.apply_updates(p, u), s
      >>> for _ in range(60):
      ...     p, s = step(p, s)
      >>> bool(jnp.allclose(p, 1.0, atol=1e-3))
      True
    """
    if linesearch is _DEFAULT:
        linesearch = default_linesearch()
    direction = scale_by_bfgs(
        curvature_rtol=curvature_rtol, max_params=max_params, has_aux=has_aux
    )
    return _common.alias(
        "bfgs", [direction, _common.learning_rate_link(learning_rate)],
        linesearch=linesearch, has_aux=has_aux, options=(learning_rate,),
    )
