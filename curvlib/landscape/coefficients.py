"""The increment field ``L_{k+1} - L_k`` and its local quadratic coefficients ``(a, c, B)``.

Around ``w*`` (Kiselev & Grabovoy 2026; ``docs/landscape.md``):

    L_{k+1}(w) - L_k(w) ~= a + b^T (w - w*) + 1/2 (w - w*)^T A (w - w*)
    a = L_{k+1}(w*) - L_k(w*),  b = g^(k+1)(w*) - g^(k)(w*),  A = H^(k+1)(w*) - H^(k)(w*)

and, compressed to an orthonormal basis ``U`` (rows = eigenvectors),
``c = U b`` and ``B = U A U^T`` (symmetrised).

For a mean loss every difference above follows from the exact identity
``L_{k+1} - L_k = (l_{k+1} - L_k) / (k + 1)``, which is how they are computed:
``a``, ``b`` and ``A`` are the value, gradient and Hessian of one weighted sum
of per-sample losses, ``sum_{i<k} -l_i / (k (k+1)) + l_{k+1} / (k+1)``, with no
subtraction of two nearly equal means (which in float32 would cancel most
digits of ``b`` and ``A``). ``k`` enters as data, so one compiled program
serves every ``k``. That ``loss_fn`` is a mean over its batch is checked at
the probe point first ([`check_mean_loss`][curvlib.landscape.check_mean_loss]), which is what
catches a ``loss_fn`` that sums.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _deprecation, _space, _tree, _validate, _xp
from curvlib._compile import BEHIND, SameFunction, eager_jit, quick_jit, tracing
from curvlib._xp import xp
from curvlib.landscape import _common

PyTree = Any


class IncrementCoefficients(NamedTuple):
    """Quadratic model of the increment field in a subspace.

    Attributes:
      a: ``L_{k+1}(w*) - L_k(w*)`` (scalar).
      c: ``U (g^(k+1) - g^(k))`` (shape ``(D,)``).
      B: ``U (H^(k+1) - H^(k)) U^T`` symmetrised (shape ``(D, D)``).
    """

    a: jax.Array
    c: jax.Array
    B: jax.Array

    def prefix(self, dim: int) -> IncrementCoefficients:
        """The coefficients of the nested subspace spanned by the first ``dim`` vectors.

        ``c[:dim]`` and ``B[:dim, :dim]``: no new products, so one subspace of
        size ``Dmax`` serves every ``D <= Dmax``.

        Args:
          dim: the nested dimension, ``1 <= dim <= Dmax``.

        Returns:
          The [`IncrementCoefficients`][curvlib.landscape.IncrementCoefficients] of that subspace.
        """
        d = int(self.c.shape[-1])
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= d:
            raise ValueError(
                f"`dim` (the nested subspace dimension) must be an int in [1, D] with D = {d} "
                f"the size of these coefficients; got {dim!r}."
            )
        if not _space.on_one_device(self):  # traced, or placed on several devices
            return IncrementCoefficients(self.a, self.c[..., :dim], self.B[..., :dim, :dim])
        c, B = np.asarray(self.c)[..., :dim], np.asarray(self.B)[..., :dim, :dim]
        return IncrementCoefficients(self.a, *jax.device_put((c, B)))  # (no slice compiles)


# --------------------------------------------------- the mean-loss check


@quick_jit(static_argnames=("loss_fn", "microbatch_size"))  # (once per call: compiled cheaply)
def _mean_check(loss_fn, params, data, k, microbatch_size):
    """Per chunk holding the first ``k + 1`` samples: ``|loss_fn(chunk) - mean_j l_j|``.

    Also returns ``L_k`` and ``l_{k+1}`` (from the per-sample losses), the
    largest ``|l_j|``, for the messages and the tolerance, and the eps of the loss's dtype.
    """
    data = _common.chunkable(data, microbatch_size)
    n = _common.num_samples(data)
    dt = _common.weight_dtype(params)
    W = jnp.stack([_common.sample_weights(n, k, _common.MEAN, dt),
                   _common.sample_weights(n, k, _common.SAMPLE, dt)])
    safe = _common.sample_at(data, k)
    loss_dtypes = []  # (seen while tracing `chunk`, below)

    def chunk(xs, ws):
        x = _common._substitute(xs, jnp.any(ws != 0, axis=0), safe)
        per = _common.per_sample_losses(loss_fn, params, x).astype(dt)
        batched = jnp.asarray(loss_fn(params, x))
        loss_dtypes.append(batched.dtype)
        dev = jnp.abs(batched.astype(dt) - jnp.mean(per))
        return jnp.stack([dev, jnp.sum(ws[0] * per), jnp.sum(ws[1] * per),
                          jnp.max(jnp.abs(per))])

    out = _common.accumulate(chunk, jnp.zeros(4, dt), data, W, microbatch_size, 0, k + 1)
    eps = max(float(jnp.finfo(d if jnp.issubdtype(d, jnp.inexact) else dt).eps)
              for d in loss_dtypes)
    return out[0], out[1], out[2], out[3], jnp.asarray(eps, dt)


@_deprecation.renamed("curvlib.landscape.check_mean_loss", k="num_examples")
def check_mean_loss(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    num_examples: int,
    *,
    microbatch_size: int | None = None,
    rtol: float | None = None,
) -> None:
    """Raise ``ValueError`` unless ``loss_fn`` behaves as a mean over the sample axis.

    Every landscape quantity is a weighted sum of per-sample losses
    ``l_i = loss_fn(params, data[i:i+1])``; this checks the assumption behind
    that at ``params``: on the samples that ``L_{k+1}`` uses (the whole
    ``data``, samples past ``k + 1`` replaced by sample ``k + 1``; or each
    chunk of ``microbatch_size`` samples), the batched loss equals the mean of
    the per-sample losses. A loss that sums over the batch, or weights samples
    unequally, fails by an amount of the order of the loss itself. A
    sample-independent term (a weight-decay penalty) passes: it cancels from
    every increment, so the criteria are unchanged by it. With
    ``microbatch_size=1`` every chunk is a single sample and the check cannot
    fail. It reads values, so it runs on concrete arguments only: inside
    ``jax.jit`` (``params`` or ``data`` traced) it returns without checking, and so
    does every landscape function's ``check_mean=True``; run it once eagerly
    before jitting a loop of landscape calls.

    One compiled program for every ``k`` (the sample count is data). Cost:
    two forward passes over the samples (batched and per sample).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the probe point.
      data: the ordered samples.
      num_examples: ``k``, the number of examples averaged in ``L_k`` (the paper's sample count),
        ``1 <= k < n``.
      microbatch_size: optional chunk size over the samples.
      rtol: tolerance relative to the largest per-sample loss; default
        ``10 sqrt(eps)`` of the loss dtype.

    Raises:
      ValueError: if ``loss_fn`` is not a mean, or for a bad ``k``; also if the
        loss is NaN/Inf at ``params``, where the check cannot run: the message
        names the source (``params``, the first ``k + 1`` samples of
        ``data``, or ``loss_fn`` itself). The estimators' ``check_mean=False``
        skips the check, and the NaN/Inf then propagates into their results.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.landscape import check_mean_loss
      >>> x = jnp.array([0.0, 1.0, 2.0, 3.0])
      >>> check_mean_loss(lambda w, b: jnp.mean((b - w) ** 2), 0.5, x, 2)  # passes
      >>> check_mean_loss(lambda w, b: jnp.sum((b - w) ** 2), 0.5, x, 2)
      Traceback (most recent call last):
      ...
      ValueError: `loss_fn` does not behave as a mean over the leading axis of its batch: ...
    """
    k, loss_fn = _common.check_problem(loss_fn, params, data, num_examples)
    mb = _validate.static_int(microbatch_size, "microbatch_size", minimum=1, optional=True)
    _validate.number(rtol, "rtol", minimum=0, optional=True)
    mean_check(loss_fn, params, data, k, mb, rtol)


def mean_check(loss_fn, params, data, k, mb, rtol=None) -> None:
    """`check_mean_loss` on checked arguments: no argument checks."""
    if tracing(params, data, k):
        return  # inside a user's jit: nothing concrete to compare
    if mb is not None and isinstance(loss_fn, SameFunction):
        loss_fn = loss_fn.fn  # evaluated on chunks: shapes its key does not cover
    dev, Lk, l1, scale, eps = (float(x) for x in _mean_check(loss_fn, params, data, k, mb))
    L1 = (k * Lk + l1) / (k + 1)
    if not all(np.isfinite(v) for v in (Lk, l1, scale)):
        raise ValueError(_non_finite_message(params, data, k, L1, Lk, l1))
    # (the loss's dtype, as documented: bfloat16 parameters under a float32 loss gave a
    # tolerance of 0.88, and a summed loss passed)
    rtol = 10.0 * np.sqrt(eps) if rtol is None else float(rtol)
    if not np.isfinite(dev) or dev > rtol * max(scale, np.finfo(np.float64).tiny):
        raise ValueError(
            "`loss_fn` does not behave as a mean over the leading axis of its batch: on the "
            f"first k+1 = {k + 1} samples the batched loss differs from the mean of the "
            f"per-sample losses loss_fn(params, data[i:i+1]) by {dev:.6g} (per-sample losses "
            f"up to {scale:.6g}; L_k = {Lk:.6g}, l_{{k+1}} = {l1:.6g}). The landscape "
            "criteria assume L_m(w) = (1/m) sum_i l_i(w); reduce the batch with a mean "
            "(e.g. jnp.mean) instead of a sum."
        )


def _non_finite_message(params, data, k, L1, Lk, l1) -> str:
    """Why the losses of `check_mean_loss` are NaN/Inf: ``params``, ``data`` or the loss."""
    causes = []
    if not _tree.all_finite(params):
        causes.append("`params` has NaN/Inf entries")
    bad = set()
    for x in jax.tree.leaves(data):
        x = np.asarray(x[: k + 1])
        if x.size and np.issubdtype(x.dtype, np.inexact):
            bad.update(np.flatnonzero(~np.isfinite(x.reshape(k + 1, -1)).all(axis=1)).tolist())
    if bad:
        idx = sorted(bad)
        shown = ", ".join(map(str, idx[:5])) + (", ..." if len(idx) > 5 else "")
        causes.append(
            f"`data` has NaN/Inf entries in {len(idx)} of its first k+1 = {k + 1} samples "
            f"(sample indices {shown})"
        )
    if not causes:
        causes.append("`loss_fn` returned NaN/Inf on finite `params` and `data`")
    return (
        f"the loss is not finite at the probe point (L_k={Lk:.6g}, L_{{k+1}}={L1:.6g}, "
        f"l_{{k+1}}={l1:.6g}, k={k}): {'; '.join(causes)}. The mean-loss check cannot run on "
        "non-finite losses; clean the inputs, or pass `check_mean=False` to compute anyway "
        "(the NaN/Inf then propagates into the result)."
    )


# -------------------------------------------------------- the increment


@eager_jit(static_argnames=("loss_fn", "microbatch_size"))
def _loss_increment(loss_fn, params, data, k, microbatch_size):
    return _common.increment(loss_fn, params, data, k, microbatch_size)


@_deprecation.renamed("curvlib.landscape.loss_increment", k="num_examples")
def loss_increment(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    num_examples: int,
    *,
    microbatch_size: int | None = None,
    check_mean: bool = True,
) -> jax.Array:
    """The increment field ``L_{k+1}(w) - L_k(w)`` at ``w = params``.

    Computed as ``(l_{k+1}(w) - L_k(w)) / (k + 1)``, exact for a mean loss and
    free of the cancellation of ``L_{k+1} - L_k``, as one weighted sum of
    per-sample losses (``k`` is data: one compiled program for every ``k``).
    Cost: ``k + 1`` per-sample losses (all ``n`` samples of ``data`` without
    microbatching).

    Args:
      loss_fn: ``loss_fn(params, batch)``, the mean loss over the batch's leading axis.
      params: the point ``w``.
      data: ordered samples (pytree, leading axis = sample order).
      num_examples: ``k``, the number of examples averaged in ``L_k`` (the paper's sample count),
        ``1 <= k < n``.
      microbatch_size: chunk size over the samples (bounds memory).
      check_mean: verify that ``loss_fn`` is a mean at ``params`` first
        ([`check_mean_loss`][curvlib.landscape.check_mean_loss]): the mean identity
        above holds for a mean only.

    Returns:
      A scalar in the loss dtype (at least float32).

    Raises:
      ValueError: ``k`` outside ``[1, n)``, or with ``check_mean`` a ``loss_fn``
        that is not a mean (or NaN/Inf losses at ``params``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.landscape import loss_increment
      >>> loss = lambda w, x: jnp.mean((x - w) ** 2)
      >>> x = jnp.array([0.0, 1.0, 2.0])
      >>> round(float(loss_increment(loss, jnp.array(0.0), x, 2)), 4)  # 5/3 - 1/2
      1.1667
    """
    k, loss_fn = _common.check_problem(loss_fn, params, data, num_examples)
    mb = _validate.static_int(microbatch_size, "microbatch_size", minimum=1, optional=True)
    if check_mean:
        mean_check(loss_fn, params, data, k, mb)
    return _loss_increment(loss_fn, params, data, k, mb)


# ----------------------------------------------------------- coefficients


def _block(fn, U, sequential):
    """``fn`` on every basis vector: all at once (``vmap``) or one at a time (``lax.map``)."""
    return jax.lax.map(fn, U) if sequential else jax.vmap(fn)(U)


def _zeros_acc(tree):
    return _tree.acc_zeros_like(tree)  # typed like the leaves on an Explicit mesh


def _value_grad_products(f, params, U, mode, sequential):
    """``(f(params), grad f(params), H U)`` with ``H`` the Hessian of ``f``; one call site.

    ``mode`` ``None``/``"linearize"``: one linearisation of ``value_and_grad``
    and a tangent pass per vector; ``"fwd-rev"``/``"rev-rev"``: the products are
    recomputed from scratch (no stored residuals).
    """
    if mode in (None, "linearize"):
        (v, g), lin = jax.linearize(jax.value_and_grad(f), params)
        return v, g, _block(lambda u: lin(u)[1], U, sequential)
    v, g = jax.value_and_grad(f)(params)
    if mode == "fwd-rev":
        prod = lambda u: jax.jvp(jax.grad(f), (params,), (u,))[1]
    else:
        prod = lambda u: jax.grad(lambda p: _tree.vdot(jax.grad(f)(p), u))(params)
    return v, g, _block(prod, U, sequential)


@eager_jit(static_argnames=("loss_fn", "microbatch_size", "mode"))
def _coefficients(loss_fn, params, data, k, U, microbatch_size, mode, ritz_values=None):
    data = _common.chunkable(data, microbatch_size)
    n = _common.num_samples(data)
    dt = _common.weight_dtype(params)
    safe = _common.sample_at(data, k)
    seq = microbatch_size is not None
    k1 = jnp.asarray(k, jnp.int32) + 1
    w_inc = _common.sample_weights(n, k, _common.INCREMENT, dt)
    zero = jnp.zeros((), dt)
    if ritz_values is None:
        # a, b and A U from one objective: the increment's weighted per-sample sum
        def chunk(xs, ws):
            f = lambda p: _common.weighted_loss(loss_fn, p, xs, ws, safe)
            return _value_grad_products(f, params, U, mode, seq)

        a, b, AU = _common.accumulate(chunk, (zero, _zeros_acc(params), _zeros_acc(U)), data,
                                      w_inc, microbatch_size, 0, k1)
        M = _tree.basis_gram(U, AU)
    else:
        # U are Ritz vectors of H^(k): U H^(k) U^T = diag(theta), so only the products
        # with the single-sample Hessian are needed
        def grad_chunk(xs, ws):
            return jax.value_and_grad(
                lambda p: _common.weighted_loss(loss_fn, p, xs, ws, safe))(params)

        a, b = _common.accumulate(grad_chunk, (zero, _zeros_acc(params)), data, w_inc,
                                  microbatch_size, 0, k1)
        # sample k+1 alone (a static one-sample batch whatever k is): D products cost one
        # sample each
        one = jax.tree.map(lambda x: x[None], safe)
        f1 = lambda p: jnp.asarray(loss_fn(p, one)).astype(dt)
        HU = _value_grad_products(f1, params, U, mode, seq)[2]
        theta = jnp.asarray(ritz_values).astype(dt)
        M = (_tree.basis_gram(U, HU).astype(dt) - jnp.diag(theta)) / k1.astype(dt)
    c = _tree.basis_project(U, b)
    M = M.astype(dt)
    return IncrementCoefficients(a.astype(dt), c.astype(dt), 0.5 * (M + M.T))


@_deprecation.renamed("curvlib.landscape.increment_coefficients", k="num_examples")
def increment_coefficients(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    num_examples: int,
    eigenvectors: PyTree,
    *,
    microbatch_size: int | None = None,
    mode: str | None = None,
    check_mean: bool = True,
    eigenvalues: jax.Array | None = None,
) -> IncrementCoefficients:
    """``(a, c, B)``: the increment's quadratic model at ``params`` in the span of ``eigenvectors``.

    ``a = L_{k+1} - L_k``, ``c = U (g^(k+1) - g^(k))``,
    ``B = sym(U (H^(k+1) - H^(k)) U^T)``, with ``U`` the rows of ``eigenvectors``
    (e.g. [`curvature_subspace`][curvlib.landscape.curvature_subspace]'s, orthonormal). By the mean
    identity ``a``, ``b = g^(k+1) - g^(k)`` and ``A = H^(k+1) - H^(k)`` are the value,
    gradient and Hessian of one weighted sum of per-sample losses
    (``-1/(k(k+1))`` for the first ``k`` samples, ``1/(k+1)`` for sample
    ``k + 1``): one linearisation gives ``a`` and ``b``, and ``D`` tangent
    passes give ``A U``. One compiled program for every ``k``.

    Cost: one gradient and ``D`` Hessian-vector products of that sum, each
    over all ``n`` samples of ``data`` (over the ``ceil((k+1)/m)`` chunks
    holding the first ``k + 1`` with ``microbatch_size = m``); ``O(D^2 N)`` for
    the projections. Memory: ``2D`` parameter-sized vectors plus the
    linearisation's residuals; the ``D`` products run all at once under
    ``vmap``, or one at a time when microbatching.

    With ``eigenvalues`` (the Ritz values that came with ``eigenvectors`` from
    [`curvature_subspace`][curvlib.landscape.curvature_subspace] on the same ``params``, ``data``
    and ``k``) the ``D`` products are taken with the Hessian of the single sample ``k + 1``
    only (one sample each, whatever ``k``), and ``U H^(k) U^T = diag(theta)``:
    Rayleigh-Ritz makes ``x_i^T H^(k) x_j = theta_i delta_ij`` for Ritz pairs
    *whatever their residual* (``x_i = Q^T y_i`` with ``y_i`` eigenvectors of
    ``T = Q H^(k) Q^T``). The cheap route after
    [`curvature_subspace`][curvlib.landscape.curvature_subspace]; the program then holds a gradient
    and a separate single-sample product (a little more to compile). Pass them only for such Ritz
    pairs; for any other basis the result would be wrong. Ritz pairs of a basis stored coarser
    than the parameters (``Eigsh(basis_dtype=jnp.bfloat16)``) hold the identity only to that
    dtype's rounding (``1e-2 ||H||``; 0.4% on the ``sigma^4`` coefficient): pass no
    ``eigenvalues`` for them ([`k_curve`][curvlib.landscape.k_curve] does not).

    An eager call (concrete arguments, [`curvlib.compile_behind`][curvlib.compile_behind] on,
    no ``microbatch_size``, ``mode`` ``None``/``"linearize"``, one float dtype, every array on
    one device) takes the programs an eager
    [`curvature_subspace`][curvlib.landscape.curvature_subspace] on the same ``loss_fn`` and
    shapes compiled: the linearisation (the weights are data) and the eigensolver's product,
    one basis vector at a time, with the projections on NumPy. After the subspace nothing
    compiles (a 120k-parameter transformer's coefficients: 3.7 s on their first call before,
    0.1 s now). It uses the increment's own Hessian products, so ``eigenvalues`` are not needed
    there; the values equal the compiled program's to rounding. The one program compiles
    behind, and later calls take it.

    Args:
      loss_fn: ``loss_fn(params, batch)``, the mean loss over the batch's leading axis.
      params: the point ``w*``.
      data: ordered samples (pytree, leading axis = sample order).
      num_examples: ``k``, the number of examples averaged in ``L_k`` (the paper's sample count),
        ``1 <= k < n``.
      eigenvectors: orthonormal basis pytree shaped like ``params`` with a leading
        axis ``D`` (orthonormality is checked in an eager call; under ``jit`` the basis
        is taken as given, and a scaled one scales ``c`` and ``B``).
        Any ``D`` (up to ``N``) is accepted here; for nested subspaces compute
        once at ``Dmax`` and use
        [`IncrementCoefficients.prefix`][curvlib.landscape.IncrementCoefficients.prefix].
      microbatch_size: chunk size over the samples (bounds memory).
      mode: ``None``/``"linearize"`` (one linearisation per chunk, then tangent
        passes), or ``"fwd-rev"``/``"rev-rev"`` (each product from scratch).
      check_mean: verify that ``loss_fn`` is a mean first
        ([`check_mean_loss`][curvlib.landscape.check_mean_loss]).
      eigenvalues: optional Ritz values of ``H^(k)`` for ``eigenvectors``
        (shape ``(D,)``), e.g. ``curvature_subspace(...).eigenvalues``.

    Returns:
      [`IncrementCoefficients`][curvlib.landscape.IncrementCoefficients].

    Raises:
      ValueError: bad ``k``, a basis that does not match ``params``, or a
        ``loss_fn`` that is not a mean; with ``check_mean``, also NaN/Inf
        losses at ``params`` ([`check_mean_loss`][curvlib.landscape.check_mean_loss] names the
        source).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from curvlib.landscape import increment_coefficients
      >>> loss = lambda w, x: 0.5 * jnp.mean((x @ w - 1.0) ** 2)
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
      >>> coef = increment_coefficients(loss, jnp.zeros(2), x, 2, jnp.eye(2))
      >>> float(coef.a)  # L_3 - L_2 at w = 0: 0.5 - 0.5
      0.0
      >>> np.round(np.asarray(coef.c, float), 4).tolist()  # U (g^(3) - g^(2))
      [-0.5, 0.1667]
      >>> np.round(np.asarray(coef.B, float), 4).tolist()  # U (H^(3) - H^(2)) U^T
      [[1.1667, 0.0], [0.0, -0.1667]]
    """
    k, loss_fn = _common.check_problem(loss_fn, params, data, num_examples)
    mb = _validate.static_int(microbatch_size, "microbatch_size", minimum=1, optional=True)
    _validate.mode(mode)  # (with microbatches too: one linearisation per chunk)
    D = _validate.basis(eigenvectors, params)
    if eigenvalues is not None and jnp.shape(eigenvalues) != (D,):
        raise ValueError(
            f"`eigenvalues` must have shape ({D},), one per eigenvector; got "
            f"{jnp.shape(eigenvalues)}."
        )
    if check_mean:
        mean_check(loss_fn, params, data, k, mb)
    return coefficients(loss_fn, params, data, k, _cast_basis(eigenvectors, params), mb, mode,
                        eigenvalues)


_STATIC = ("loss_fn", "microbatch_size", "mode")


def coefficients(loss_fn, params, data, k, U, mb, mode, eigenvalues) -> IncrementCoefficients:
    """`increment_coefficients` on checked arguments (``U`` in the parameters' dtypes).

    One program (`_coefficients`). An eager caller's first call answers now through the
    subspace's programs (`_coefficients_now`) while that program compiles behind
    ([`curvlib.compile_behind`][curvlib.compile_behind]); later calls take it. (The shared
    route multiplies by the increment's Hessian over all ``n`` samples: with the Ritz values
    the program needs single-sample products only, 20x cheaper warm at ``n = 65``.)
    """
    a = dict(loss_fn=loss_fn, params=params, data=data, k=k, U=U, microbatch_size=mb,
             mode=mode, ritz_values=eigenvalues)
    if mb is None and mode in (None, "linearize") and _now_ok(params, data, k, U):
        return BEHIND.call(_coefficients, _STATIC, a, _coefficients_now)
    return _coefficients(**a)


def _now_ok(params, data, k, U) -> bool:
    """Whether an eager call answers through the subspace's programs (`_coefficients_now`):
    concrete arguments on one device, one float32/float64 dtype."""
    dts = {jnp.result_type(x) for x in jax.tree.leaves(params)}
    return (_common.eager(params, data, k, U) and len(dts) == 1
            and dts <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)}
            and _space.on_one_device(params, data, U))


def _coefficients_now(loss_fn, params, data, k, U, **_) -> IncrementCoefficients:
    """`_coefficients` for an eager caller, through the programs the subspace compiled.

    The increment's value, gradient and Hessian operator come from `_common.linearized`
    (the program [`curvature_subspace`][curvlib.landscape.curvature_subspace] compiled for
    ``L_k``, the weights being data), the ``D`` products from the eigensolver's compiled
    product, one basis vector at a time; the projections run on NumPy. After an eager
    subspace nothing compiles. The products are those of the increment's Hessian itself
    (the route without ``eigenvalues``): exact for any basis.
    """
    k = np.int32(k)
    w = _common.host_weights(data, k, _common.INCREMENT, params)
    a, b, A = _common.linearized(loss_fn, params, data, k, w)
    space = _space.Space(params, "concat")
    with _xp.host():
        rows = space.flatten_basis(jax.device_get(U))
        g = space.flatten(jax.device_get(b))
    AU = np.stack([np.asarray(_space.flat_product(A, params, r)) for r in rows])
    dt = np.dtype(_common.weight_dtype(params))
    with _xp.host():
        acc = _tree.acc_dtype(dt)
        c = xp.dot(rows, g, preferred_element_type=acc).astype(dt)
        M = xp.dot(rows, AU.T, preferred_element_type=acc).astype(dt)
        B = 0.5 * (M + M.T)
    return IncrementCoefficients(*jax.device_put((np.asarray(a, dt), c, B)))


def _cast_basis(eigenvectors: PyTree, params: PyTree) -> PyTree:
    """Each basis leaf in its parameter leaf's dtype (models may mix float32 and float64)."""
    return jax.tree.map(lambda e, p: jnp.asarray(e).astype(jnp.result_type(p)), eigenvectors,
                        params)


# ----------------------------------------------------------- k_curve's step
# (the inputs were checked once, by `curvlib.landscape.k_curve`; ``plan`` is its validated
# grid and options, ``plan.data`` the samples it uses)

def coefficient_step(loss_fn, params, plan, k: int, U: PyTree, eigenvalues):
    """A curve point's ``(a, c, B)`` for the ``Dmax`` subspace ``U`` (in the parameters'
    dtypes; the mean-loss check has already run).

    The Ritz values ``eigenvalues`` stand in for ``U H^(k) U^T``, so the ``Dmax``
    products are single-sample ones.
    """
    return jax.block_until_ready(coefficients(loss_fn, params, plan.data, k, U,
                                              plan.config.microbatch_size, None, eigenvalues))
