r"""Stochastic variance-reduced gradient (SVRG) as an optax transform.

With a snapshot $\tilde\theta$ and its full-data gradient
$\mu = \nabla F(\tilde\theta)$, the direction at $\theta$ for the
minibatch loss $f_B$ is (Johnson & Zhang 2013)

$$
v = \nabla f_B(\theta) - \nabla f_B(\tilde\theta) + \mu,
$$

an unbiased gradient estimate whose variance vanishes as $\theta$ and
$\tilde\theta$ approach the optimum, so a *constant* step converges
linearly on strongly convex problems where SGD stalls at its noise floor.

Extra-argument contract (works inside one jitted training step)
--------------------------------------------------------------
``update(updates, state, params, *, value_fn, full_value_fn=None,
full_grad_fn=None, **extra_args)``:

* ``updates``: $\nabla f_B(\theta)$, the minibatch gradient;
* ``value_fn(params, **kw)``: the minibatch loss $f_B$ (routed extra
  arguments as everywhere in [`curvlib.optim`][curvlib.optim]); the transform
  differentiates it at the snapshot, one extra gradient per step;
* exactly one of ``full_value_fn(params)`` (the full-data or large-batch loss
  $F$, differentiated with ``jax.grad``) or ``full_grad_fn(params)``
  (returning $\nabla F$ directly, e.g. accumulated with
  [`curvlib.gradient`][curvlib.gradient] and ``microbatch_size`` for bounded memory). It is
  called inside a ``lax.cond`` that runs only on refresh steps: when
  ``snapshot_every`` successful steps have passed since the last snapshot, and
  on the first step. Close it over the dataset in the jitted step:

      @jax.jit
      def step(params, state, batch, data):
          loss = lambda p, batch: mse(p, batch)
          g = jax.grad(loss)(params, batch)
          u, state = opt.update(g, state, params, value_fn=loss, batch=batch,
                                full_value_fn=lambda p: mse(p, data))
          return optax.apply_updates(params, u), state

On a refresh step the snapshot becomes ``params`` and the direction is the
full gradient itself. A non-finite direction or snapshot gradient skips the
step (zeros out, state kept, ``info.skipped``); a failed refresh is retried on
the next step.

Cost per step: one extra minibatch gradient, plus a full gradient every
``snapshot_every`` steps; memory: two parameter-sized pytrees.

Wrappers: ``snapshot_every`` is read at every step (``optax.inject_hyperparams``
may schedule it). Under ``optax.MultiSteps`` the incoming update is the mean of
the micro-batch gradients while ``value_fn`` is the last micro-batch's loss, so
the correction $\nabla f_B(\tilde\theta)$ would not match the
averaged gradient: pass a ``value_fn`` over the whole accumulated batch at the
last micro-step (or give SVRG the larger batch directly).

References:
  R. Johnson and T. Zhang, *Accelerating stochastic gradient descent using
  predictive variance reduction*, NeurIPS 2013.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvlib import _tree, _validate, _xp
from curvlib._status import Status, from_flags
from curvlib.optim import _common

PyTree = Any


class SVRGInfo(NamedTuple):
    """Diagnostics of the last [`scale_by_svrg`][curvlib.scale_by_svrg] step.

    Attributes:
      refreshed: the snapshot and its full gradient were refreshed this step.
      correction_norm: ``||grad f_B(theta) - grad f_B(snapshot)||``.
      skipped: a non-finite gradient; the step output zeros, the state was kept.
      converged: the direction was computed (no inner solve: ``== finite``).
      finite: the corrected gradient and the snapshot gradient were finite
        (``~skipped``).
      num_matvecs: curvature products of the step (``0``: gradients only).
      status: the [`curvlib.Status`][curvlib.Status] code: ``NONFINITE`` (skipped), else
        ``SUCCESS``.
    """

    refreshed: jax.Array
    correction_norm: jax.Array
    skipped: jax.Array
    converged: jax.Array = True
    finite: jax.Array = True
    num_matvecs: jax.Array = 0
    status: jax.Array = Status.SUCCESS


class ScaleBySVRGState(NamedTuple):
    """State of [`scale_by_svrg`][curvlib.scale_by_svrg].

    Attributes:
      count: number of ``update`` calls.
      since_snapshot: successful steps since the last refresh (starts at
        ``snapshot_every`` so that the first step refreshes).
      snapshot_params: the snapshot $\\tilde\\theta$.
      snapshot_grad: its full gradient $\\mu$.
      info: [`SVRGInfo`][curvlib.SVRGInfo].
    """

    count: jax.Array
    since_snapshot: jax.Array
    snapshot_params: PyTree
    snapshot_grad: PyTree
    info: SVRGInfo


def snapshot(refresh, full_grad, params, state):
    """``(snapshot, mu)``: ``(params, full_grad(params))`` on a refresh, else the stored pair.

    ``full_grad`` runs inside a ``lax.cond`` branch: paid only on refresh steps
    (except under ``vmap``, where both branches run).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib.optim import scale_by_svrg
      >>> from curvlib.optim.variance_reduced import snapshot
      >>> state = scale_by_svrg().init(jnp.zeros(2))
      >>> full_grad = jax.grad(lambda w: jnp.sum((w - 1.0) ** 2))
      >>> snap, mu = snapshot(jnp.asarray(True), full_grad, jnp.array([3.0, 1.0]), state)
      >>> snap.tolist(), mu.tolist()
      ([3.0, 1.0], [4.0, 0.0])
    """

    def do_refresh(_):
        mu = jax.tree.map(lambda m, p: jnp.asarray(m).astype(p.dtype), full_grad(params), params)
        return params, mu

    def keep(_):
        return state.snapshot_params, state.snapshot_grad

    return _xp.cond(refresh, do_refresh, keep, None)


def _full_gradient(full_value_fn, full_grad_fn, has_aux: bool) -> Callable:
    """The full-data gradient function of a refresh: ``full_grad_fn`` (its output checked
    against the parameters) or the gradient of ``full_value_fn``."""
    if full_grad_fn is None:
        return jax.grad(_common.strip_aux(full_value_fn, has_aux, "full_value_fn"))

    def full_grad(p):
        g = full_grad_fn(p)
        _validate.same_structure(p, g, "params", "full_grad_fn(params)", floating=True)
        return g

    return full_grad


def _svrg_step(updates, state, g_snap, snap, mu, refresh, dt):
    """``(direction, state)`` from the mini-batch gradients at the parameters (``updates``)
    and at the snapshot ``snap`` (``g_snap``), and the snapshot's full gradient ``mu``: a
    zero direction and the previous snapshot where anything is not finite."""
    correction = _tree.sub(updates, g_snap)
    v = _tree.add(correction, mu)
    finite = _tree.all_finite(v, mu)
    since = jnp.where(refresh, 1, state.since_snapshot + 1)
    return _tree.select_tree(finite, v, _tree.zeros_like(updates)), ScaleBySVRGState(
        count=optax.safe_increment(state.count),
        since_snapshot=jnp.where(finite, since, state.since_snapshot).astype(jnp.int32),
        snapshot_params=_tree.select_tree(finite, snap, state.snapshot_params),
        snapshot_grad=_tree.select_tree(finite, mu, state.snapshot_grad),
        info=SVRGInfo(
            refreshed=refresh & finite,
            correction_norm=jnp.where(finite, _tree.norm(correction), 0.0).astype(dt),
            skipped=~finite,
            converged=finite,
            finite=finite,
            num_matvecs=jnp.zeros((), jnp.int32),
            status=from_flags(finite=finite),
        ),
    )


def scale_by_svrg(
    snapshot_every: int = 100, *, has_aux: bool = False
) -> optax.GradientTransformationExtraArgs:
    """SVRG direction ``grad f_B(theta) - grad f_B(snapshot) + full_grad(snapshot)``.

    See the module docstring for the extra-argument contract.

    Args:
      snapshot_every: successful steps between full-gradient refreshes
        (``>= 1``; traceable, so ``inject_hyperparams`` may schedule it).
      has_aux: ``value_fn`` (and ``full_value_fn``) return ``(loss, aux)``;
        ``aux`` is ignored.

    Returns:
      An `optax.GradientTransformationExtraArgs` with state
      [`ScaleBySVRGState`][curvlib.ScaleBySVRGState].

    Raises:
      ValueError: if ``snapshot_every < 1``.
      ValueError: from ``init``, for ``params`` with integer, bool, complex or
        key leaves (a `TypeError` too) or an empty ``params``.
      TypeError: from ``update`` when ``value_fn`` or both of
        ``full_value_fn``/``full_grad_fn`` are missing, or ``value_fn`` cannot
        take the extra arguments passed.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.optim import scale_by_svrg
      >>> X = jax.random.normal(jax.random.PRNGKey(0), (64, 3)); y = X @ jnp.ones(3)
      >>> loss = lambda w, idx: 0.5 * jnp.mean((X[idx] @ w - y[idx]) ** 2)
      >>> full = lambda w: 0.5 * jnp.mean((X @ w - y) ** 2)
      >>> opt = optax.chain(scale_by_svrg(snapshot_every=16), optax.scale(-0.1))
      >>> @jax.jit
      ... def step(w, s, key):
      ...     idx = jax.random.randint(key, (8,), 0, 64)
      ...     g = jax.grad(loss)(w, idx)
      ...     u, s = opt.update(g, s, w, value_fn=loss, idx=idx, full_value_fn=full)
      ...     return optax.apply_updates(w, u), s
      >>> w = jnp.zeros(3); s = opt.init(w)
      >>> for t in range(320):
      ...     w, s = step(w, s, jax.random.PRNGKey(t))
      >>> bool(full(w) < 1e-8)
      True
    """
    _validate.number(snapshot_every, "snapshot_every", minimum=1, integer=True)
    name = "scale_by_svrg"

    def init_fn(params):
        _validate.float_leaves(params, "params", init=name)
        dt = _common.float_dtype(params)
        return _tree.unaliased(ScaleBySVRGState(
            count=jnp.zeros((), jnp.int32),
            since_snapshot=jnp.asarray(snapshot_every, jnp.int32),
            snapshot_params=_tree.zeros_like(params),
            snapshot_grad=_tree.zeros_like(params),
            info=SVRGInfo(jnp.asarray(False), jnp.zeros((), dt), jnp.asarray(False),
                          converged=jnp.asarray(True), finite=jnp.asarray(True),
                          num_matvecs=jnp.zeros((), jnp.int32),
                          status=jnp.asarray(Status.SUCCESS, jnp.int32)),
        ), snapshot_every)  # donatable

    def update_fn(updates, state, params=None, *, value_fn=None, full_value_fn=None,
                  full_grad_fn=None, **extra_args):
        loss = _common.bind_loss(name, value_fn, extra_args, has_aux=has_aux)
        params = _common.require_params(name, params, updates)
        _common.check_state(name, init_fn, state, params)
        if (full_value_fn is None) == (full_grad_fn is None):
            raise TypeError(
                "`scale_by_svrg.update` needs exactly one of `full_value_fn=` (the full-data "
                "loss, a function of params) or `full_grad_fn=` (its gradient) to refresh the "
                "snapshot; see curvlib.optim.variance_reduced."
            )
        full_grad = _full_gradient(full_value_fn, full_grad_fn, has_aux)
        refresh = state.since_snapshot >= snapshot_every
        snap, mu = snapshot(refresh, full_grad, params, state)
        return _svrg_step(updates, state, jax.grad(loss)(snap), snap, mu, refresh,
                          _common.float_dtype(params))

    return optax.GradientTransformationExtraArgs(init_fn, _common.compiled_when_eager(
        update_fn, snapshot_every))


def svrg(
    learning_rate: optax.ScalarOrSchedule,
    snapshot_every: int = 100,
    *,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SVRG: ``chain(scale_by_svrg(snapshot_every), scale_by_learning_rate(learning_rate))``.

    See `curvlib.optim.variance_reduced` for the ``full_value_fn`` /
    ``full_grad_fn`` extra-argument contract. The state also holds a
    ``value = +inf`` marker, so the alias runs unchanged in the loop
    `optax.lbfgs` documents (`optax.value_and_grad_from_state`
    then evaluates the loss and gradient itself).

    Args:
      learning_rate: scale or schedule.
      snapshot_every: see [`scale_by_svrg`][curvlib.scale_by_svrg].
      has_aux: ``value_fn`` and ``full_value_fn`` return ``(loss, aux)``.

    Returns:
      An `optax.GradientTransformationExtraArgs`; ``state[0]`` is the
      [`ScaleBySVRGState`][curvlib.ScaleBySVRGState].

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.optim import svrg
      >>> X = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
      >>> y = X @ jnp.array([1.0, -1.0]) + jnp.array([0.1, -0.1, 0.2, 0.0])
      >>> loss = lambda w, i: 0.5 * (X[i] @ w - y[i]) ** 2  # one sample per step
      >>> full = lambda w: 0.5 * jnp.mean((X @ w - y) ** 2)
      >>> opt = svrg(0.2, snapshot_every=8)
      >>> @jax.jit
      ... def step(w, s, i):
      ...     u, s = opt.update(jax.grad(loss)(w, i), s, w, value_fn=loss, i=i,
      ...                       full_value_fn=full)
      ...     return optax.apply_updates(w, u), s
      >>> w = jnp.zeros(2); s = opt.init(w)
      >>> for t in range(400):
      ...     w, s = step(w, s, t % 4)
      >>> w_star = jnp.linalg.lstsq(X, y)[0]  # SGD with this step would stall near it
      >>> bool(jnp.allclose(w, w_star, atol=1e-5))
      True
    """
    return _common.alias(
        "svrg",
        [scale_by_svrg(snapshot_every, has_aux=has_aux),
         _common.learning_rate_link(learning_rate, optional=False)],
        has_aux=has_aux, options=(learning_rate,),
    )
