"""Deflated power iteration with signed Rayleigh quotients (the classical baseline)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

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
      converged: per pair, whether the Rayleigh quotient settled to ``tol``.
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residual_norms: jax.Array
    num_matvecs: jax.Array
    converged: jax.Array


def power_iteration(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    k: int = 1,
    *,
    num_iters: int = 100,
    tol: float = 1e-4,
) -> PowerIterationResult:
    """``k`` dominant eigenpairs by power iteration with Hotelling deflation.

    For pair ``i`` iterate ``x <- (A - sum_{j<i} theta_j x_j x_j^T) x / ||.||``
    (with ``x`` also orthogonalised against the found vectors) until the signed
    Rayleigh quotient changes by at most ``tol |theta|``. This is the method
    PyHessian and most loss-landscape code use; it finds the largest
    *magnitude* eigenvalues and converges at the rate ``|lambda_{i+1}/lambda_i|``.
    It is kept as a baseline: :func:`curvlib.eigsh` is faster and targets the
    algebraically largest values.

    Cost: at most ``k * num_iters`` products (each iteration reuses its product
    for the Rayleigh quotient); memory ``k + 2`` vectors.

    Args:
      matvec: symmetric operator on pytrees shaped like ``v0``.
      v0: non-zero start vector, shared by all pairs (orthogonalised per pair).
      k: number of pairs (static, ``1 <= k < dim``).
      num_iters: iteration cap per pair.
      tol: relative change of the Rayleigh quotient that stops a pair.

    Returns:
      A :class:`PowerIterationResult`.

    References:
      R. von Mises and H. Pollaczek-Geiringer, *Praktische Verfahren der
      Gleichungsaufloesung*, ZAMM 1929; Yao et al., *PyHessian*, 2020.
    """
    _tree.check_float_tree(v0, "v0")
    n = _tree.size(v0)
    if not isinstance(k, int) or k < 1 or k >= n:
        raise ValueError(f"`k` must be an int with 1 <= k < dim ({n}); got {k!r}.")
    if num_iters < 1:
        raise ValueError(f"`num_iters` must be >= 1; got {num_iters}.")
    acc = jnp.promote_types(_tree.dtype(v0), jnp.float32)
    X = _tree.basis_zeros(v0, k)
    thetas = jnp.zeros(k, acc)

    def deflated(X, thetas, v):
        coef = _tree.basis_project(X, v, acc) * thetas
        return _tree.sub(matvec(v), _tree.basis_combine(X, coef, like=v))

    def project_out(X, v):
        c = _tree.basis_project(X, v, acc)
        return _tree.sub(v, _tree.basis_combine(X, c, like=v))

    def unit(v):
        nv = _tree.norm(v)
        return _tree.scale(1.0 / jnp.where(nv > 0, nv, 1.0), v)

    total = jnp.asarray(0)
    conv_all = []
    res_all = []
    for i in range(k):
        x = unit(project_out(X, _tree.add_scale(v0, 1e-3 * (i + 1), _tree.normal_like(
            jax.random.PRNGKey(i), v0))))
        Ax = deflated(X, thetas, x)

        def cond(c):
            _, _, theta, theta_old, it = c
            return (it < num_iters) & (jnp.abs(theta - theta_old) > tol * jnp.abs(theta))

        def body(c, X=X, thetas=thetas):
            x, Ax, theta, _, it = c
            x_new = unit(project_out(X, Ax))
            Ax_new = deflated(X, thetas, x_new)
            return x_new, Ax_new, _tree.vdot(x_new, Ax_new).astype(acc), theta, it + 1

        theta0 = _tree.vdot(x, Ax).astype(acc)
        x, Ax, theta, theta_old, it = jax.lax.while_loop(
            cond, body, (x, Ax, theta0, theta0 + jnp.inf, jnp.asarray(1))
        )
        conv_all.append(jnp.abs(theta - theta_old) <= tol * jnp.abs(theta))
        res_all.append(_tree.norm(_tree.add_scale(Ax, -theta, x)).astype(acc))
        X = _tree.basis_set(X, i, x)
        thetas = thetas.at[i].set(theta)
        total = total + it
    return PowerIterationResult(
        eigenvalues=thetas,
        eigenvectors=X,
        residual_norms=jnp.stack(res_all),
        num_matvecs=total,
        converged=jnp.stack(conv_all),
    )
