"""Thick-restart Lanczos for a few extreme eigenpairs of a symmetric operator."""

from __future__ import annotations

import importlib
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _tree

# the package re-exports the *function* ``lanczos`` under the submodule's name, so
# ``from curvlib.krylov import lanczos`` may yield the function: import the module itself.
_lz = importlib.import_module("curvlib.krylov.lanczos")

PyTree = Any

WHICH = ("LA", "SA", "LM")


class EigshResult(NamedTuple):
    """Output of :func:`eigsh`.

    Attributes:
      eigenvalues: shape ``(k,)``; for ``"LA"`` algebraically largest first, for
        ``"SA"`` smallest first, for ``"LM"`` largest magnitude first. Signed.
      eigenvectors: pytree shaped like ``v0`` with a leading axis ``k``; orthonormal.
      residual_norms: ``||A x_i - theta_i x_i||`` for each pair (shape ``(k,)``),
        from the Lanczos relation (``|beta_m y_{m,i}|``), no extra products.
      num_matvecs: products used (int32 scalar).
      num_restarts: thick restarts performed.
      converged: every residual is below ``tol * max(|theta_i|, anorm * eps^(2/3))``.
      finite: every product was finite; if not, the last finite Ritz pairs are
        returned with ``converged=False``.
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residual_norms: jax.Array
    num_matvecs: jax.Array
    num_restarts: jax.Array
    converged: jax.Array
    finite: jax.Array


def _order(theta, which):
    key = {"LA": -theta, "SA": theta, "LM": -jnp.abs(theta)}[which]
    return jnp.argsort(key, stable=True)


def _ritz(state: _lz._Krylov, k, which, tol):
    T = _lz.projected_matrix(state.H)
    theta, Y = jnp.linalg.eigh(T)
    order = _order(theta, which)
    theta_o = theta[order]
    Y_o = Y[:, order]
    res = jnp.abs(state.beta * Y_o[-1, :])
    anorm = jnp.max(jnp.abs(theta))
    eps = jnp.finfo(theta.dtype).eps
    thresh = tol * jnp.maximum(jnp.abs(theta_o[:k]), anorm * eps ** (2.0 / 3.0))
    conv = jnp.all(res[:k] <= thresh)
    return theta_o, Y_o, res, conv, anorm


def _static_int(x, name: str) -> int:
    """``x`` as a Python int (accepts NumPy integers), else a ``ValueError``."""
    if isinstance(x, bool):
        raise ValueError(f"`{name}` must be an int; got {x!r}.")
    try:
        return operator.index(x)
    except TypeError:
        raise ValueError(f"`{name}` must be a static int; got {x!r}.") from None


def eigsh(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    k: int,
    *,
    which: str = "LA",
    num_matvecs: int | None = None,
    tol: float | None = None,
    max_restarts: int = 200,
    num_keep: int | None = None,
) -> EigshResult:
    """Top-``k`` eigenpairs of a symmetric operator by thick-restart Lanczos.

    A Lanczos basis of ``m = num_matvecs`` vectors with full reorthogonalisation
    is built from ``v0``; Rayleigh-Ritz on the projected matrix ``T = Q A Q^T``
    gives Ritz pairs ``(theta_i, x_i = Q^T y_i)`` with residuals
    ``||A x_i - theta_i x_i|| = |beta_m e_m^T y_i|``. Until the ``k`` wanted pairs
    converge, the basis is compressed to ``num_keep`` wanted Ritz vectors plus
    the residual direction (the "arrowhead" matrix of Wu & Simon 2000) and
    re-extended to ``m``. Eigenvalues are signed and ordered algebraically, so
    with ``which="LA"`` a Hessian's dominant *negative* eigenvalues never
    displace its largest positive ones (power iteration's failure mode).

    Cost: ``m + r (m - num_keep)`` products for ``r`` restarts; memory ``(m + 2)``
    vectors; ``O(m^2 N)`` work per restart to rotate the basis; one ``m x m``
    dense eigendecomposition per restart.

    Args:
      matvec: symmetric linear operator on pytrees shaped like ``v0``.
      v0: non-zero start vector (e.g. ``jax.random.normal``-filled params).
      k: number of wanted pairs, ``1 <= k < dim``.
      which: ``"LA"`` (largest algebraic), ``"SA"`` (smallest algebraic) or
        ``"LM"`` (largest magnitude).
      num_matvecs: basis size ``m``, ``k < m <= dim``; default ``min(dim, max(2k + 1, 20))``.
      tol: relative residual tolerance; default ``sqrt(eps)`` of the least precise
        leaf dtype of ``v0`` (a bfloat16 basis cannot certify more).
      max_restarts: cap on thick restarts.
      num_keep: Ritz vectors kept per restart, ``k <= num_keep < m``;
        default ``k + (m - k) // 2``.

    Returns:
      An :class:`EigshResult`.

    Raises:
      ValueError: for ``k`` or ``num_matvecs`` out of range or an unknown ``which``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> A = jnp.diag(jnp.arange(-50.0, 50.0))  # dominant negative eigenvalues
      >>> res = eigsh(lambda v: A @ v, jnp.ones(100), k=3, which="LA")
      >>> res.eigenvalues.round(3).tolist(), bool(res.converged)
      ([49.0, 48.0, 47.0], True)
      >>> eigsh(lambda v: A @ v, jnp.ones(100), k=2, which="SA").eigenvalues.round(3).tolist()
      [-50.0, -49.0]

    References:
      K. Wu and H. Simon, *Thick-restart Lanczos method for large symmetric
      eigenvalue problems*, SIAM J. Matrix Anal. Appl. 2000.
    """
    _tree.check_float_tree(v0, "v0")
    n = _tree.size(v0)
    _tree.check_matvec(matvec, v0, "v0")
    if which not in WHICH:
        raise ValueError(f"`which` must be one of {WHICH}; got {which!r}.")
    k = _static_int(k, "k")
    if k < 1:
        raise ValueError(f"`k` must be a positive int; got {k!r}.")
    if k >= n:
        raise ValueError(
            f"`k`={k} must be smaller than the dimension of `v0` ({n}); for all "
            "eigenpairs use a dense eigendecomposition."
        )
    if num_matvecs is None:
        m = min(n, max(2 * k + 1, 20))
    else:
        m = _static_int(num_matvecs, "num_matvecs")
    if m <= k or m > n:
        raise ValueError(
            f"`num_matvecs` must satisfy k < num_matvecs <= dim (k={k}, dim={n}); got {m!r}."
        )
    keep = k + (m - k) // 2 if num_keep is None else _static_int(num_keep, "num_keep")
    if isinstance(max_restarts, int) and max_restarts < 0:  # may also be traced
        raise ValueError(f"`max_restarts` must be >= 0; got {max_restarts!r}.")
    if not (k <= keep < m):
        raise ValueError(f"`num_keep` must satisfy k <= num_keep < num_matvecs; got {keep}.")
    acc = _lz._acc_dtype(v0)
    if tol is None:
        # the least precise leaf bounds the basis accuracy (jnp.finfo knows bfloat16)
        tol = float(np.sqrt(max(float(jnp.finfo(x.dtype).eps) for x in jax.tree.leaves(v0))))

    fl = _lz._flat_leaves(matvec, v0)  # per-leaf 1-D basis: in-place row updates
    matvec = fl.matvec
    # One loop holds the only call site of ``matvec`` (so the compiled program
    # contains the product once): round 0 extends the empty basis from row 0,
    # every later round is a thick restart extending from row ``keep``. Each round
    # ends by compressing the basis to its ``keep`` wanted Ritz vectors, so on exit
    # the first ``k`` rows are the answer.
    state = _lz._init_state(fl.v0, m, acc)

    def cond(c):
        state, it, conv = c[0], c[1], c[2]
        return (it == 0) | ((~conv) & (it <= max_restarts) & state.finite)

    def body(c):
        state, it, conv, theta, Y, res, anorm = c
        first = it == 0
        new = _lz._extend(matvec, state, jnp.where(first, 0, keep), m, anorm)
        theta_n, Y_n, res_n, conv_n, anorm_n = _ritz(new, k, which, tol)
        # keep the last finite state if a product went non-finite (round 0 always counts)
        ok = (new.finite & jnp.all(jnp.isfinite(theta_n))) | first
        C = jnp.zeros((m, m), acc).at[:keep].set(Y_n[:, :keep].T)
        H = jnp.zeros((m, m), acc).at[jnp.arange(keep), jnp.arange(keep)].set(theta_n[:keep])
        compressed = new._replace(Q=_tree.basis_matmul(C, new.Q), H=H)
        new = jax.tree.map(
            lambda a, b: jnp.where(ok, a, b), compressed, state._replace(finite=new.finite)
        )
        return (
            new,
            it + 1,
            conv_n & ok & new.finite,
            jnp.where(ok, theta_n, theta),
            jnp.where(ok, Y_n, Y),
            jnp.where(ok, res_n, res),
            jnp.where(ok, anorm_n, anorm),
        )

    init = (
        state, jnp.asarray(0), jnp.asarray(False), jnp.zeros(m, acc), jnp.eye(m, dtype=acc),
        jnp.full(m, jnp.inf, acc), jnp.zeros((), acc),
    )
    state, rounds, conv, theta, Y, res, _ = jax.lax.while_loop(cond, body, init)
    it = rounds - 1  # thick restarts performed
    X = fl.unflat_basis(jax.tree.map(lambda q: q[:k], state.Q))
    vals = theta[:k]
    finite = state.finite
    vals = jnp.where(jnp.isfinite(vals), vals, 0.0)
    return EigshResult(
        eigenvalues=vals,
        eigenvectors=X,
        residual_norms=jnp.where(jnp.isfinite(res[:k]) & finite, res[:k], jnp.inf),
        num_matvecs=(m + it * (m - keep)).astype(jnp.int32),
        num_restarts=it,
        converged=conv & finite,
        finite=finite,
    )
