"""The increment field ``L_{k+1} - L_k`` and its local quadratic coefficients ``(a, c, B)``.

Around ``w*`` (Kiselev & Grabovoy 2026, spec ``delta2.md``)::

    L_{k+1}(w) - L_k(w) ~= a + b^T (w - w*) + 1/2 (w - w*)^T A (w - w*)
    a = L_{k+1}(w*) - L_k(w*),  b = g^(k+1)(w*) - g^(k)(w*),  A = H^(k+1)(w*) - H^(k)(w*)

and, compressed to an orthonormal basis ``U`` (rows = eigenvectors),
``c = U b`` and ``B = U A U^T`` (symmetrised).

For a mean loss every difference above follows from the exact identity
``L_{k+1} - L_k = (l_{k+1} - L_k) / (k + 1)``, which is how they are computed:
one pass over the first ``k`` samples plus one over sample ``k + 1``, and no
subtraction of two nearly equal means (which in float32 would cancel most
digits of ``b`` and ``A``). The identity is checked on the probe point first
(:func:`check_mean_loss`), which is what catches a ``loss_fn`` that sums.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _tree
from curvlib.landscape import _common
from curvlib.operators import gradient, hessian_matvec

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
        """
        d = int(self.c.shape[-1])
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= d:
            raise ValueError(f"`dim` must be an int in [1, {d}]; got {dim!r}.")
        return IncrementCoefficients(self.a, self.c[..., :dim], self.B[..., :dim, :dim])


# ------------------------------------------------------------ the identity


@functools.partial(jax.jit, static_argnames=("loss_fn", "k", "microbatch_size"))
def _identity_parts(loss_fn, params, data, k, microbatch_size):
    L1 = _common.mean_loss(loss_fn, params, _common.take(data, 0, k + 1), microbatch_size)
    Lk = _common.mean_loss(loss_fn, params, _common.take(data, 0, k), microbatch_size)
    l1 = loss_fn(params, _common.take(data, k, k + 1))
    return L1, Lk, l1


def check_mean_loss(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    k: int,
    *,
    microbatch_size: int | None = None,
    rtol: float | None = None,
) -> None:
    """Raise ``ValueError`` unless ``loss_fn`` behaves as a mean over the sample axis.

    Checks the increment identity ``L_{k+1} - L_k = (l_{k+1} - L_k) / (k + 1)`` at
    ``params`` (three forward passes). A loss that sums over the batch, or weights
    samples unequally, fails it by an amount of the order of the loss itself. A
    sample-independent term (a weight-decay penalty) passes: it cancels from every
    increment, so the criteria are unchanged by it.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the probe point.
      data: the ordered samples.
      k: sample count, ``1 <= k < n``.
      microbatch_size: optional chunk size for the two means.
      rtol: tolerance relative to the largest of the three losses; default
        ``10 sqrt(eps)`` of the loss dtype.

    Raises:
      ValueError: if the identity fails, or for a bad ``k``; also if any of the
        three losses is NaN/Inf, where the identity cannot be checked: the
        message names the source (``params``, the first ``k + 1`` samples of
        ``data``, or ``loss_fn`` itself). The estimators' ``check_mean=False``
        skips the check, and the NaN/Inf then propagates into their results.
    """
    k = _common.check_k(k, data)
    mb = _common.check_microbatch(microbatch_size)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((params, data))):
        return  # inside a user's jit: nothing concrete to compare
    L1, Lk, l1 = (float(x) for x in _identity_parts(loss_fn, params, data, k, mb))
    if not all(np.isfinite(v) for v in (L1, Lk, l1)):
        raise ValueError(_non_finite_message(params, data, k, L1, Lk, l1))
    dt = jnp.result_type(*jax.tree.leaves(params))
    eps = float(jnp.finfo(dt).eps)
    rtol = 10.0 * np.sqrt(eps) if rtol is None else float(rtol)
    lhs, rhs = L1 - Lk, (l1 - Lk) / (k + 1)
    scale = max(abs(L1), abs(Lk), abs(l1), np.finfo(np.float64).tiny)
    if not np.isfinite(lhs) or abs(lhs - rhs) > rtol * scale:
        raise ValueError(
            "`loss_fn` does not behave as a mean over the leading axis of its batch: at the "
            f"probe point L_{{k+1}} - L_k = {lhs:.6g} but (l_{{k+1}} - L_k)/(k+1) = {rhs:.6g} "
            f"(k={k}, L_k={Lk:.6g}, L_{{k+1}}={L1:.6g}, l_{{k+1}}={l1:.6g}). The landscape "
            "criteria assume L_m(w) = (1/m) sum_i l_i(w); reduce the batch with a mean "
            "(e.g. jnp.mean) instead of a sum."
        )


def _non_finite_message(params, data, k, L1, Lk, l1) -> str:
    """Why the losses of :func:`check_mean_loss` are NaN/Inf: ``params``, ``data`` or the loss."""
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


@functools.partial(jax.jit, static_argnames=("loss_fn", "k", "microbatch_size"))
def _loss_increment(loss_fn, params, data, k, microbatch_size):
    return _common.increment(loss_fn, params, data, k, microbatch_size)


def loss_increment(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    k: int,
    *,
    microbatch_size: int | None = None,
) -> jax.Array:
    """The increment field ``L_{k+1}(w) - L_k(w)`` at ``w = params``.

    Computed as ``(l_{k+1}(w) - L_k(w)) / (k + 1)``, exact for a mean loss, at the
    cost of ``k + 1`` per-sample losses.

    Examples:
      >>> import jax.numpy as jnp
      >>> loss = lambda w, x: jnp.mean((x - w) ** 2)
      >>> x = jnp.array([0.0, 1.0, 2.0])
      >>> round(float(loss_increment(loss, jnp.array(0.0), x, 2)), 4)  # 5/3 - 1/2
      1.1667
    """
    k = _common.check_k(k, data)
    return _loss_increment(loss_fn, params, data, k, _common.check_microbatch(microbatch_size))


# ----------------------------------------------------------- coefficients


def _block(matvec, U, sequential):
    return jax.lax.map(matvec, U) if sequential else jax.vmap(matvec)(U)


@functools.partial(jax.jit, static_argnames=("loss_fn", "k", "microbatch_size", "mode"))
def _coefficients(loss_fn, params, data, k, U, microbatch_size, mode, ritz_values=None):
    data_k = _common.take(data, 0, k)
    data_1 = _common.take(data, k, k + 1)
    Lk, gk = gradient(loss_fn, params, data_k, microbatch_size=microbatch_size)
    l1, g1 = jax.value_and_grad(loss_fn)(params, data_1)
    a = (l1 - Lk) / (k + 1)
    b = jax.tree.map(lambda x, y: (x - y) / (k + 1), g1, gk)
    c = _tree.basis_project(U, b)
    mv_1 = hessian_matvec(loss_fn, params, data_1, mode=mode)
    seq = microbatch_size is not None
    HU_1 = _block(mv_1, U, seq)
    G1 = _tree.basis_gram(U, HU_1)
    if ritz_values is None:
        mv_k = hessian_matvec(loss_fn, params, data_k, mode=mode,
                              microbatch_size=microbatch_size)
        Gk = _tree.basis_gram(U, _block(mv_k, U, seq))
    else:  # U are Ritz vectors of H^(k): U H^(k) U^T = diag(theta), no product needed
        Gk = jnp.diag(jnp.asarray(ritz_values).astype(G1.dtype))
    M = (G1 - Gk) / (k + 1)
    B = 0.5 * (M + M.T)
    return IncrementCoefficients(a, c, B)


def increment_coefficients(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    k: int,
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
    (e.g. :func:`curvature_subspace`'s, orthonormal). One compiled program.

    Cost: one gradient over ``k`` samples and one over sample ``k + 1``;
    ``D`` Hessian-vector products with ``H^(k)`` (microbatched over the ``k``
    samples when ``microbatch_size`` is set) and ``D`` with the single-sample
    Hessian; ``O(D^2 N)`` for the projections. Memory: ``3D`` parameter-sized
    vectors (products run one at a time when microbatching, all ``D`` at once
    under ``vmap`` otherwise).

    With ``eigenvalues`` (the Ritz values that came with ``eigenvectors`` from
    :func:`curvature_subspace` on the same ``params``, ``data`` and ``k``) the
    ``D`` products with ``H^(k)``, the expensive ones (``k`` samples each), are
    skipped: Rayleigh-Ritz makes ``x_i^T H^(k) x_j = theta_i delta_ij`` for
    Ritz pairs *whatever their residual* (``x_i = Q^T y_i`` with ``y_i``
    eigenvectors of ``T = Q H^(k) Q^T``), so ``U H^(k) U^T = diag(theta)`` to
    rounding. Pass them only for such Ritz pairs; for any other basis the
    result would be wrong.

    Args:
      loss_fn: ``loss_fn(params, batch)``, the mean loss over the batch's leading axis.
      params: the point ``w*``.
      data: ordered samples (pytree, leading axis = sample order).
      k: ``1 <= k < n``.
      eigenvectors: basis pytree shaped like ``params`` with a leading axis ``D``.
        Any ``D`` (up to ``N``) is accepted here; for nested subspaces compute
        once at ``Dmax`` and use :meth:`IncrementCoefficients.prefix`.
      microbatch_size: chunk size for the ``k``-sample gradient and products.
      mode: Hessian product mode of :func:`curvlib.hessian_matvec`.
      check_mean: verify the increment identity on ``params`` first
        (:func:`check_mean_loss`).
      eigenvalues: optional Ritz values of ``H^(k)`` for ``eigenvectors``
        (shape ``(D,)``), e.g. ``curvature_subspace(...).eigenvalues``; saves
        the ``D`` products with ``H^(k)``.

    Returns:
      :class:`IncrementCoefficients`.

    Raises:
      ValueError: bad ``k``, a basis that does not match ``params``, or a
        ``loss_fn`` that is not a mean; with ``check_mean``, also NaN/Inf
        losses at ``params`` (:func:`check_mean_loss` names the source).
    """
    k = _common.check_k(k, data)
    mb = _common.check_microbatch(microbatch_size)
    _tree.check_float_tree(params, "params")
    _check_basis(eigenvectors, params)
    if check_mean:
        check_mean_loss(loss_fn, params, data, k, microbatch_size=mb)
    D = _check_basis(eigenvectors, params)
    if eigenvalues is not None and jnp.shape(eigenvalues) != (D,):
        raise ValueError(
            f"`eigenvalues` must have shape ({D},), one per eigenvector; got "
            f"{jnp.shape(eigenvalues)}."
        )
    U = _cast_basis(eigenvectors, params)
    return _coefficients(loss_fn, params, data, k, U, mb, mode, eigenvalues)


def _cast_basis(eigenvectors: PyTree, params: PyTree) -> PyTree:
    """Each basis leaf in its parameter leaf's dtype (models may mix float32 and float64)."""
    return jax.tree.map(lambda e, p: jnp.asarray(e).astype(jnp.result_type(p)), eigenvectors,
                        params)


def _check_basis(eigenvectors: PyTree, params: PyTree) -> int:
    lp, le = jax.tree.leaves(params), jax.tree.leaves(eigenvectors)
    if jax.tree.structure(params) != jax.tree.structure(eigenvectors):
        raise ValueError(
            "`eigenvectors` must have the structure of `params` with a leading axis D "
            f"(got {jax.tree.structure(eigenvectors)} vs {jax.tree.structure(params)})."
        )
    dims = set()
    for p, e in zip(lp, le, strict=True):
        if jnp.shape(e)[1:] != jnp.shape(p) or jnp.ndim(e) != jnp.ndim(p) + 1:
            raise ValueError(
                "every leaf of `eigenvectors` must be the matching `params` leaf with one extra "
                f"leading axis; got {jnp.shape(e)} for a parameter of shape {jnp.shape(p)}."
            )
        dims.add(jnp.shape(e)[0])
    if len(dims) != 1 or 0 in dims:
        raise ValueError(f"`eigenvectors` leaves disagree on the leading axis D: {sorted(dims)}.")
    return dims.pop()
