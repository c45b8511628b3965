"""Deflated power iteration with signed Rayleigh quotients (the classical baseline)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from curvlib import _tree

PyTree = Any


class PowerIterationResult(NamedTuple):
    """Output of :func:`power_iteration`.

    Attributes:
      eigenvalues: signed Rayleigh quotients ``x_i^T A x_i`` (shape ``(k,)``),
        in the order found (largest magnitude of the deflated operator first).
      eigenvectors: pytree with leading axis ``k``, unit norm, mutually orthogonal.
      residual_norms: ``||A x_i - theta_i x_i||`` (shape ``(k,)``).
      num_matvecs: products used in total.
      converged: per pair, whether the residual of the *deflated* operator,
        ``||P A x_i - theta_i x_i||``, is at most ``tol |theta_i|`` (the true
        residual of a later pair cannot fall below those of the earlier ones).
      finite: every product was finite; if not, the pairs found before the
        first non-finite product are kept, the rest are zero with
        ``converged=False``.
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residual_norms: jax.Array
    num_matvecs: jax.Array
    converged: jax.Array
    finite: jax.Array


def _random_direction(i, like):
    """Deterministic fallback start (only used when ``v0`` lies in the found subspace)."""
    key = jax.random.fold_in(jax.random.PRNGKey(7919), i)
    return _tree.normal_like(key, like)


def power_iteration(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    k: int = 1,
    *,
    num_iters: int = 100,
    tol: float = 1e-4,
) -> PowerIterationResult:
    """``k`` dominant eigenpairs by power iteration with deflation.

    For pair ``i`` iterate ``x <- P A P x / ||P A P x||`` with ``P`` the
    projector onto the complement of the pairs already found (Hotelling /
    Wielandt deflation by orthogonalisation) until the residual
    ``||P A x - theta x|| <= tol |theta|`` with the *signed* Rayleigh quotient
    ``theta = x^T A x``. This is the method PyHessian and most loss-landscape
    code use; it finds the largest-*magnitude* eigenvalues (a dominant negative
    Hessian eigenvalue comes first) and converges at the rate
    ``|lambda_{i+1} / lambda_i|``. It is kept as a baseline:
    :func:`curvlib.eigsh` is faster and targets the algebraically largest values.

    Cost: at most ``k * num_iters`` products (each iteration reuses its product
    for the Rayleigh quotient and the residual); memory ``k + 2`` vectors.

    Args:
      matvec: symmetric operator on pytrees shaped like ``v0``.
      v0: start vector, shared by all pairs (orthogonalised per pair); a zero
        ``v0`` (or one inside the found subspace) is replaced by a deterministic
        pseudo-random direction.
      k: number of pairs (static, ``1 <= k < dim``).
      num_iters: iteration cap per pair (static, ``>= 1``).
      tol: relative residual tolerance (traceable).

    Returns:
      A :class:`PowerIterationResult`.

    Raises:
      ValueError: if ``k`` is not in ``[1, dim)`` or ``num_iters < 1``.

    Examples:
      >>> import jax.numpy as jnp
      >>> A = jnp.diag(jnp.array([-3.0, 2.0, 1.0, 0.5]))
      >>> res = power_iteration(lambda v: A @ v, jnp.ones(4), k=2, num_iters=500, tol=1e-5)
      >>> res.eigenvalues.round(4).tolist()  # signed, by magnitude
      [-3.0, 2.0]

    References:
      R. von Mises and H. Pollaczek-Geiringer, *Praktische Verfahren der
      Gleichungsaufloesung*, ZAMM 1929; Yao et al., *PyHessian*, 2020.
    """
    _tree.check_float_tree(v0, "v0")
    n = _tree.size(v0)
    _tree.check_matvec(matvec, v0, "v0")
    if not isinstance(k, int) or k < 1 or k >= n:
        raise ValueError(f"`k` must be an int with 1 <= k < dim ({n}); got {k!r}.")
    if not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"`num_iters` must be a positive int; got {num_iters!r}.")
    acc = _tree.acc_dtype(_tree.dtype(v0))
    eps = jnp.finfo(acc).eps
    X = _tree.basis_zeros(v0, k)
    thetas = jnp.zeros(k, acc)

    def project_out(X, v):
        c = _tree.basis_project(X, v, acc)
        return _tree.sub(v, _tree.basis_combine(X, c, like=v))

    def unit(v):
        nv = _tree.norm(v).astype(acc)
        return _tree.scale(1.0 / jnp.where(nv > 0, nv, 1.0), v)

    def product(X, x):
        raw = jax.tree.map(lambda a, b: jnp.asarray(a).astype(b.dtype), matvec(x), x)
        fin = _tree.all_finite(raw)
        raw = _tree.where(fin, raw, _tree.zeros_like(raw))
        Ax = project_out(X, raw)  # the deflated product P A x (x is already in range(P))
        theta = _tree.vdot(x, raw).astype(acc)
        # stopping uses the deflated residual (the true one is floored by the residuals
        # of the pairs already found); the reported one is that of A itself
        res = _tree.norm(_tree.add_scale(Ax, -theta, x)).astype(acc)
        return Ax, theta, res, fin, raw

    total = jnp.zeros((), jnp.int32)
    finite = _tree.all_finite(v0)
    v0 = _tree.where(finite, v0, _tree.zeros_like(v0))
    conv_all, res_all = [], []
    for i in range(k):
        x = project_out(X, v0)
        small = ~(_tree.norm(x).astype(acc) > 10 * eps * _tree.norm(v0).astype(acc))
        x = jax.lax.cond(
            small, lambda X=X, i=i: project_out(X, _random_direction(i, v0)), lambda x=x: x
        )
        x = unit(project_out(X, x))

        def cond(c):
            _, _, theta, res, fin, it, _ = c
            return (it < num_iters) & fin & ~(res <= tol * jnp.abs(theta))

        def body(c, X=X):
            x, Ax, _, _, _, it, _ = c
            x = unit(Ax)
            Ax, theta, res, fin, raw = product(X, x)
            return x, Ax, theta, res, fin, it + 1, raw

        Ax, theta, res, fin, raw = product(X, x)
        x, Ax, theta, res, fin, it, raw = jax.lax.while_loop(
            cond, body, (x, Ax, theta, res, fin & finite, jnp.ones((), jnp.int32), raw)
        )
        finite = finite & fin
        ok = finite
        conv_all.append(ok & (res <= tol * jnp.abs(theta)))
        true_res = _tree.norm(_tree.add_scale(raw, -theta, x)).astype(acc)
        res_all.append(jnp.where(ok, true_res, jnp.inf))
        X = _tree.basis_set(X, i, _tree.where(ok, x, _tree.zeros_like(x)))
        thetas = thetas.at[i].set(jnp.where(ok, theta, 0.0))
        total = total + it
    return PowerIterationResult(
        eigenvalues=thetas,
        eigenvectors=X,
        residual_norms=jnp.stack(res_all),
        num_matvecs=total,
        converged=jnp.stack(conv_all),
        finite=finite,
    )
