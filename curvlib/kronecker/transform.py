r"""K-FAC as an optax transform that lives inside the user's ``jit``.

Each ``update`` is a list of calls to the named, pure steps below (Martens &
Grosse 2015), each tested alone:

1. **Statistics** (every ``statistics_every`` steps): `batch_statistics`
   (exact Fisher or Monte Carlo with the state's key) then `moving_average`:
   $\bar F_t = \beta \bar F_{t-1} + (1 - \beta) F_t$, its weight
   $w_t = \beta w_{t-1} + (1 - \beta)$ (the average is read as
   $\bar F_t / w_t$, bias-corrected). A non-finite batch leaves both as they were.
2. **Refresh** (every ``inverse_every`` steps): `refresh`. With
   ``inverse="factored"`` (default) the inverses $(A + \pi\sqrt\lambda I)^{-1}$
   and $(G + \sqrt\lambda/\pi\, I)^{-1}$ (Martens & Grosse's factored
   Tikhonov damping, by Cholesky, with the damping of that step); with
   ``"exact"`` or ``"ekfac"`` the eigendecompositions of the averaged factors
   (EK-FAC's eigenbasis scalings restart from $\lambda_A \lambda_G^\top$).
3. **Precondition**: $\Delta = (\tilde F + \lambda I)^{-1} g$
   (`precondition`): two small matrix products
   per layer with the stored inverses, or, through the eigendecompositions, the
   damped Kronecker block inverted exactly with the current damping (``"exact"``)
   or with EK-FAC's scalings (``"ekfac"``, George et al. 2018; the scalings are a
   moving average of the squared per-example gradients in the eigenbasis, updated
   with the statistics).
4. **Step coefficients**: with ``learning_rate=None``, `quadratic_step`:
   the update $u = \alpha \Delta + \mu u_{t-1}$ with $(\alpha, \mu)$
   minimising the damped quadratic model
   $m(-u) = -g^\top u + \tfrac12 u^\top (F + \lambda I) u$ of the exact
   Fisher $F$ of the current batch (`fisher_gram` then the 2x2 system
   of `model_coefficients`). With a fixed ``learning_rate`` and ``momentum``:
   `fixed_coefficients`, $u = \text{lr}\,\Delta + \mu u_{t-1}$.
5. **Levenberg-Marquardt damping** (every ``damping_every`` steps):
   `adapt_damping`: `reduction_ratio`
   $\rho = (h(\theta - u) - h(\theta)) / q(-u)$ against the undamped model
   $q(-u) = -g^\top u + \tfrac12 u^\top F u$, then `levenberg_marquardt`:
   $\lambda \leftarrow \omega\lambda$ if $\rho > 3/4$,
   $\lambda/\omega$ if $\rho < 1/4$, with
   $\omega = \texttt{damping\_decay}^{\texttt{damping\_every}}$, clipped to
   ``[min_damping, max_damping]`` (as [`curvlib.newton_cg`][curvlib.newton_cg] adapts its damping).
6. **Guard**: `step_is_finite` and `guard`: a non-finite gradient,
   step or loss outputs zeros and keeps the damping and the velocity
   (``info.skipped``); the batch's factor statistics are averaged in only when they
   are finite themselves (``info.statistics_updated``) and the counters advance, so
   params and state stay usable.

Everything a step needs is in [`ScaleByKfacState`][curvlib.ScaleByKfacState] or follows from the
transform's static settings and the structure of ``params``: two states from two
``init`` calls can share one transform, and a state restored from a checkpoint
(or rebuilt leaf by leaf) steps exactly as the original.

The output is the *step* $u$ with the gradient's sign (the quadratic
model needs the step length, so the learning rate is applied here);
[`kfac`][curvlib.kfac] chains it with ``optax.scale(-1)``.

Cost per step, in forward/backward passes of the model on the batch: the
statistics one forward and one backward per sample (Monte Carlo) or per
output entry (exact, ``key=None``), the forward shared with the gradient's
when they come from the transform's ``value_and_grad``
(``update(statistics=)``); one forward and two tangent passes for the
quadratic model (``learning_rate=None``); one forward pass for
$\rho$ every ``damping_every`` steps (and one per step to report
the loss when ``value=`` is not passed); ``O(d^3)`` per factor every
``inverse_every`` steps; two (factored) or four (exact, EK-FAC) ``(d x d)``
matrix products per layer. Memory: the factors and their inverses or
eigenvectors (``2 (d_in^2 + d_out^2)`` per layer) and one parameter-sized velocity.

References:
  J. Martens and R. Grosse, *Optimizing neural networks with Kronecker-factored
  approximate curvature*, ICML 2015.
  T. George, C. Laurent, X. Bouthillier, N. Ballas and P. Vincent, *Fast
  approximate natural gradient descent in a Kronecker-factored eigenbasis*,
  NeurIPS 2018.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvlib import _chain, _loss, _status, _tree, _validate, _xp
from curvlib.kronecker import _likelihood, _sharding
from curvlib.kronecker.curvature import (
    INVERSES,
    Eigen,
    Factors,
    Inverses,
    batch_leaves,
    check_options,
    eigen,
    factor_dtype,
    factored_inverses,
    factors_from_rows,
    likelihood_cotangents,
    precondition,
    replay,
    statistics,
    value_grad_and_rows,
    zero_factors,
)
from curvlib.kronecker.discovery import KfacLayers, _find_layers, check_examples_independent

PyTree = Any


class KfacInfo(NamedTuple):
    """Diagnostics of the last [`scale_by_kfac`][curvlib.scale_by_kfac] step.

    Attributes:
      loss: the loss at the incoming ``params`` (``value=`` when passed, else
        ``value_fn(params)``; NaN when neither is given).
      damping: the ``lambda`` used in this step.
      learning_rate: the ``alpha`` of the step (from the quadratic model or given).
      momentum: the ``mu`` of the step.
      quad_change: the undamped quadratic model's change ``q(-u)`` (computed every
        step with an adaptive learning rate or momentum, else on damping
        adaptations only; 0 when not computed).
      rho: reduction ratio of the damping adaptation (0 when ``damping_adapted``
        is false; ``-inf`` when the trial loss was not finite).
      damping_adapted: the damping was adapted (``rho`` computed) this step; false on a
        skipped step, which keeps its damping.
      statistics_updated: the factor averages took this batch's statistics.
      refreshed: the eigendecompositions were recomputed.
      skipped: the gradient, the step or the loss was non-finite; the step
        output zeros, the damping and the velocity were kept (``skipped == ~finite``);
        finite factor statistics of the batch were still averaged in
        (``statistics_updated``).
      converged: the step was taken. K-FAC's solve is direct (no tolerance to
        meet), so a step converges exactly when it is finite.
      finite: the gradient, the step, its coefficients and the loss were finite.
      num_matvecs: model Jacobian-vector products (tangent passes) of this step:
        2 for the quadratic model (``J Delta``, ``J u_prev``), plus 1 when the
        damping was adapted without it (``J u`` for ``q(-u)``). The statistics'
        backward passes are not counted (see the module docstring for those).
      status: ``int32`` [`curvlib.Status`][curvlib.Status]: ``SUCCESS``, or ``NONFINITE``
        for a skipped step (`curvlib._status.from_flags`).
    """

    loss: jax.Array
    damping: jax.Array
    learning_rate: jax.Array
    momentum: jax.Array
    quad_change: jax.Array
    rho: jax.Array
    damping_adapted: jax.Array
    statistics_updated: jax.Array
    refreshed: jax.Array
    skipped: jax.Array
    converged: jax.Array
    finite: jax.Array
    num_matvecs: jax.Array
    status: jax.Array


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a state whose ``params`` were sharded lives: static, no array leaves.

    Part of the state's tree structure (so it travels through ``jit``, flatten and
    unflatten, ``jax.tree.map`` and checkpoints restored into a template), never a
    leaf. ``None`` in the state of unsharded parameters.

    Attributes:
      state: a ``NamedSharding`` per leaf of the state (``placement`` excluded).
      params: a ``NamedSharding`` per parameter leaf (the updates' placement).
    """

    state: tuple
    params: tuple

    def __reduce__(self):  # devices do not pickle: keep their ids
        return (_placement_from_ids, (_sharding_ids(self.state), _sharding_ids(self.params)))


def _sharding_ids(shardings) -> tuple:
    return tuple((tuple(int(d.id) for d in s.mesh.devices.flat), tuple(s.mesh.devices.shape),
                  tuple(s.mesh.axis_names), tuple(t.name for t in s.mesh.axis_types), s.spec)
                 for s in shardings)


def _placement_from_ids(state, params) -> Placement:
    devices = {d.id: d for d in jax.devices()}

    def build(ids, shape, names, types, spec):
        grid = np.array([devices[i] for i in ids], dtype=object).reshape(shape)
        mesh = jax.sharding.Mesh(grid, names,
                                 axis_types=tuple(getattr(jax.sharding.AxisType, t) for t in types))
        return jax.sharding.NamedSharding(mesh, spec)

    return Placement(tuple(build(*s) for s in state), tuple(build(*s) for s in params))


def _register_flax_placement() -> None:
    """Let ``flax.serialization`` save a `Placement` as nothing (the template's is kept)."""
    if importlib.util.find_spec("flax") is None:
        return
    from flax import serialization

    serialization.register_serialization_state(
        Placement, lambda p: {}, lambda target, state: target, override=True)


class ScaleByKfacState(NamedTuple):
    """State of [`scale_by_kfac`][curvlib.scale_by_kfac].

    Attributes:
      count: number of ``update`` calls.
      factors: exponentially weighted sums of the factors ([`Factors`][curvlib.kronecker.Factors]).
      ema_weight: the sum of their weights (``1 - ema_decay^t``).
      inverses: the preconditioner refreshed every ``inverse_every`` steps: the
        factors' eigendecompositions (`Eigen`,
        ``inverse="exact"``) or their damped inverses
        (`Inverses`, ``"factored"``).
      scales: EK-FAC's per-layer scalings in the eigenbasis (``(a_dim, d_out)``;
        an empty tuple unless ``inverse="ekfac"``).
      damping: the Levenberg-Marquardt ``lambda`` for the next step.
      velocity: the last step ``u`` (the momentum direction).
      key: PRNG key data for the Monte-Carlo statistics (unused for the exact Fisher).
      info: [`KfacInfo`][curvlib.KfacInfo] of the last step.
      damping_setting: the ``damping`` argument seen at the last step; when it changes
        (a new value injected with ``optax.inject_hyperparams``) ``damping`` restarts
        from it and the preconditioner is refreshed at once (``None`` in a state
        built by hand: no change is detected).
      placement: ``None``, or the `Placement` of a state whose ``params``
        were sharded on a mesh at ``init`` (static: it has no leaves).
    """

    count: jax.Array
    factors: Factors
    ema_weight: jax.Array
    inverses: Eigen | Inverses
    scales: tuple
    damping: jax.Array
    velocity: PyTree
    key: jax.Array
    info: KfacInfo
    damping_setting: jax.Array | None = None
    placement: Placement | None = None


class KfacStatistics(NamedTuple):
    """One batch's K-FAC statistics, from ``opt.value_and_grad``, for ``update(statistics=...)``.

    Attributes:
      factors: the batch's [`Factors`][curvlib.kronecker.Factors] (means over its examples;
        zeros on a step that takes no statistics).
      scales: EK-FAC's scalings of the batch in the state's eigenbasis (``()`` unless
        ``inverse="ekfac"``).
      finite: every entry of both is finite (``False`` on a step without statistics).
    """

    factors: Factors
    scales: tuple
    finite: jax.Array


# ------------------------------------------------------------------ step 1: statistics


def batch_statistics(layers: KfacLayers, params: PyTree, kw: dict, key_data, eigenbasis, *,
                     likelihood: str, num_samples: int, convention: str, variance, dt):
    r"""The Kronecker factors of one batch and, for EK-FAC, its scalings in ``eigenbasis``.

    Per layer $A = \tfrac1n \sum_i a_i a_i^\top$ (layer inputs) and
    $G = \tfrac1n \sum_i \sum_s b_{is} b_{is}^\top$ (output cotangents: the
    columns of the likelihood Hessian's square root, exact, ``key_data=None``, or
    ``num_samples`` sampled gradients, weighted ``1/num_samples``), diagonal blocks
    for the rest (`statistics`).

    Cost: one forward pass, one backward pass per output entry (exact) or per
    sample; ``O(n d^2)`` per factor.

    Returns:
      ``(factors, scales, finite)``: ``scales`` is ``()`` without ``eigenbasis``;
      ``finite`` says every entry of both is finite.
    """
    key = None if key_data is None else jax.random.wrap_key_data(key_data)
    out = statistics(layers, params, batch_leaves((kw,)),
                     consts=tuple(layers.program.consts.values()), likelihood=likelihood,
                     key=key, num_samples=num_samples, convention=convention,
                     variance=variance, eigenbasis=eigenbasis)
    scales = tuple(x.astype(dt) for x in out[2]) if eigenbasis is not None else ()
    return out[0], scales, _tree.all_finite(out[0]) & _tree.all_finite(scales)


def batch_value_grad_statistics(layers: KfacLayers, params: PyTree, kw: dict, loss_fn: Callable,
                                key_data, eigenbasis, *, likelihood: str, num_samples: int,
                                convention: str, variance, dt):
    r"""The loss, its gradient and `batch_statistics`' statistics from one forward pass.

    ``loss_fn(outputs) -> scalar`` on the batch's model outputs. The model runs
    forward once; from its residuals one backward pass of the loss cotangent
    (the gradient) and one batched backward pass of the statistics' cotangents
    (`curvlib.kronecker.curvature.value_grad_and_rows`). Same factors as
    `batch_statistics` (with the same ``key_data``) and the gradient of
    ``jax.value_and_grad``, to round-off.

    Cost: one forward pass, one backward pass for the gradient and one per
    output entry (exact) or per sample; ``O(n d^2)`` per factor.

    Returns:
      ``(value, grads, statistics)``: the loss, its gradient, a `KfacStatistics`.
    """
    key = None if key_data is None else jax.random.wrap_key_data(key_data)
    batched = batch_leaves((kw,))
    keys = None if key is None else jax.random.split(key, batched[0].shape[0])
    value, grads, _, rows_a, rows_g, dsq = value_grad_and_rows(
        layers, params, batched, loss_fn, likelihood_cotangents(likelihood, num_samples, variance),
        keys=keys, consts=tuple(layers.program.consts.values()))
    weight = 1.0 if key is None else 1.0 / num_samples
    factors, scales = factors_from_rows(layers, rows_a, rows_g, dsq, weight=weight,
                                        convention=convention, eigenbasis=eigenbasis)
    scales = tuple(x.astype(dt) for x in scales)
    ok = _tree.all_finite(factors) & _tree.all_finite(scales)
    return value, grads, KfacStatistics(factors, scales, ok)


def moving_average(average: PyTree, batch: PyTree, finite, decay) -> PyTree:
    r"""The exponential moving average $\beta\,\bar x + (1 - \beta)\,x$, leafwise.

    Where ``finite`` is false the average is returned as it was. The result has
    the average's dtypes. Cost: two multiply-adds per entry.

    Args:
      average: $\bar x$ (any pytree of arrays).
      batch: $x$, the same structure.
      finite: a boolean scalar; false keeps ``average``.
      decay: $\beta \in [0, 1)$ (traceable).
    """
    def one(old, new):
        beta = jnp.asarray(decay, old.dtype)
        return jnp.where(finite, beta * old + (1 - beta) * new.astype(old.dtype), old)

    return jax.tree.map(one, average, batch)


def _statistics_step(settings, layers, state, params, kw, key_data, dt, given=None):
    """Step 1: ``(factors, ema_weight, finite, batch_scales)`` after this batch.

    ``given``: the batch's `KfacStatistics` from ``value_and_grad`` (no statistics pass here).
    """
    if given is not None:
        f, scales, ok = given.factors, given.scales, given.finite
    else:
        basis = state.inverses if settings.inverse == "ekfac" else None
        f, scales, ok = batch_statistics(layers, params, kw, key_data, basis,
                                         likelihood=settings.likelihood,
                                         num_samples=settings.num_samples,
                                         convention=settings.convention,
                                         variance=settings.variance, dt=dt)
    factors = moving_average(state.factors, f, ok, settings.ema_decay)
    weight = moving_average(state.ema_weight, jnp.ones((), dt), ok, settings.ema_decay)
    return factors, weight, ok, scales


# ------------------------------------------------------------------ step 2: refresh


def refresh(layers: KfacLayers, factors: Factors, weight, damping, inverse: str):
    r"""The preconditioner of the bias-corrected average $\bar F / w$.

    ``"factored"``: $((A/w) + \pi\sqrt\lambda I)^{-1}$ and
    $((G/w) + \sqrt\lambda/\pi\, I)^{-1}$ by Cholesky
    (`factored_inverses`); ``"exact"``: the
    eigendecompositions $A/w = Q_A \Lambda_A Q_A^\top$,
    $G/w = Q_G \Lambda_G Q_G^\top$; ``"ekfac"``: those, and EK-FAC's scalings
    restarted at $\lambda_A \lambda_G^\top$. A zero ``weight`` (no statistics
    yet) reads the factors as they are.

    Cost: ``O(d^3)`` per factor (Cholesky or ``eigh``).

    Returns:
      ``(preconditioner, scales)``: `Inverses` or `Eigen`, and the
      per-layer scalings (``()`` unless ``inverse="ekfac"``).
    """
    w = jnp.maximum(weight, jnp.finfo(weight.dtype).tiny)
    factors = jax.tree.map(lambda f: f / w, factors)
    if inverse == "factored":
        return factored_inverses(layers, factors, damping), ()
    eig = eigen(layers, factors)
    if inverse == "exact":
        return eig, ()
    return eig, tuple(la[:, None] * lg[None, :] for la, lg in zip(eig.lA, eig.lG, strict=True))


# ------------------------------------------------------------------ step 4: coefficients


def fisher_gram(model_fn: Callable, likelihood: str, variance, params: PyTree, kw: dict,
                tangents: PyTree, dt):
    r"""The Gram matrix $t_i^\top F t_j$ of the exact Fisher of the batch.

    $F = \tfrac1n \sum_i J_i^\top H_i J_i$ (``H_i`` the likelihood's Hessian
    in the outputs), for the ``k`` tangents stacked on the leading axis of
    ``tangents``. Cost: one linearisation of the model (a forward pass) and
    ``k`` tangent passes (``J t_j``, under ``vmap``); ``O(k^2 n d_out)`` more.

    Returns:
      A ``k x k`` nested tuple of scalars in ``dt`` (symmetric).
    """
    out, jvp_fn = jax.linearize(lambda p: model_fn(p, **kw), params)
    jt = jax.vmap(jvp_fn)(tangents)
    n = out.shape[0]
    k = jax.tree.leaves(tangents)[0].shape[0]
    out = jax.lax.stop_gradient(out)
    q = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            q[i][j] = q[j][i] = (
                _likelihood.quadratic(likelihood, out, jt[i], jt[j], variance) / n
            ).astype(dt)
    return tuple(tuple(row) for row in q)


def model_coefficients(fisher, inner, grad, damping, fixed_alpha=None, fixed_mu=None):
    r"""``(alpha, mu, q)`` minimising the damped quadratic model over $u = \alpha\Delta + \mu v$.

    With $M = D^\top (F + \lambda I) D$, $D = [\Delta, v]$,
    $b = D^\top g$, the model $-b^\top c + \tfrac12 c^\top M c$ is
    minimised by $c = M^{-1} b$ (Martens & Grosse, section 7). With
    ``fixed_alpha`` only $\mu$ is free, $\mu = (b_2 - \alpha M_{12}) / M_{22}$;
    with ``fixed_mu``, $\alpha = (b_1 - \mu M_{12}) / M_{11}$. Without a
    previous step ($v^\top v = 0$) or with a (numerically) singular
    $M$, $\mu = 0$ and $\alpha = b_1 / M_{11}$.
    ``q = -b^\top c + \tfrac12 c^\top D^\top F D c`` is the *undamped* change.
    Cost: ``O(1)``.

    Args:
      fisher: ``((Δ'FΔ, Δ'Fv), (v'FΔ, v'Fv))`` (`fisher_gram`).
      inner: ``((Δ'Δ, Δ'v), (v'Δ, v'v))``.
      grad: ``(g'Δ, g'v)``.
      damping: $\lambda$.
      fixed_alpha: the step length, or ``None`` (from the model).
      fixed_mu: the momentum, or ``None`` (from the model).
    """
    (dd, du), (_, uu) = fisher
    (vdd, vdu), (_, vuu) = inner
    gd, gu = grad
    dt = jnp.result_type(dd)
    a11, a12, a22 = dd + damping * vdd, du + damping * vdu, uu + damping * vuu
    tiny = jnp.finfo(dt).tiny
    has_u = vuu > 0
    if fixed_alpha is None and fixed_mu is None:
        det = a11 * a22 - a12 * a12
        ok2 = has_u & (det > 1e-12 * jnp.abs(a11 * a22))
        det_safe = jnp.where(ok2, det, 1.0)
        alpha = jnp.where(ok2, (a22 * gd - a12 * gu) / det_safe, gd / jnp.maximum(a11, tiny))
        mu = jnp.where(ok2, (a11 * gu - a12 * gd) / det_safe, 0.0)
    elif fixed_mu is None:  # alpha fixed, mu from the model
        alpha = fixed_alpha
        mu = jnp.where(has_u, (gu - alpha * a12) / jnp.where(has_u, a22, 1.0), 0.0)
    else:  # mu fixed, alpha from the model
        mu = fixed_mu
        alpha = (gd - mu * a12) / jnp.maximum(a11, tiny)
    quad = -(alpha * gd + mu * gu) + 0.5 * (alpha**2 * dd + 2 * alpha * mu * du + mu**2 * uu)
    return jnp.asarray(alpha).astype(dt), jnp.asarray(mu).astype(dt), quad.astype(dt)


def quadratic_step(model_fn, likelihood, variance, params, kw, g, delta, u_prev, lam,
                   fixed_alpha, fixed_mu, dt):
    r"""Step 4 from the quadratic model: `fisher_gram` of ``[delta, u_prev]``, then
    `model_coefficients`. With ``update(statistics=)`` ``model_fn`` is the layers'
    replay (`curvlib.kronecker.curvature.replay`), the forward ``value_and_grad`` ran,
    so XLA shares that forward pass.

    Cost: one forward and two tangent passes of the model; five inner products.

    Returns:
      ``(alpha, mu, q)``: the coefficients and the undamped model change.
    """
    # each tangent leaf in its parameter's dtype (the model is linearised at ``params``,
    # which may mix float32 weights with bfloat16 biases)
    like = lambda t: jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), t, params)
    tangents = _stack(like(delta), like(u_prev))
    fisher = fisher_gram(model_fn, likelihood, variance, params, kw, tangents, dt)
    vdd = _tree.vdot(delta, delta).astype(dt)
    vdu = _tree.vdot(delta, u_prev).astype(dt)
    vuu = _tree.vdot(u_prev, u_prev).astype(dt)
    grad = (_tree.vdot(g, delta).astype(dt), _tree.vdot(g, u_prev).astype(dt))
    return model_coefficients(fisher, ((vdd, vdu), (vdu, vuu)), grad, lam, fixed_alpha, fixed_mu)


def fixed_coefficients(learning_rate, momentum, g, delta, norm_constraint, dt):
    r"""Step 4 with a given step length: ``(alpha, mu, 0)``.

    $\alpha = \text{lr}$, scaled by
    $\min(1, \sqrt{c / (\text{lr}^2 g^\top\Delta)})$ with a ``norm_constraint``
    $c$ (so $\alpha^2 g^\top \Delta \le c$); $\mu$ = ``momentum``.
    The model change is not computed (0). Cost: one inner product with a constraint.
    """
    alpha = jnp.asarray(learning_rate, dt)
    if norm_constraint is not None:
        sq = alpha**2 * _tree.vdot(g, delta).astype(dt)
        alpha = alpha * jnp.minimum(1.0, jnp.sqrt(norm_constraint / jnp.maximum(sq, 1e-30)))
    return alpha, jnp.asarray(momentum, dt), jnp.zeros((), dt)


def _coefficients(settings, params, kw, g, delta, u_prev, lam, count, dt):
    """Step 4: ``(alpha, mu, quad)`` from the model or the given rate and momentum."""
    lr = settings.learning_rate
    lr = None if lr is None else jnp.asarray(lr(count) if callable(lr) else lr, dt)
    mu = None if isinstance(settings.momentum, str) else jnp.asarray(settings.momentum, dt)
    if lr is None or mu is None:
        return quadratic_step(settings.model_fn, settings.likelihood, settings.variance, params,
                              kw, g, delta, u_prev, lam, lr, mu, dt)
    return fixed_coefficients(lr, mu, g, delta, settings.norm_constraint, dt)


# ------------------------------------------------------------------ step 5: damping


def loss_value(value_fn, params, extra_args: dict, dt):
    """The loss at ``params``: ``value=`` when passed, else ``value_fn``, else NaN (unknown).

    Cost: nothing with ``value=``, else one forward pass.
    """
    if extra_args.get("value") is not None:
        return jnp.asarray(extra_args["value"]).astype(dt)
    if value_fn is not None:
        return jnp.asarray(_loss.call(value_fn, params, extra_args)).astype(dt)
    return jnp.full((), jnp.nan, dt)


def reduction_ratio(trial, value, quad):
    r"""$\rho = (h(\theta - u) - h(\theta)) / q(-u)$, ``-inf`` when not finite.

    The predicted change ``quad`` is capped at ``-tiny`` (a model that predicts
    no decrease gives a huge ratio of the right sign). Cost: ``O(1)``.
    """
    tiny = jnp.finfo(jnp.result_type(quad)).tiny
    rho = (trial - value) / jnp.minimum(quad, -tiny)
    return jnp.where(jnp.isfinite(rho), rho, -jnp.inf).astype(jnp.result_type(quad))


def levenberg_marquardt(damping, rho, value, decay, min_damping, max_damping):
    r"""The Levenberg-Marquardt rule: $\lambda \omega$ if $\rho > 3/4$,
    $\lambda / \omega$ if $\rho < 1/4$, else $\lambda$, clipped to
    ``[min_damping, max_damping]``; kept when the loss ``value`` is not finite.

    Args:
      damping: $\lambda$.
      rho: the reduction ratio (`reduction_ratio`).
      value: the loss at the current parameters.
      decay: $\omega \in (0, 1)$.
      min_damping: lower clip.
      max_damping: upper clip.
    """
    factor = jnp.where(rho > 0.75, decay, jnp.where(rho < 0.25, 1.0 / decay, 1.0))
    new = jnp.clip(damping * factor, min_damping, max_damping).astype(jnp.result_type(damping))
    return jnp.where(jnp.isfinite(value), new, damping)


def adapt_damping(model_fn, likelihood, variance, value_fn, params, kw, extra_args, g, u, quad,
                  lam, value, decay, min_damping, max_damping, dt):
    """Step 5: ``(new lambda, rho, quad, True)``.

    The trial loss ``h(params - u)`` (one forward pass), the undamped model change
    ``quad`` (computed here from the exact Fisher, one tangent pass, when ``None``),
    then `reduction_ratio` and `levenberg_marquardt`.
    """
    trial = jnp.asarray(_loss.call(value_fn, _tree.sub(params, u), extra_args)).astype(dt)
    if quad is None:
        # the tangent in each parameter's dtype (`quadratic_step`: float32 weights may sit
        # beside bfloat16 biases)
        like = jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), u, params)
        gram = fisher_gram(model_fn, likelihood, variance, params, kw, _stack(like), dt)
        quad = -_tree.vdot(g, u).astype(dt) + 0.5 * gram[0][0]
    rho = reduction_ratio(trial, value, jnp.asarray(quad, dt))
    new_lam = levenberg_marquardt(jnp.asarray(lam, dt), rho, value, decay, min_damping,
                                  max_damping)
    return new_lam, rho, jnp.asarray(quad, dt), jnp.asarray(True)


# ------------------------------------------------------------------ step 6: guard


def step_is_finite(g, u, alpha, mu, value, check_value: bool):
    """Whether the gradient, step, its coefficients and (``check_value``) the loss are finite."""
    finite = _tree.all_finite(g, u) & jnp.isfinite(alpha) & jnp.isfinite(mu)
    return finite & jnp.isfinite(value) if check_value else finite


def guard(finite, u: PyTree, u_prev: PyTree, updates: PyTree):
    """``(output, velocity)``: ``u`` and ``u`` when ``finite``, else zeros and ``u_prev``.

    The output has the dtypes of ``updates`` (the incoming gradient). Cost: two selects.
    """
    out = _tree.select_tree(finite, u, _tree.zeros_like(u))
    out = jax.tree.map(lambda o, x: o.astype(jnp.result_type(x)), out, updates)
    return out, _tree.select_tree(finite, u, u_prev)


# ------------------------------------------------------------------ the transform


class _Settings(NamedTuple):
    """The static configuration of one `scale_by_kfac` (hyperparameters may be traced)."""

    model_fn: Callable
    likelihood: str
    variance: Any
    num_samples: int
    convention: str
    inverse: str
    ema_decay: Any
    learning_rate: Any
    momentum: Any
    norm_constraint: Any
    sampled: bool = False  # Monte-Carlo statistics (a key was given)
    adaptive_damping: bool = True
    damping_every: int = 5
    damping_decay: Any = 0.95
    min_damping: Any = 1e-8
    max_damping: Any = 1e8
    statistics_every: int = 1
    inverse_every: int = 5
    damping: Any = 1.0  # the argument (traced under inject_hyperparams): a change resets


def _settings(model_fn, example_inputs, likelihood, learning_rate, momentum, damping,
              adaptive_damping, damping_every, damping_decay, min_damping, max_damping, ema_decay,
              statistics_every, inverse_every, inverse, key, num_samples, convention, variance,
              norm_constraint) -> _Settings:
    """`scale_by_kfac`'s arguments checked (each refused with its name and what it must be)
    and resolved (the momentum's and the variance's defaults) into its `_Settings`."""
    num_samples = check_options(likelihood, convention, num_samples, variance, key)
    variance = 1.0 if variance is None else variance  # (as fisher_matvec's None)
    for name, value in (("damping_every", damping_every), ("statistics_every", statistics_every),
                        ("inverse_every", inverse_every)):
        _validate.number(value, name, minimum=1, integer=True)  # None refused
    _validate.number(learning_rate, "learning_rate", optional=True, schedule=True)
    _validate.prng_key(key, optional=True)  # None: the exact Fisher
    for name, value in (("damping", damping), ("min_damping", min_damping)):
        _validate.number(value, name, minimum=0, exclusive=True, optional=True)
    _validate.number(max_damping, "max_damping", minimum=0, exclusive=True, finite=False,
                     optional=True, above=(min_damping, "min_damping"))
    _validate.number(ema_decay, "ema_decay", minimum=0.0, maximum=1.0, finite=False)
    if not isinstance(ema_decay, jax.core.Tracer) and float(np.asarray(ema_decay)) >= 1:
        raise ValueError(f"`ema_decay` must lie in [0, 1); got {ema_decay}.")
    _validate.number(damping_decay, "damping_decay", minimum=0.0, maximum=1.0, exclusive=True,
                     finite=False)
    _validate.one_of(inverse, "inverse", INVERSES)
    if not isinstance(example_inputs, dict):
        raise ValueError(
            "`example_inputs` must be a dict of the extra arguments `update` will receive "
            f"(e.g. {{'x': x}}); got {type(example_inputs).__name__}."
        )
    _validate.functions(model_fn, "model_fn")
    _loss.check_named_inputs(model_fn, "model_fn", example_inputs, "example_inputs")
    if momentum is None:
        momentum = "adaptive" if learning_rate is None else 0.0
    if isinstance(momentum, str):
        if momentum != "adaptive":
            raise ValueError(
                f"`momentum` must be 'adaptive', a float in [0, 1) or None; got {momentum!r}.")
    else:  # (a traced value, from inject_hyperparams, passes unchecked)
        _validate.number(momentum, "momentum", scalar=True)
        if not isinstance(momentum, jax.core.Tracer) and not 0 <= float(np.asarray(momentum)) < 1:
            raise ValueError(f"`momentum` must lie in [0, 1); got {momentum}.")
    if norm_constraint is not None:
        _validate.number(norm_constraint, "norm_constraint", minimum=0, exclusive=True,
                         finite=False)
        if learning_rate is None or isinstance(momentum, str):
            raise ValueError(
                "`norm_constraint` scales a step of fixed `learning_rate` and `momentum`; "
                "the adaptive step (learning_rate=None or momentum='adaptive') takes its "
                "length from the quadratic model, which the constraint would not change; got "
                f"learning_rate={learning_rate!r}, momentum={momentum!r}.")
    return _Settings(model_fn, likelihood, variance, num_samples, convention, inverse,
                     ema_decay, learning_rate, momentum, norm_constraint, key is not None,
                     adaptive_damping, damping_every, damping_decay, min_damping, max_damping,
                     statistics_every, inverse_every, damping)


def scale_by_kfac(
    model_fn: Callable,
    *,
    example_inputs: dict,
    likelihood: str = "categorical",
    learning_rate: optax.ScalarOrSchedule | None = None,
    momentum: float | str | None = None,
    damping: float = 1.0,
    adaptive_damping: bool = True,
    damping_every: int = 5,
    damping_decay: float = 0.95,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    ema_decay: float = 0.95,
    statistics_every: int = 1,
    inverse_every: int = 5,
    inverse: str = "factored",
    key: jax.Array | None = None,
    num_samples: int = 1,
    convention: str = "reduce",
    variance: float = 1.0,
    norm_constraint: float | None = None,
) -> KfacTransformation:
    r"""K-FAC step: Kronecker-factored natural gradient with quadratic-model step and damping.

    See the module docstring for the steps. The model and its likelihood
    define the curvature: ``value_fn(params, **kw)`` should be the mean over
    examples of the negative log-likelihood of ``likelihood`` at
    ``model_fn(params, **kw)`` (plus, at most, a small regulariser).

    ``update(updates, state, params, *, value_fn=None, **extra_args)``:
    ``model_fn`` and ``value_fn`` receive the extra arguments their signatures
    name (optax's line-search convention; e.g. ``model_fn(params, x)``,
    ``value_fn(params, x, y)``, ``update(..., x=x, y=y)``); every array that
    reaches ``model_fn`` has the leading example axis. ``value_fn`` is needed
    only for the damping adaptation; ``value=``, when given, is reused as the
    loss at ``params``; ``statistics=``, the
    [`KfacStatistics`][curvlib.kronecker.KfacStatistics] of the returned
    transform's ``value_and_grad`` (the gradient and the statistics from one
    forward pass, [`KfacTransformation`][curvlib.kronecker.KfacTransformation]),
    replaces the step's own statistics pass.

    Args:
      model_fn: ``model_fn(params, **kw) -> outputs`` (logits or means), leading
        axis = examples. Its layers are found from its jaxpr
        ([`find_layers`][curvlib.kronecker.find_layers]); print
        ``curvlib.kronecker.format_layers(find_layers(...))`` to see them.
      example_inputs: a dict of the extra arguments ``update`` will receive
        (arrays or ``jax.ShapeDtypeStruct``; any batch size): ``init`` traces the
        model on them to size the factors.
      likelihood: ``"categorical"``, ``"gaussian"`` or ``"bernoulli"``.
      learning_rate: ``None`` for the step length from the quadratic model
        (Martens & Grosse, section 7), else a scalar or schedule.
      momentum: ``"adaptive"`` (from the quadratic model), a float in ``[0, 1)``, or ``None``:
        adaptive when ``learning_rate`` is ``None``, else ``0``.
      damping: initial ``lambda > 0`` (traceable: a new value injected with
        ``optax.inject_hyperparams`` takes effect at the next step, restarting the
        adaptation from it and refreshing the preconditioner).
      adaptive_damping: adapt ``lambda`` by the Levenberg-Marquardt rule.
      damping_every: steps between damping adaptations.
      damping_decay: per-step factor ``omega_1`` in ``(0, 1]``; ``lambda`` moves by
        ``damping_decay ** damping_every`` per adaptation.
      min_damping: lower clip of the adapted ``lambda``.
      max_damping: upper clip of the adapted ``lambda``.
      ema_decay: decay ``beta`` of the factor averages, in ``[0, 1)``.
      statistics_every: steps between factor statistics.
      inverse_every: steps between eigendecompositions.
      inverse: ``"factored"``: Martens & Grosse's factored Tikhonov damping,
        inverses refreshed with the damping of the refresh step (Cholesky; two
        matrix products per layer per step); ``"exact"``: the damped Kronecker
        block inverted exactly through the factors' eigendecompositions, with
        the current damping (``eigh``; four products per layer per step);
        ``"ekfac"``: the eigenbasis of ``"exact"`` with EK-FAC's rescaling
        (George et al. 2018): the eigenvalues ``lA lG^T`` replaced by a moving
        average of the squared per-example gradients in the eigenbasis, reset
        to ``lA lG^T`` at each refresh (so it differs from ``"exact"`` only when
        ``statistics_every < inverse_every``; one per-example gradient per
        layer and statistics step).
      key: ``None`` for exact-Fisher statistics (one backward pass per output
        entry of an example), or a PRNG key for Monte-Carlo statistics with
        ``num_samples`` sampled targets (one backward pass per sample).
      num_samples: Monte-Carlo targets per example.
      convention: weight sharing, ``"reduce"`` or ``"expand"``.
      variance: the Gaussian likelihood's variance (``None``: 1).
      norm_constraint: with a fixed ``learning_rate`` and ``momentum``, scale the step so that
        ``lr^2 g^T Delta <= norm_constraint`` (``None``: no constraint).

    Returns:
      A [`KfacTransformation`][curvlib.kronecker.KfacTransformation] (an
      `optax.GradientTransformationExtraArgs` with ``value_and_grad``) with state
      [`ScaleByKfacState`][curvlib.ScaleByKfacState].

    Raises:
      ValueError: at construction, for invalid settings; from ``init``, for
        ``params`` that are not floating or inputs the model cannot trace.
      TypeError: from ``update``, when the damping adaptation needs ``value_fn``
        and it is missing.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.kronecker import scale_by_kfac
      >>> model = lambda p, x: x @ p["w"]
      >>> loss = lambda p, x, y: 0.5 * jnp.mean(jnp.sum((model(p, x) - y) ** 2, -1))
      >>> x = jnp.eye(4)[:, :3]; y = x @ jnp.ones((3, 2))
      >>> tx = optax.chain(scale_by_kfac(model, example_inputs={"x": x},
      ...                                likelihood="gaussian", damping=1e-4),
      ...                  optax.scale(-1.0))
      >>> p = {"w": jnp.zeros((3, 2))}; state = tx.init(p)
      >>> g = jax.grad(loss)(p, x, y)
      >>> u, state = tx.update(g, state, p, value_fn=loss, x=x, y=y)
      >>> jnp.round(optax.apply_updates(p, u)["w"], 3).tolist()  # one natural-gradient step
      [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """
    settings = _settings(model_fn, example_inputs, likelihood, learning_rate, momentum, damping,
                         adaptive_damping, damping_every, damping_decay, min_damping,
                         max_damping, ema_decay, statistics_every, inverse_every, inverse, key,
                         num_samples, convention, variance, norm_constraint)
    key_data = _key_data(key)

    def init_fn(params):
        _validate.float_leaves(params, "params", init="scale_by_kfac")
        layers, kw = _layers_for(model_fn, params, example_inputs, checked=True)
        _likelihood.check_output(likelihood, layers.out_aval.shape)
        check_examples_independent(lambda p, kw: model_fn(p, **kw), params, (kw,),
                                   "scale_by_kfac")
        # donatable, the user's arrays kept: copies made before placing (`jax.device_put` of
        # one array to two leaves' shardings gave leaves that share their buffers)
        state = _tree.unaliased(init_state(layers, params, damping, key_data, inverse),
                                key_data, damping)
        return place_state(layers, state, params)

    def update_fn(updates, state, params=None, *, value_fn=None, statistics=None, **extra_args):
        return _kfac_update(settings, updates, state, params, value_fn, statistics, extra_args)

    def value_and_grad(loss_fn: Callable) -> Callable:
        """``fn(params, state, **extra_args) -> ((value, grads), statistics)``: see above."""
        return _value_and_grad(settings, loss_fn)

    return KfacTransformation(init_fn, _chain.compiled_when_eager(update_fn, settings),
                              value_and_grad)


def _kfac_update(c: _Settings, updates, state: ScaleByKfacState, params, value_fn, statistics,
                 extra_args: dict):
    """`scale_by_kfac`'s ``update``: its steps, each a named function of this module.

    The factors' statistics (`_statistics_step`, every ``statistics_every``), the
    inverses (`refresh`, every ``inverse_every``), the preconditioned direction
    (`precondition`), the step's coefficients (`_coefficients`), the damping
    (`adapt_damping`, every ``damping_every``), the finiteness guard (`guard`), then
    the new state, placed as the parameters are (`_place`).
    """
    params = _loss.require_params("scale_by_kfac", params, updates)
    if c.adaptive_damping:
        value_fn = _loss.require_value_fn("scale_by_kfac", value_fn)
    if value_fn is not None:  # a per-sample loss refused as by every other transform
        value_fn = _loss.strip_aux(value_fn, False)
    layers, kw = _layers_for(c.model_fn, params, extra_args)
    if value_fn is not None:  # (after the model's own inputs, whose message is the sharper)
        # the extra arguments it names checked as every other transform checks them
        _loss.check_call(value_fn, "value_fn", _loss.kwargs_for(value_fn, extra_args),
                         extra_args)
    _check_state(layers, state)
    if statistics is not None:
        _check_statistics(layers, state, statistics)
    dt = factor_dtype(layers)
    g, count, u_prev = updates, state.count, state.velocity
    lam, setting, changed = _current_damping(c, state, dt)
    stat_key, next_key = _split(state.key) if c.sampled else (None, state.key)
    factors, weight, stats_ok, batch_scales = _every(
        c.statistics_every, count,
        lambda: _statistics_step(c, layers, state, params, kw, stat_key, dt, statistics),
        lambda: (state.factors, state.ema_weight, jnp.asarray(False), state.scales))
    pre, scales = _every(
        c.inverse_every, count, lambda: refresh(layers, factors, weight, lam, c.inverse),
        lambda: (state.inverses, _ekfac_scales(c.inverse, state, batch_scales, stats_ok,
                                               c.ema_decay)), also=changed)
    delta = precondition(layers, pre, g, lam, dt, scales if c.inverse == "ekfac" else None)
    alpha, mu, quad = _coefficients(_quadratic_settings(c, layers, statistics), params, kw, g,
                                    delta, u_prev, lam, count, dt)
    u = _tree.add(_tree.scale(alpha, delta), _tree.scale(mu, u_prev))
    value = loss_value(value_fn, params, extra_args, dt)
    needs_quad = c.learning_rate is None or isinstance(c.momentum, str)
    new_lam, rho, quad, adapted = _every(
        c.damping_every if c.adaptive_damping else None, count + 1,
        lambda: adapt_damping(c.model_fn, c.likelihood, c.variance, value_fn, params, kw,
                              extra_args, g, u, quad if needs_quad else None, lam, value,
                              c.damping_decay**c.damping_every, c.min_damping, c.max_damping,
                              dt),
        lambda: (lam, jnp.zeros((), dt), quad, jnp.asarray(False)))
    finite = step_is_finite(g, u, alpha, mu, value,
                            value_fn is not None or extra_args.get("value") is not None)
    out, velocity = guard(finite, u, u_prev, updates)
    # a skipped step keeps its damping: it was not adapted, whatever the rule computed
    keep = finite & jnp.isfinite(new_lam)
    adapted = adapted & keep
    rho = jnp.where(adapted, rho, jnp.zeros_like(rho))
    refreshed = count % c.inverse_every == 0
    info = _info(value, lam, alpha, mu, quad, rho, adapted, stats_ok,
                 refreshed if changed is None else refreshed | changed, finite,
                 2 * needs_quad, dt)
    new_state = ScaleByKfacState(
        optax.safe_increment(count), factors, weight.astype(dt), pre, scales,
        jnp.where(keep, new_lam, lam).astype(dt), velocity,
        next_key, info,
        None if setting is None else jnp.where(finite, setting, state.damping_setting),
        state.placement)
    return _place(new_state, out)


def _quadratic_settings(c: _Settings, layers: KfacLayers, statistics) -> _Settings:
    """The settings of the quadratic model: with one-pass ``statistics`` its model is
    `value_and_grad`'s forward replay (`replay`: the same program, so XLA computes that
    forward once for the whole step)."""
    if statistics is None:
        return c
    consts = tuple(layers.program.consts.values())
    return c._replace(model_fn=lambda p, **kw: replay(layers, p, kw, consts))


def _value_and_grad(c: _Settings, loss_fn: Callable) -> Callable:
    """`KfacTransformation.value_and_grad` of the transform configured by ``c``."""
    if not callable(loss_fn):
        raise TypeError(f"value_and_grad: `loss_fn` must be callable; got {loss_fn!r}.")

    def fn(params, state, **extra_args):
        kstate = _kfac_state(state)
        layers, kw = _layers_for(c.model_fn, params, extra_args, caller="value_and_grad")
        _check_state(layers, kstate)
        dt = factor_dtype(layers)
        lkw = _loss.kwargs_for(loss_fn, extra_args)
        _loss.check_call(loss_fn, "loss_fn", lkw, extra_args, caller="value_and_grad")

        def out_loss(out):
            return jnp.asarray(_validate.output(loss_fn(out, **lkw), "loss_fn",
                                                         has_aux=None))

        def full():
            stat_key = _split(kstate.key)[0] if c.sampled else None
            basis = kstate.inverses if c.inverse == "ekfac" else None
            return batch_value_grad_statistics(
                layers, params, kw, out_loss, stat_key, basis, likelihood=c.likelihood,
                num_samples=c.num_samples, convention=c.convention, variance=c.variance, dt=dt)

        def plain():  # a step without statistics: the gradient alone
            value, grads = jax.value_and_grad(lambda p: out_loss(c.model_fn(p, **kw)))(params)
            zeros = KfacStatistics(zero_factors(layers, dt),
                                   jax.tree.map(jnp.zeros_like, kstate.scales),
                                   jnp.asarray(False))
            return value, grads, zeros

        if isinstance(c.statistics_every, (int, np.integer)) and int(c.statistics_every) == 1:
            value, grads, stats = full()
        else:
            value, grads, stats = _xp.cond(kstate.count % c.statistics_every == 0,
                                           full, plain)
        return (value, grads), stats

    return fn


def init_state(layers: KfacLayers, params: PyTree, damping, key_data, inverse: str
               ) -> ScaleByKfacState:
    """The state before the first step: zero factors and weight, the preconditioner of zero
    factors at ``damping``, zero velocity, ``key_data``, an empty [`KfacInfo`][curvlib.KfacInfo]."""
    dt = factor_dtype(layers)
    zeros = zero_factors(layers, dt)
    lam = jnp.asarray(damping, dt)
    pre, scales = refresh(layers, zeros, jnp.ones((), dt), lam, inverse)
    zero, no = jnp.zeros((), dt), jnp.asarray(False)
    info = KfacInfo(
        loss=zero, damping=lam, learning_rate=zero, momentum=zero, quad_change=zero, rho=zero,
        damping_adapted=no, statistics_updated=no, refreshed=no, skipped=no,
        converged=jnp.asarray(True), finite=jnp.asarray(True),
        num_matvecs=jnp.zeros((), jnp.int32), status=_status.from_flags(),
    )
    return ScaleByKfacState(
        count=jnp.zeros((), jnp.int32), factors=zeros, ema_weight=zero, inverses=pre,
        scales=scales, damping=lam, velocity=_tree.zeros_like(params),
        key=jnp.asarray(key_data), info=info, damping_setting=lam,
    )


def place_state(layers: KfacLayers, state: ScaleByKfacState, params: PyTree) -> ScaleByKfacState:
    """``state`` placed as ``params`` are, with its `Placement`, when they are sharded.

    For parameters on one multi-device ``Auto`` mesh (`curvlib.kronecker._sharding`);
    otherwise ``state`` unchanged (``placement=None``).
    """
    shardings = _sharding.param_shardings(params)
    if shardings is None:
        return state
    _register_flax_placement()
    placement = Placement(tuple(jax.tree.leaves(_state_shardings(layers, shardings, state))),
                          tuple(shardings))
    return _place(state._replace(placement=placement), None)[1]


def _place(state: ScaleByKfacState, out):
    """``(out, state)`` constrained to ``state.placement`` (nothing without one)."""
    placement = state.placement
    if placement is None:
        return out, state
    core, treedef = jax.tree.flatten(state._replace(placement=None))
    core = jax.tree.unflatten(treedef, [
        _sharding.with_shardings(x, s) for x, s in zip(core, placement.state, strict=True)])
    if out is not None:
        leaves, treedef = jax.tree.flatten(out)
        out = jax.tree.unflatten(treedef, [
            _sharding.with_shardings(x, s) for x, s in zip(leaves, placement.params, strict=True)])
    return out, core._replace(placement=placement)


def _info(value, lam, alpha, mu, quad, rho, adapted, stats_ok, refreshed, finite, needs_quad,
          dt) -> KfacInfo:
    """The [`KfacInfo`][curvlib.KfacInfo] of a step, with the shared status fields."""
    tangents = jnp.asarray(2, jnp.int32) if needs_quad else adapted.astype(jnp.int32)
    return KfacInfo(
        loss=jnp.asarray(value, dt), damping=jnp.asarray(lam, dt),
        learning_rate=jnp.asarray(alpha, dt), momentum=jnp.asarray(mu, dt),
        quad_change=jnp.asarray(quad, dt), rho=jnp.asarray(rho, dt),
        damping_adapted=adapted, statistics_updated=stats_ok,
        refreshed=jnp.asarray(refreshed), skipped=~finite, converged=finite, finite=finite,
        num_matvecs=tangents, status=_status.from_flags(finite=finite, converged=finite),
    )


def _ekfac_scales(inverse, state, batch_scales, ok, decay):
    """EK-FAC's scalings between refreshes: their moving average (``inverse="ekfac"``)."""
    if inverse != "ekfac":
        return state.scales
    return moving_average(state.scales, batch_scales, ok, decay)


def _key_data(key):
    """The raw data of ``key`` (typed or legacy), or zeros for the exact Fisher (``None``)."""
    if key is None:
        return jnp.zeros((2,), jnp.uint32)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return jnp.asarray(key)


def _layers_for(model_fn, params, extra_args, checked: bool = False, caller: str = "update"):
    """The layers of ``model_fn`` at ``params`` and the extra arguments it takes (``checked``:
    the names were checked against ``model_fn``'s signature already, at construction;
    ``caller``: the call the extra arguments came to, ``"update"`` or ``"value_and_grad"``)."""
    if not checked:
        _loss.check_named_inputs(
            model_fn, "model_fn", extra_args, f"the extra arguments of {caller}",
            caller="update(grads, state, params, {})" if caller == "update" else
            "opt.value_and_grad(loss_fn)(params, state, {})")
    kw = _loss.kwargs_for(model_fn, extra_args)
    _sharding.refuse_explicit({"params": params, **kw}, "scale_by_kfac.init" if checked
                              else "value_and_grad" if caller == "value_and_grad"
                              else "scale_by_kfac.update")
    try:
        return _find_layers(lambda p, kw: model_fn(p, **kw), params, (kw,)), kw
    except ValueError as e:
        raise ValueError(f"scale_by_kfac: {e}") from None


def _current_damping(c: _Settings, state: ScaleByKfacState, dt):
    """``(lambda, setting, changed)``: the step's damping, the ``damping`` argument, whether it
    changed since the last step (then ``lambda`` restarts from it); ``setting`` and
    ``changed`` are ``None`` for a state without a recorded setting."""
    if state.damping_setting is None:
        return state.damping, None, None
    setting = jnp.asarray(c.damping, dt)
    changed = setting != state.damping_setting
    return jnp.where(changed, setting, state.damping), setting, changed


def _every(every, count, run, skip, also=None):
    """``run()`` when ``count % every == 0`` (or ``also``), else ``skip()`` (the state kept).

    ``every=None`` never runs. A static ``every == 1`` runs unconditionally.
    Otherwise a loop of at most one trip (`curvlib._tree.apply_if`), not a
    ``lax.cond``: a ``cond`` whose skip branch returns the factors or inverses
    copies them at every step.
    """
    if every is None:
        return skip()
    if isinstance(every, (int, np.integer)) and int(every) == 1:
        return run()
    due = count % every == 0
    return _tree.apply_if(due if also is None else due | also, lambda _: run(), skip())


def _state_shardings(layers, shardings, state):
    """The `ScaleByKfacState` of shardings: factors as the parameters are."""
    A, G, D = _sharding.factor_shardings(layers, shardings)
    rep = _sharding.replicated(shardings)
    if isinstance(state.inverses, Eigen):
        inv = Eigen(tuple(A[i] if l.kind != "embedding" else rep
                          for i, l in enumerate(layers.layers)),
                    tuple(rep for _ in A), tuple(G), tuple(rep for _ in G), tuple(D))
    else:
        inv = Inverses(tuple(A), tuple(G), tuple(D))
    scales = tuple(_sharding.outer(a, g) for a, g, _ in zip(A, G, state.scales, strict=False))
    return ScaleByKfacState(
        count=rep,
        factors=Factors(tuple(A), tuple(G), tuple(D)),
        ema_weight=rep,
        inverses=inv,
        scales=scales,
        damping=rep,
        velocity=jax.tree.unflatten(layers.treedef, shardings),
        key=rep,
        info=jax.tree.map(lambda _: rep, state.info),
        damping_setting=None if state.damping_setting is None else rep,
    )


def _split(key_data):
    k = jax.random.wrap_key_data(key_data)
    a, b = jax.random.split(k)
    return jax.random.key_data(a), jax.random.key_data(b)


def _check_state(layers: KfacLayers, state) -> None:
    if not isinstance(state, ScaleByKfacState):
        raise TypeError(f"scale_by_kfac: expected a ScaleByKfacState; got {type(state).__name__}.")
    ag, dshapes = layers.factor_shapes()
    have = (
        tuple((a.shape, g.shape) for a, g in zip(state.factors.A, state.factors.G, strict=False)),
        tuple(d.shape for d in state.factors.D),
    )
    if have != (ag, dshapes):
        raise ValueError(
            "scale_by_kfac: the layers found in `model_fn` on this batch differ from those "
            f"found on `example_inputs` at `init`: factor shapes {have} in the state, "
            f"{(ag, dshapes)} now. Pass `example_inputs` with the names and feature shapes "
            "of the extra arguments `update` receives."
        )


class KfacTransformation(optax.GradientTransformationExtraArgs):
    r"""An optax transform with K-FAC's one-pass gradient: ``init``, ``update``, ``value_and_grad``.

    ``value_and_grad(loss_fn)`` returns
    ``fn(params, state, **extra_args) -> ((value, grads), statistics)``:
    the loss $\ell(f)$ with ``loss_fn(outputs, **kw) -> scalar`` (``kw``: the
    entries of ``extra_args`` its signature names) at the outputs
    $f$ = ``model_fn(params, **kw)``, its gradient, and the
    batch's [`KfacStatistics`][curvlib.kronecker.KfacStatistics], from *one*
    forward pass of the model (``state``: this transform's state, or a state
    holding it, e.g. a chain's). Pass them on as
    ``update(grads, state, params, value=value, statistics=statistics, ...)``:
    the step then takes no statistics pass of its own and equals the two-pass
    step (``jax.value_and_grad`` then ``update`` without ``statistics``) to
    round-off. On steps that take no statistics (``count % statistics_every``
    not 0) it is ``jax.value_and_grad`` alone (a ``lax.cond``).

    ``loss_fn`` must be the loss of ``likelihood`` on the outputs; a regulariser
    of the parameters is added by the caller (its value and gradient).
    The rest is an ordinary ``optax.GradientTransformationExtraArgs``
    (``init, update = opt`` still unpacks).

    Attributes:
      init: optax's ``init(params) -> state``.
      update: optax's ``update(updates, state, params, *, value_fn=None,
        statistics=None, **extra_args) -> (updates, state)``.
      value_and_grad: ``value_and_grad(loss_fn) -> fn``, the one-pass gradient and
        statistics (above); not a tuple field, so ``optax`` wrappers
        (``inject_hyperparams``, ``MultiSteps``) return transforms without it.

    Cost of ``value_and_grad`` on a statistics step: one forward pass of the model,
    one backward pass for the gradient and one per sample (Monte Carlo) or per
    output entry (exact Fisher), batched into one pullback; the factor products
    ``O(n d^2)`` per factor. That is ``jax.value_and_grad`` plus `batch_statistics`
    less one forward pass.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.kronecker import kfac
      >>> def model(p, x):
      ...     return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
      >>> def out_loss(logits, y):  # the loss on the model's outputs
      ...     return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
      >>> def loss(p, x, y):
      ...     return out_loss(model(p, x), y)
      >>> kx, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
      >>> x = jax.random.normal(kx, (64, 5)); y = (x[:, 0] > 0).astype(jnp.int32)
      >>> p = {"w1": jax.random.normal(k1, (5, 8)) / 3, "b1": jnp.zeros(8),
      ...      "w2": jax.random.normal(k2, (8, 2)) / 3}
      >>> opt = kfac(model_fn=model, example_inputs={"x": x}, key=jax.random.PRNGKey(1))
      >>> state = opt.init(p)
      >>> @jax.jit
      ... def step(p, state):
      ...     (value, g), stats = opt.value_and_grad(out_loss)(p, state, x=x, y=y)
      ...     u, state = opt.update(g, state, p, value=value, value_fn=loss,
      ...                           statistics=stats, x=x, y=y)
      ...     return optax.apply_updates(p, u), state
      >>> first = float(loss(p, x, y))
      >>> for _ in range(20):
      ...     p, state = step(p, state)
      >>> float(loss(p, x, y)) < 0.5 * first
      True
    """

    def __new__(cls, init, update, value_and_grad=None):
        self = super().__new__(cls, init, update)
        self.value_and_grad = value_and_grad
        return self

    def __getnewargs__(self):
        return (self.init, self.update, self.value_and_grad)


def _kfac_state(state) -> ScaleByKfacState:
    """The one `ScaleByKfacState` in ``state`` (itself, or inside a chain's state)."""
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScaleByKfacState))
             if isinstance(s, ScaleByKfacState)]
    if len(found) != 1:
        raise ValueError(
            "value_and_grad: `state` must be the K-FAC transform's state or hold exactly one "
            f"ScaleByKfacState (e.g. a chain's); found {len(found)} in {type(state).__name__}.")
    return found[0]


def _check_statistics(layers: KfacLayers, state: ScaleByKfacState, stats) -> None:
    """``statistics=`` must be a `KfacStatistics` shaped as the state's factors and scalings."""
    if not isinstance(stats, KfacStatistics):
        raise TypeError(
            "scale_by_kfac: `statistics` must be the KfacStatistics returned by the "
            f"transform's `value_and_grad`; got {type(stats).__name__}.")
    shapes = lambda t: tuple(tuple(jnp.shape(x)) for x in jax.tree.leaves(t))  # noqa: E731
    want = (shapes(state.factors), shapes(state.scales), ())
    have = (shapes(stats.factors), shapes(stats.scales), tuple(jnp.shape(stats.finite)))
    if have != want or jax.tree.structure(stats.factors) != jax.tree.structure(state.factors):
        raise ValueError(
            "scale_by_kfac: `statistics` do not match this model's layers: factor shapes "
            f"{have[0]} and scalings {have[1]} given, {want[0]} and {want[1]} expected. "
            "Pass the statistics `value_and_grad` of this transform returned for these "
            "params and this batch.")


def _stack(*trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def kfac(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    model_fn: Callable,
    example_inputs: dict,
    likelihood: str = "categorical",
    momentum: float | str | None = None,
    damping: float = 1.0,
    adaptive_damping: bool = True,
    damping_every: int = 5,
    damping_decay: float = 0.95,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    ema_decay: float = 0.95,
    statistics_every: int = 1,
    inverse_every: int = 5,
    inverse: str = "factored",
    key: jax.Array | None = None,
    num_samples: int = 1,
    convention: str = "reduce",
    variance: float = 1.0,
    norm_constraint: float | None = None,
) -> KfacTransformation:
    r"""K-FAC optimiser: ``chain(scale_by_kfac(..., learning_rate), scale(-1))``.

    Built as curvlib's other aliases chain their links ([`curvlib.newton_cg`][curvlib.newton_cg],
    [`curvlib.newton`][curvlib.newton]): the direction transform, then the learning-rate
    link, with no line search. The step length enters [`scale_by_kfac`][curvlib.scale_by_kfac]
    itself (the quadratic model and the damping ratio need the step taken), so
    the link is the sign flip (the link of ``learning_rate=None``). No
    recompute-marker link (a sharded state would retrace its second jitted step on
    the marker's unplaced scalar), so ``value_fn`` is needed only for the damping.
    ``learning_rate=None`` (the default) takes the step length and momentum from
    the quadratic model (Martens & Grosse 2015, section 7); a scalar or
    schedule fixes the step length. Works under
    ``optax.inject_hyperparams(kfac, static_args=("model_fn", "num_samples"))(learning_rate=...,
    model_fn=...)`` (optax takes every callable for a schedule and injects every number;
    the model and the sample count, a shape, are static). The arguments are those of
    [`scale_by_kfac`][curvlib.scale_by_kfac], which has the details.

    Args:
      learning_rate: ``None`` for the step length (and momentum) from the quadratic model,
        else a scalar or schedule.
      model_fn: ``model_fn(params, **kw) -> outputs`` (logits or means), leading axis =
        examples; its layers are found in its jaxpr
        ([`find_layers`][curvlib.kronecker.find_layers]).
      example_inputs: a dict of the extra arguments ``update`` will receive, by the names
        ``model_fn``'s signature uses (arrays or ``jax.ShapeDtypeStruct``; any batch size):
        ``init`` traces the model on them to size the factors.
      likelihood: ``"categorical"``, ``"gaussian"`` or ``"bernoulli"``.
      momentum: ``"adaptive"`` (from the quadratic model), a float in ``[0, 1)``, or
        ``None``: adaptive when ``learning_rate`` is ``None``, else ``0``.
      damping: initial ``lambda > 0`` (traceable: a new value injected with
        ``optax.inject_hyperparams`` takes effect at the next step, restarting the
        adaptation from it and refreshing the preconditioner).
      adaptive_damping: adapt ``lambda`` by the Levenberg-Marquardt rule.
      damping_every: steps between damping adaptations.
      damping_decay: per-step factor; ``lambda`` moves by ``damping_decay ** damping_every``
        per adaptation.
      min_damping: lower clip of the adapted ``lambda``.
      max_damping: upper clip of the adapted ``lambda``.
      ema_decay: decay of the factor averages, in ``[0, 1)``.
      statistics_every: steps between factor statistics.
      inverse_every: steps between refreshes of the inverses.
      inverse: ``"factored"`` (factored Tikhonov damping), ``"exact"`` (the damped
        Kronecker block inverted through the factors' eigendecompositions) or ``"ekfac"``
        (that eigenbasis with EK-FAC's rescaled eigenvalues).
      key: ``None`` for exact-Fisher statistics, or a PRNG key for Monte-Carlo statistics
        with ``num_samples`` sampled targets.
      num_samples: Monte-Carlo targets per example.
      convention: weight sharing, ``"reduce"`` or ``"expand"``.
      variance: the Gaussian likelihood's variance (``None``: 1).
      norm_constraint: with a fixed ``learning_rate`` and ``momentum``, scale the step so
        that ``lr^2 g^T Delta <= norm_constraint`` (``None``: no constraint).

    Returns:
      A [`KfacTransformation`][curvlib.kronecker.KfacTransformation] (an
      `optax.GradientTransformationExtraArgs` with ``value_and_grad``, the
      one-pass gradient and statistics); its state is the chain's tuple,
      ``state[0]`` the [`ScaleByKfacState`][curvlib.ScaleByKfacState].

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.kronecker import kfac
      >>> def model(p, x):
      ...     return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
      >>> def loss(p, x, y):
      ...     return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(p, x), y))
      >>> kx, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
      >>> x = jax.random.normal(kx, (64, 5)); y = (x[:, 0] > 0).astype(jnp.int32)
      >>> p = {"w1": jax.random.normal(k1, (5, 8)) / 3, "b1": jnp.zeros(8),
      ...      "w2": jax.random.normal(k2, (8, 2)) / 3}
      >>> opt = kfac(model_fn=model, example_inputs={"x": x}, key=jax.random.PRNGKey(1))
      >>> state = opt.init(p)
      >>> @jax.jit
      ... def step(p, state):
      ...     value, g = jax.value_and_grad(loss)(p, x, y)
      ...     u, state = opt.update(g, state, p, value=value, value_fn=loss, x=x, y=y)
      ...     return optax.apply_updates(p, u), state, value
      >>> first = float(loss(p, x, y))
      >>> for _ in range(20):
      ...     p, state, value = step(p, state)
      >>> float(loss(p, x, y)) < 0.5 * first
      True
    """
    direction = scale_by_kfac(
        model_fn, example_inputs=example_inputs, likelihood=likelihood,
        learning_rate=learning_rate, momentum=momentum, damping=damping,
        adaptive_damping=adaptive_damping, damping_every=damping_every,
        damping_decay=damping_decay, min_damping=min_damping, max_damping=max_damping,
        ema_decay=ema_decay, statistics_every=statistics_every, inverse_every=inverse_every,
        inverse=inverse, key=key, num_samples=num_samples, convention=convention,
        variance=variance, norm_constraint=norm_constraint,
    )
    chain = optax.chain(direction, _chain.learning_rate_link(None))
    update = chain.update
    if getattr(direction.update, "compiled_when_eager", False):  # (its options no arrays)
        update = _chain.compiled_when_eager(update)
    return KfacTransformation(chain.init, update, direction.value_and_grad)
