r"""K-FAC as an optax transform that lives inside the user's ``jit``.

Each ``update`` is a list of named steps (Martens & Grosse 2015):

1. **Statistics** (every ``statistics_every`` steps, in a ``lax.cond``): the
   batch's Kronecker factors (`statistics`,
   exact Fisher or Monte Carlo with the state's key) enter a bias-corrected
   exponential moving average, $\bar F_t = \beta \bar F_{t-1} + (1 - \beta) F_t$
   normalised by $1 - \beta^t$. A non-finite batch leaves the average as it was.
2. **Refresh** (every ``inverse_every`` steps, in a ``lax.cond``): with
   ``inverse="factored"`` (default) the inverses $(A + \pi\sqrt\lambda I)^{-1}$
   and $(G + \sqrt\lambda/\pi\, I)^{-1}$ (Martens & Grosse's factored
   Tikhonov damping, by Cholesky, with the damping of that step); with
   ``"exact"`` or ``"ekfac"`` the eigendecompositions of the averaged factors
   (EK-FAC's eigenbasis scalings restart from $\lambda_A \lambda_G^\top$).
3. **Precondition**: $\Delta = (\tilde F + \lambda I)^{-1} g$: two small
   matrix products per layer with the stored inverses, or, through the
   eigendecompositions, the damped Kronecker block inverted exactly with the
   current damping (``"exact"``) or with EK-FAC's scalings (``"ekfac"``, George
   et al. 2018; the scalings are a moving average of the squared per-example
   gradients in the eigenbasis, updated with the statistics).
4. **Step from the quadratic model** (``learning_rate=None``): the update
   $u = \alpha \Delta + \mu u_{t-1}$ with $(\alpha, \mu)$ minimising
   the damped quadratic model
   $m(-u) = -g^\top u + \tfrac12 u^\top (F + \lambda I) u$ of the exact
   Fisher $F$ of the current batch: a 2x2 linear system whose entries
   need $J\Delta$ and $J u_{t-1}$ (one linearisation of the model,
   two tangent passes). With a fixed ``learning_rate`` and ``momentum``:
   $u = \text{lr}\,\Delta + \mu u_{t-1}$.
5. **Levenberg-Marquardt damping** (every ``damping_every`` steps, in a
   ``lax.cond``): $\rho = (h(\theta - u) - h(\theta)) / q(-u)$ against the
   undamped model $q(-u) = -g^\top u + \tfrac12 u^\top F u$;
   $\lambda \leftarrow \omega\lambda$ if $\rho > 3/4$,
   $\lambda/\omega$ if $\rho < 1/4$, with
   $\omega = \texttt{damping\_decay}^{\texttt{damping\_every}}$, clipped to
   ``[min_damping, max_damping]`` (as [`curvlib.newton_cg`][curvlib.newton_cg] adapts its damping).
6. **Guard**: a non-finite gradient, step or loss outputs zeros and keeps the
   state (``info.skipped``), so params and state stay usable.

The output is the *step* $u$ with the gradient's sign (the quadratic
model needs the step length, so the learning rate is applied here);
[`kfac`][curvlib.kfac] chains it with ``optax.scale(-1)``.

Cost per step, in forward/backward passes of the model on the batch: the
statistics one forward and one backward per sample (Monte Carlo) or per
output entry (exact, ``key=None``), one forward and two tangent passes for the
quadratic model (``learning_rate=None``), one forward pass for
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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvlib import _tree
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
    precondition,
    statistics,
    zero_factors,
)
from curvlib.kronecker.discovery import KfacLayers, _find_layers
from curvlib.optim import _common

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
      damping_adapted: the damping was adapted (``rho`` computed) this step.
      statistics_updated: the factor averages took this batch's statistics.
      refreshed: the eigendecompositions were recomputed.
      skipped: the gradient, the step or the loss was non-finite; the step
        output zeros and the state was kept.
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


def _check_every(name, value):
    if value is None:
        raise ValueError(f"`{name}` must be an integer >= 1; got None.")
    _common.check_int(name, value, 1)


def _discover(model_fn, params, kw, name="update"):
    return _find_layers(lambda p, kw: model_fn(p, **kw), params, (kw,))


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
    min_damping: float = 1e-6,
    max_damping: float = 1e6,
    ema_decay: float = 0.95,
    statistics_every: int = 1,
    inverse_every: int = 5,
    inverse: str = "factored",
    key: jax.Array | None = None,
    num_samples: int = 1,
    convention: str = "reduce",
    variance: float = 1.0,
    norm_constraint: float | None = None,
) -> optax.GradientTransformationExtraArgs:
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
    loss at ``params``.

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
      momentum: ``"adaptive"`` (from the quadratic model), a float, or ``None``:
        adaptive when ``learning_rate`` is ``None``, else ``0``.
      damping: initial ``lambda > 0`` (traceable).
      adaptive_damping: adapt ``lambda`` by the Levenberg-Marquardt rule.
      damping_every: steps between damping adaptations.
      damping_decay: per-step factor ``omega_1``; ``lambda`` moves by
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
      variance: the Gaussian likelihood's variance.
      norm_constraint: with a fixed ``learning_rate`` and ``momentum``, scale the step so that
        ``lr^2 g^T Delta <= norm_constraint`` (``None``: no constraint).

    Returns:
      An `optax.GradientTransformationExtraArgs` with state
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
    num_samples = check_options(likelihood, convention, num_samples, variance)
    for name, value in (("damping_every", damping_every), ("statistics_every", statistics_every),
                        ("inverse_every", inverse_every)):
        _check_every(name, value)
    _common.check_positive("damping", damping)
    _common.check_positive("min_damping", min_damping)
    _common.check_positive("max_damping", max_damping)
    _common.check_in_range("ema_decay", ema_decay, 0.0, 1.0)
    if _common.is_concrete(ema_decay) and float(np.asarray(ema_decay)) >= 1:
        raise ValueError(f"`ema_decay` must lie in [0, 1); got {ema_decay}.")
    _common.check_in_range("damping_decay", damping_decay, 0.0, 1.0)
    if inverse not in INVERSES:
        raise ValueError(f"`inverse` must be one of {INVERSES}; got {inverse!r}.")
    if not isinstance(example_inputs, dict):
        raise ValueError(
            "`example_inputs` must be a dict of the extra arguments `update` will receive "
            f"(e.g. {{'x': x}}); got {type(example_inputs).__name__}."
        )
    if momentum is None:
        momentum = "adaptive" if learning_rate is None else 0.0
    if isinstance(momentum, str) and momentum != "adaptive":
        raise ValueError(f"`momentum` must be 'adaptive', a float or None; got {momentum!r}.")
    adaptive_lr = learning_rate is None
    adaptive_mu = isinstance(momentum, str)
    needs_quad = adaptive_lr or adaptive_mu
    if norm_constraint is not None:
        _common.check_positive("norm_constraint", norm_constraint)
    monte_carlo = key is not None
    key_data = (
        jax.random.key_data(key) if monte_carlo and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        else (jnp.asarray(key) if monte_carlo else jnp.zeros((2,), jnp.uint32))
    )

    # where the state lives when `init` saw parameters sharded on a mesh (_sharding module)
    placement: dict = {}

    def layers_for(params, kw):
        kw = _common.kwargs_for(model_fn, kw)
        try:
            return _discover(model_fn, params, kw), kw
        except ValueError as e:
            raise ValueError(f"scale_by_kfac: {e}") from None

    def init_fn(params):
        _common.check_params("scale_by_kfac", params)
        layers, _ = layers_for(params, example_inputs)
        dt = factor_dtype(layers)
        zeros = zero_factors(layers, dt)
        pre, scales = _refresh(layers, zeros, jnp.asarray(damping, dt))
        zero = jnp.zeros((), dt)
        state = ScaleByKfacState(
            count=jnp.zeros((), jnp.int32),
            factors=zeros,
            ema_weight=zero,
            inverses=pre,
            scales=scales,
            damping=jnp.asarray(damping, dt),
            velocity=_tree.zeros_like(params),
            key=jnp.asarray(key_data),
            info=KfacInfo(
                loss=zero, damping=jnp.asarray(damping, dt), learning_rate=zero, momentum=zero,
                quad_change=zero, rho=zero, damping_adapted=jnp.asarray(False),
                statistics_updated=jnp.asarray(False),
                refreshed=jnp.asarray(False), skipped=jnp.asarray(False),
            ),
        )
        shardings = _sharding.param_shardings(params)
        placement.clear()
        if shardings is not None:
            placement["layers"] = layers
            placement["state"] = _state_shardings(layers, shardings, state, params)
            placement["params"] = jax.tree.unflatten(layers.treedef, shardings)
            state = _sharding.with_shardings(state, placement["state"])
        return state

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        params = _common.require_params("scale_by_kfac", params)
        if adaptive_damping:
            value_fn = _common.require_value_fn("scale_by_kfac", value_fn)
        layers, kw = layers_for(params, extra_args)
        _check_state(layers, state)
        dt = factor_dtype(layers)
        g = updates
        count = state.count
        lam = state.damping
        batched = batch_leaves((kw,))
        consts = tuple(layers.program.consts.values())

        # 1. statistics (EK-FAC: with the scalings in the current eigenbasis)
        stat_key, next_key = _split(state.key) if monte_carlo else (None, state.key)
        factors, weight, stats_ok, batch_scales = _every(
            statistics_every, count,
            lambda: _accumulate(layers, state, params, batched, consts, stat_key, dt),
            lambda: (state.factors, state.ema_weight, jnp.asarray(False), state.scales),
        )
        # 2. refresh (EK-FAC: a new eigenbasis restarts the scalings from lA lG^T)
        refresh = count % inverse_every == 0
        pre, scales = _every(
            inverse_every, count,
            lambda: _refresh(layers, _normalised(factors, weight), lam),
            lambda: (state.inverses, _scales_average(state.scales, batch_scales, stats_ok, dt)),
        )
        # 3. precondition
        delta = precondition(layers, pre, g, lam, dt, scales if inverse == "ekfac" else None)
        # 4. step
        u_prev = state.velocity
        if needs_quad:
            alpha, mu, quad = _quadratic_step(
                model_fn, likelihood, variance, params, kw, g, delta, u_prev, lam,
                None if adaptive_lr else _lr(learning_rate, count, dt),
                None if adaptive_mu else jnp.asarray(momentum, dt), dt,
            )
        else:
            alpha = _lr(learning_rate, count, dt)
            mu = jnp.asarray(momentum, dt)
            quad = jnp.zeros((), dt)
            if norm_constraint is not None:
                sq = alpha**2 * _tree.vdot(g, delta).astype(dt)
                alpha = alpha * jnp.minimum(1.0, jnp.sqrt(norm_constraint / jnp.maximum(sq, 1e-30)))
        u = _tree.add(_tree.scale(alpha, delta), _tree.scale(mu, u_prev))
        # 5. damping
        value = _value(value_fn, params, extra_args, dt)
        if adaptive_damping:
            new_lam, rho, quad, adapted = _every(
                damping_every, count + 1,
                lambda: _adapt_damping(
                    model_fn, likelihood, variance, value_fn, params, kw, extra_args, g, u,
                    quad if needs_quad else None, lam, value, damping_decay**damping_every,
                    min_damping, max_damping, dt,
                ),
                lambda: (lam, jnp.zeros((), dt), quad, jnp.asarray(False)),
            )
        else:
            new_lam, rho, adapted = lam, jnp.zeros((), dt), jnp.asarray(False)
        # 6. guard
        finite = _common.all_finite(g, u) & jnp.isfinite(alpha) & jnp.isfinite(mu)
        if value_fn is not None or extra_args.get("value") is not None:
            finite = finite & jnp.isfinite(value)
        new_lam = jnp.where(finite & jnp.isfinite(new_lam), new_lam, lam)
        out = _common.select_tree(finite, u, _tree.zeros_like(u))
        out = jax.tree.map(lambda o, x: o.astype(jnp.result_type(x)), out, updates)
        velocity = _common.select_tree(finite, u, u_prev)
        info = KfacInfo(
            loss=jnp.asarray(value, dt), damping=jnp.asarray(lam, dt),
            learning_rate=jnp.asarray(alpha, dt), momentum=jnp.asarray(mu, dt),
            quad_change=jnp.asarray(quad, dt), rho=jnp.asarray(rho, dt),
            damping_adapted=adapted, statistics_updated=stats_ok,
            refreshed=jnp.asarray(refresh), skipped=~finite,
        )
        new_state = ScaleByKfacState(
            count=optax.safe_increment(count),
            factors=factors,
            ema_weight=weight,
            inverses=pre,
            scales=scales,
            damping=jnp.asarray(new_lam, dt),
            velocity=velocity,
            key=next_key,
            info=info,
        )
        if placement.get("layers") == layers:
            new_state = _sharding.with_shardings(new_state, placement["state"])
            out = _sharding.with_shardings(out, placement["params"])
        return out, new_state

    def _accumulate(layers, state, params, batched, consts, k, dt):
        if k is not None:
            k = jax.random.wrap_key_data(k)
        basis = state.inverses if inverse == "ekfac" else None
        out = statistics(layers, params, batched, consts=consts, likelihood=likelihood, key=k,
                         num_samples=num_samples, convention=convention, variance=variance,
                         eigenbasis=basis)
        f = out[0]
        batch_scales = tuple(x.astype(dt) for x in out[2]) if basis is not None else ()
        ok = _common.all_finite(f) & _common.all_finite(batch_scales)
        beta = jnp.asarray(ema_decay, dt)
        new = jax.tree.map(lambda old, x: beta * old + (1 - beta) * x.astype(dt),
                           state.factors, f)
        new = _common.select_tree(ok, new, state.factors)
        weight = jnp.where(ok, beta * state.ema_weight + (1 - beta), state.ema_weight)
        return new, weight.astype(dt), ok, batch_scales

    def _scales_average(old, batch, ok, dt):
        if inverse != "ekfac":
            return old
        beta = jnp.asarray(ema_decay, dt)
        return tuple(jnp.where(ok, beta * o + (1 - beta) * b, o) for o, b in
                     zip(old, batch, strict=True))

    def _refresh(layers, factors, lam):
        """The new preconditioner and EK-FAC scalings (``()`` unless ``inverse="ekfac"``)."""
        if inverse == "factored":
            return factored_inverses(layers, factors, lam), ()
        eig = eigen(layers, factors)
        if inverse == "exact":
            return eig, ()
        return eig, tuple(la[:, None] * lg[None, :] for la, lg in
                          zip(eig.lA, eig.lG, strict=True))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- named steps


def _every(every, count, run, skip):
    """``run()`` when ``count % every == 0``, else ``skip()`` (the state kept as it is).

    A static ``every == 1`` runs unconditionally. Otherwise a loop of at most one
    trip (`curvlib._tree.apply_if`), not a ``lax.cond``: a ``cond`` whose
    skip branch returns the factors or inverses copies them at every step.
    """
    if isinstance(every, (int, np.integer)) and int(every) == 1:
        return run()
    return _tree.apply_if(count % every == 0, lambda _: run(), skip())


def _state_shardings(layers, shardings, state, params):
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


def _normalised(factors: Factors, weight):
    w = jnp.maximum(weight, jnp.finfo(weight.dtype).tiny)
    return jax.tree.map(lambda f: f / w, factors)


def _lr(learning_rate, count, dt):
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    return jnp.asarray(lr, dt)


def _fisher_quadratics(model_fn, likelihood, variance, params, kw, tangents, dt):
    """Entries ``t_i^T F t_j`` of the exact Fisher of the batch for stacked tangents."""
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
    return q


def _stack(*trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _quadratic_step(model_fn, likelihood, variance, params, kw, g, delta, u_prev, lam,
                    fixed_alpha, fixed_mu, dt):
    """``(alpha, mu, q)``: coefficients minimising the damped model and its undamped change."""
    q = _fisher_quadratics(model_fn, likelihood, variance, params,
                           kw, _stack(_tree.astype(delta, dt), _tree.astype(u_prev, dt)), dt)
    dd, du, uu = q[0][0], q[0][1], q[1][1]
    vdd = _tree.vdot(delta, delta).astype(dt)
    vdu = _tree.vdot(delta, u_prev).astype(dt)
    vuu = _tree.vdot(u_prev, u_prev).astype(dt)
    gd = _tree.vdot(g, delta).astype(dt)
    gu = _tree.vdot(g, u_prev).astype(dt)
    a11, a12, a22 = dd + lam * vdd, du + lam * vdu, uu + lam * vuu
    tiny = jnp.finfo(dt).tiny
    has_u = vuu > 0
    if fixed_alpha is None and fixed_mu is None:
        det = a11 * a22 - a12 * a12
        ok2 = has_u & (det > 1e-12 * jnp.abs(a11 * a22))
        det_safe = jnp.where(ok2, det, 1.0)
        alpha2 = (a22 * gd - a12 * gu) / det_safe
        mu2 = (a11 * gu - a12 * gd) / det_safe
        alpha1 = gd / jnp.maximum(a11, tiny)
        alpha = jnp.where(ok2, alpha2, alpha1)
        mu = jnp.where(ok2, mu2, 0.0)
    elif fixed_mu is None:  # alpha fixed, mu from the model
        alpha = fixed_alpha
        mu = jnp.where(has_u, (gu - alpha * a12) / jnp.where(has_u, a22, 1.0), 0.0)
    else:  # mu fixed, alpha from the model
        mu = fixed_mu
        alpha = (gd - mu * a12) / jnp.maximum(a11, tiny)
    quad = -(alpha * gd + mu * gu) + 0.5 * (alpha**2 * dd + 2 * alpha * mu * du + mu**2 * uu)
    return alpha.astype(dt), mu.astype(dt), quad.astype(dt)


def _value(value_fn, params, extra_args, dt):
    """The loss at ``params``: ``value=`` when passed, else ``value_fn``, else NaN (unknown)."""
    if extra_args.get("value") is not None:
        return jnp.asarray(extra_args["value"]).astype(dt)
    if value_fn is not None:
        return jnp.asarray(_common.call(value_fn, params, extra_args)).astype(dt)
    return jnp.full((), jnp.nan, dt)


def _adapt_damping(model_fn, likelihood, variance, value_fn, params, kw, extra_args, g, u, quad,
                   lam, value, decay, min_damping, max_damping, dt):
    """``(new lambda, rho, quad, True)`` by the Levenberg-Marquardt rule.

    ``rho = (h(params - u) - h(params)) / q(-u)`` against the undamped model
    change ``quad`` (computed here from the exact Fisher when ``None``); ``lambda``
    shrinks by ``decay`` when ``rho > 3/4`` and grows by ``1 / decay`` when
    ``rho < 1/4`` (a non-finite trial loss gives ``rho = -inf``).
    """
    trial = jnp.asarray(_common.call(value_fn, _tree.sub(params, u), extra_args)).astype(dt)
    if quad is None:
        quad = _undamped_change(model_fn, likelihood, variance, params, kw, g, u, dt)
    tiny = jnp.finfo(dt).tiny
    rho = (trial - value) / jnp.minimum(quad, -tiny)
    rho = jnp.where(jnp.isfinite(rho), rho, -jnp.inf).astype(dt)
    factor = jnp.where(rho > 0.75, decay, jnp.where(rho < 0.25, 1.0 / decay, 1.0))
    new_lam = jnp.clip(lam * factor, min_damping, max_damping).astype(dt)
    new_lam = jnp.where(jnp.isfinite(value), new_lam, lam)
    return new_lam, rho, jnp.asarray(quad, dt), jnp.asarray(True)


def _undamped_change(model_fn, likelihood, variance, params, kw, g, u, dt):
    q = _fisher_quadratics(model_fn, likelihood, variance, params, kw,
                           _stack(_tree.astype(u, dt)), dt)
    return -_tree.vdot(g, u).astype(dt) + 0.5 * q[0][0]


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
    min_damping: float = 1e-6,
    max_damping: float = 1e6,
    ema_decay: float = 0.95,
    statistics_every: int = 1,
    inverse_every: int = 5,
    inverse: str = "factored",
    key: jax.Array | None = None,
    num_samples: int = 1,
    convention: str = "reduce",
    variance: float = 1.0,
    norm_constraint: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""K-FAC optimiser: ``chain(scale_by_kfac(..., learning_rate), scale(-1))``.

    ``learning_rate=None`` (the default) takes the step length and momentum from
    the quadratic model (Martens & Grosse 2015, section 7); a scalar or
    schedule fixes the step length. Works under
    ``optax.inject_hyperparams(kfac)(learning_rate=...)``. The arguments are those of
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
      momentum: ``"adaptive"`` (from the quadratic model), a float, or ``None``: adaptive
        when ``learning_rate`` is ``None``, else ``0``.
      damping: initial ``lambda > 0`` (traceable).
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
      variance: the Gaussian likelihood's variance.
      norm_constraint: with a fixed ``learning_rate`` and ``momentum``, scale the step so
        that ``lr^2 g^T Delta <= norm_constraint`` (``None``: no constraint).

    Returns:
      An `optax.GradientTransformationExtraArgs`: ``chain(scale_by_kfac(...), scale(-1))``.

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
    return optax.chain(
        scale_by_kfac(
            model_fn,
            example_inputs=example_inputs,
            likelihood=likelihood,
            learning_rate=learning_rate,
            momentum=momentum,
            damping=damping,
            adaptive_damping=adaptive_damping,
            damping_every=damping_every,
            damping_decay=damping_decay,
            min_damping=min_damping,
            max_damping=max_damping,
            ema_decay=ema_decay,
            statistics_every=statistics_every,
            inverse_every=inverse_every,
            inverse=inverse,
            key=key,
            num_samples=num_samples,
            convention=convention,
            variance=variance,
            norm_constraint=norm_constraint,
        ),
        optax.scale(-1.0),
    )
