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


def _ritz(state: _lz._Krylov, k, which, tol, filled=None):
    """Ritz pairs of the filled ``filled x filled`` block of the projected matrix.

    Rows and columns ``>= filled`` of ``H`` are zero (not yet built); they are
    given a sentinel diagonal outside the spectrum's wanted end (below
    ``-2 ||T||_inf`` for ``"LA"``, above ``+2 ||T||_inf`` for ``"SA"``, zero for
    ``"LM"``) so their unit eigenvectors are never among the wanted ``k``. The
    residual of Ritz pair ``i`` is ``|beta y_{filled-1, i}|`` (Lanczos relation
    ``A Q^T = Q^T T + r e_{filled-1}^T``); no extra product is needed, so
    convergence can be tested after every step.
    """
    m = state.H.shape[0]
    filled = m if filled is None else filled
    valid = jnp.arange(m) < filled
    T = _lz.projected_matrix(state.H)
    T = jnp.where(valid[:, None] & valid[None, :], T, 0.0)
    span = jnp.max(jnp.sum(jnp.abs(T), axis=1))  # ||T||_inf bounds every Ritz value
    tiny = jnp.finfo(T.dtype).tiny
    sentinel = {"LA": -2 * span - tiny, "SA": 2 * span + tiny, "LM": 0.0}[which]
    T = T + jnp.diag(jnp.where(valid, 0.0, sentinel).astype(T.dtype))
    theta, Y = jnp.linalg.eigh(T)
    order = _order(theta, which)
    theta_o = theta[order]
    Y_o = Y[:, order]
    last = jnp.take(Y_o, jnp.maximum(filled - 1, 0), axis=0)
    res = jnp.abs(state.beta * last)
    anorm = jnp.max(jnp.where(valid, jnp.abs(jnp.diag(T)), 0.0))
    anorm = jnp.maximum(anorm, jnp.max(jnp.abs(jnp.where(valid, theta, 0.0))))
    eps = jnp.finfo(theta.dtype).eps
    thresh = tol * jnp.maximum(jnp.abs(theta_o[:k]), anorm * eps ** (2.0 / 3.0))
    # a wanted pair must live in the filled block (matters only for "LM" ties at 0)
    inside = jnp.sum(jnp.where(valid[:, None], Y_o[:, :k] ** 2, 0.0), axis=0) > 0.5
    conv = jnp.all((res[:k] <= thresh) & inside) & (filled > k)
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
    basis_dtype=None,
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

    The wanted pairs are tested after every Lanczos step (every ``ceil(m / 64)``
    steps for larger bases; an ``m x m`` ``eigh`` on the projected matrix, no
    product), so the run stops at the
    first Krylov depth that certifies them rather than at the end of a restart
    cycle: a basis large enough to need no restart uses the same number of
    products as the smallest adequate fixed-depth Lanczos run.

    Cost: at most ``m + r (m - num_keep)`` products for ``r`` restarts (fewer
    when the pairs converge inside a cycle); memory ``(m + 2)`` vectors;
    ``O(m N)`` reorthogonalisation work per product, ``O(m^2 N)`` per restart to
    rotate the basis; one ``m x m`` dense eigendecomposition per step.

    Args:
      matvec: symmetric linear operator on pytrees shaped like ``v0``.
      v0: non-zero start vector (e.g. ``jax.random.normal``-filled params).
      k: number of wanted pairs, ``1 <= k < dim``.
      which: ``"LA"`` (largest algebraic), ``"SA"`` (smallest algebraic) or
        ``"LM"`` (largest magnitude).
      num_matvecs: basis size ``m``, ``k < m <= dim``; default ``min(dim, max(4k, 20))``
        (a top-10 Hessian spectrum typically converges in 40-50 products, so the
        default rarely restarts; lower it to bound memory: ``m`` vectors).
      tol: relative residual tolerance; default ``sqrt(eps)`` of the least precise
        leaf dtype of ``v0`` (a bfloat16 basis cannot certify more).
      max_restarts: cap on thick restarts.
      num_keep: Ritz vectors kept per restart, ``k <= num_keep < m``;
        default ``k + (m - k) // 2``.
      basis_dtype: storage dtype of the Krylov basis (default: ``v0``'s). A
        lower precision halves the stored basis (``m N`` entries) while inner
        products and the projected matrix accumulate in float32 or wider (on
        XLA:CPU the saving survives for a float32 basis of a float64 model,
        not for bfloat16: ``docs/scaling.md``); the attainable
        relative residual is then about ``sqrt(eps)`` of ``basis_dtype``
        (float32: ~3e-4; bfloat16: ~9e-2), which is also the default ``tol``.
        Eigenvectors are returned in ``v0``'s dtypes.

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
        m = min(n, max(4 * k, 20))
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
    basis_dtype = _lz._check_basis_dtype(basis_dtype)
    if tol is None:
        # the least precise leaf (or the basis storage) bounds the basis accuracy
        eps_max = max(float(jnp.finfo(x.dtype).eps) for x in jax.tree.leaves(v0))
        if basis_dtype is not None:
            eps_max = max(eps_max, float(jnp.finfo(basis_dtype).eps))
        tol = float(np.sqrt(eps_max))

    fl = _lz._flat_leaves(matvec, v0)  # per-leaf 1-D basis: in-place row updates
    matvec = fl.matvec
    # One loop holds the only call site of ``matvec`` (so the compiled program
    # contains the product once): round 0 extends the empty basis from row 0,
    # every later round is a thick restart extending from row ``keep``. Each round
    # ends by compressing the basis to its ``keep`` wanted Ritz vectors, so on exit
    # the first ``k`` rows are the answer.
    state = _lz._init_state(fl.v0, m, acc, basis_dtype)

    # the test costs one m x m eigh; above m = 64 a dense eigh on CPU costs as much
    # as a small model's product, so large bases test every few steps (the run may
    # then overshoot the certifying depth by at most check_every - 1 products)
    check_every = max(1, -(-m // 64))

    def extend(state, start, anorm):
        """Lanczos steps from row ``start`` until row ``m`` or convergence.

        The wanted Ritz pairs are tested after every step (every
        ``ceil(m / 64)`` steps; one ``m x m`` ``eigh``, no product), so a run
        stops at the first Krylov depth that certifies them instead of at the
        end of a restart cycle.
        """

        def step_cond(c):
            j, _, conv = c
            return (j < m) & ~conv & c[1].finite

        def step(c):
            j, s, _ = c
            s = _lz._extend_step(matvec, j, s, None)
            # an (almost) invariant subspace has zero residuals without holding
            # the wanted pairs (a deficient v0): never stop early on a breakdown;
            # the next step continues from a fresh random direction instead.
            alive = ~_lz._is_breakdown(s.beta, s.anorm, m)
            due = ((j + 1 - start) % check_every == 0) & (j + 1 > k) & (j + 1 < m) & alive
            conv = jax.lax.cond(
                due, lambda s: _ritz(s, k, which, tol, j + 1)[3], lambda s: jnp.asarray(False), s
            )
            return j + 1, s, conv

        s = state._replace(anorm=jnp.maximum(state.anorm, anorm))
        j, s, _ = jax.lax.while_loop(step_cond, step, (start, s, jnp.asarray(False)))
        return s, j

    def cond(c):
        state, it, conv = c[0], c[1], c[2]
        return (it == 0) | ((~conv) & (it <= max_restarts) & state.finite)

    def body(c):
        state, it, conv, theta, Y, res, anorm, count = c
        first = it == 0
        start = jnp.where(first, 0, keep)
        new, filled = extend(state, start, anorm)
        theta_n, Y_n, res_n, conv_n, anorm_n = _ritz(new, k, which, tol, filled)
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
            count + (filled - start),
        )

    init = (
        state, jnp.asarray(0), jnp.asarray(False), jnp.zeros(m, acc), jnp.eye(m, dtype=acc),
        jnp.full(m, jnp.inf, acc), jnp.zeros((), acc), jnp.asarray(0, jnp.int32),
    )
    state, rounds, conv, theta, Y, res, _, count = jax.lax.while_loop(cond, body, init)
    it = rounds - 1  # thick restarts performed
    X = fl.unflat_basis(_lz._upcast_basis(jax.tree.map(lambda q: q[:k], state.Q), fl.v0))
    vals = theta[:k]
    finite = state.finite
    vals = jnp.where(jnp.isfinite(vals), vals, 0.0)
    return EigshResult(
        eigenvalues=vals,
        eigenvectors=X,
        residual_norms=jnp.where(jnp.isfinite(res[:k]) & finite, res[:k], jnp.inf),
        num_matvecs=count,
        num_restarts=it,
        converged=conv & finite,
        finite=finite,
    )
