"""Lanczos tridiagonalisation with full reorthogonalisation, on pytrees.

The core step is shared by :func:`lanczos`, the thick-restart :func:`eigsh`
and stochastic Lanczos quadrature: it extends an orthonormal basis ``Q`` (a
pytree with leading axis ``m``) by one vector and records the column
``Q^T A q_j`` of the projected matrix. Reorthogonalisation is classical
Gram-Schmidt applied twice ("twice is enough", Giraud et al. 2005), written as
two basis-times-vector products per step rather than a loop over the basis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from curvlib import _tree

PyTree = Any


class LanczosResult(NamedTuple):
    """Output of :func:`lanczos`.

    Attributes:
      basis: orthonormal Lanczos vectors ``q_0 .. q_{m-1}`` (pytree, leading axis ``m``).
      alphas: diagonal of the tridiagonal ``T`` (shape ``(m,)``).
      betas: off-diagonal of ``T`` (shape ``(m-1,)``); a zero marks a breakdown
        after which the recursion restarted from a fresh orthogonal direction.
      residual: the unnormalised next vector ``r = beta_m q_m`` so that
        ``A Q^T = Q^T T + r e_m^T``.
      residual_norm: ``||r|| = beta_m``.
      breakdown: whether an invariant subspace was met (``beta_j`` ~ 0 for some j).
      num_matvecs: products used (``m``).
      finite: whether every product was finite.
    """

    basis: PyTree
    alphas: jax.Array
    betas: jax.Array
    residual: PyTree
    residual_norm: jax.Array
    breakdown: jax.Array
    num_matvecs: int
    finite: jax.Array


class _Krylov(NamedTuple):
    """Internal state: basis, projected matrix (columns), next vector."""

    Q: PyTree  # (m, ...) orthonormal rows (zeros beyond the filled part)
    H: jax.Array  # (m, m) column j holds Q^T A q_j (entries <= j+1 valid)
    r: PyTree  # unnormalised next vector (orthogonal to Q)
    beta: jax.Array  # ||r||
    breakdown: jax.Array
    finite: jax.Array
    # running max of ||A q_j|| (before orthogonalisation): the scale against which a
    # small ``beta`` counts as a breakdown. ``None`` means "unknown" (treated as 0).
    anorm: jax.Array | None = None


def _random_direction(key_int, like):
    key = jax.random.fold_in(jax.random.PRNGKey(7919), key_int)
    return _tree.normal_like(key, like)


def _orthogonalize(Q, w, acc_dtype):
    """Two passes of classical Gram-Schmidt against every row of ``Q``.

    Returns the projected vector and the total coefficients ``Q w``.
    """
    h1 = _tree.basis_project(Q, w, acc_dtype)
    w = _tree.sub(w, _tree.basis_combine(Q, h1, like=w))
    h2 = _tree.basis_project(Q, w, acc_dtype)
    w = _tree.sub(w, _tree.basis_combine(Q, h2, like=w))
    return w, h1 + h2


def _is_breakdown(beta, anorm, m):
    """``beta <= 10 sqrt(m) eps ||A||`` (or non-finite): the next vector is numerically zero."""
    eps = jnp.finfo(jnp.result_type(beta)).eps
    thresh = 10 * eps * jnp.sqrt(jnp.asarray(m, jnp.result_type(beta))) * anorm
    return ~(beta > thresh) | ~jnp.isfinite(beta)  # NaN or Inf (an infinite v0) too


def _extend_step(matvec: Callable, j, state: _Krylov, scale) -> _Krylov:
    """Append ``q_j = r / beta`` to the basis and compute ``r <- A q_j`` orthogonalised.

    A breakdown is ``beta <= 10 sqrt(m) eps ||A||``, with ``||A||`` estimated by
    the largest ``||A q_i||`` seen so far (``state.anorm``): the test is relative
    to the operator's own scale, so operators of tiny or huge norm (a float32
    Hessian with entries ~1e-6) are treated alike. ``scale`` is unused and kept
    for signature compatibility. On breakdown the new vector is a deterministic
    random direction orthogonalised against the basis and the coupling is
    recorded as zero; since ``A q_i`` lies in ``span(Q)`` to working precision,
    the projected matrix and the Lanczos relation stay exact. A zero or
    non-finite start vector is a breakdown at ``j = 0``.
    """
    del scale
    Q, H, r, beta = state.Q, state.H, state.r, state.beta
    acc = H.dtype
    anorm = state.anorm
    broke = _is_breakdown(beta, anorm, H.shape[0])

    def fresh_direction(_):
        return _orthogonalize(Q, _random_direction(j, r), acc)[0]

    r = jax.lax.cond(broke, fresh_direction, lambda _: r, None)
    nr = _tree.norm(r).astype(acc)
    q = _tree.scale(1.0 / jnp.where(nr > 0, nr, 1.0), r)
    Q = _tree.basis_set(Q, j, q)
    w = matvec(q)
    # cast leaf by leaf (a pytree may mix dtypes; the loop carry must keep them)
    w = jax.tree.map(lambda x, y: jnp.asarray(x).astype(y.dtype), w, r)
    finite = state.finite & _tree.all_finite(w)
    w = _tree.where(finite, w, _tree.zeros_like(w))
    anorm = jnp.maximum(anorm, _tree.norm(w).astype(acc))
    w, h = _orthogonalize(Q, w, acc)
    # only rows <= j are meaningful
    mask = jnp.arange(H.shape[0]) <= j
    H = H.at[:, j].set(jnp.where(mask, h, 0.0))
    new_beta = _tree.norm(w).astype(acc)
    return _Krylov(Q, H, w, new_beta, state.breakdown | (broke & (j > 0)), finite, anorm)


def _extend(matvec, state: _Krylov, start, stop, scale=None) -> _Krylov:
    """Steps ``start .. stop-1`` of :func:`_extend_step` under one ``fori_loop``."""
    if state.anorm is None:
        state = state._replace(anorm=jnp.zeros((), state.H.dtype))
    return jax.lax.fori_loop(
        start, stop, lambda j, s: _extend_step(matvec, j, s, scale), state
    )


def projected_matrix(H: jax.Array) -> jax.Array:
    """Symmetric projected matrix ``Q A Q^T`` from the column-filled ``H``.

    Column ``j`` of ``H`` holds the Gram-Schmidt coefficients ``Q A q_j`` for
    rows ``<= j``; the upper triangle is mirrored. After a thick restart this
    gives the "arrowhead" matrix of Wu & Simon (2000) without special casing.
    """
    upper = jnp.triu(H)
    return upper + jnp.triu(H, 1).T


def _init_state(v0, m, acc_dtype, basis_dtype=None):
    nv = _tree.norm(v0).astype(acc_dtype)
    return _Krylov(
        Q=_tree.basis_zeros(v0, m, basis_dtype),
        H=jnp.zeros((m, m), acc_dtype),
        r=v0,
        beta=nv,
        breakdown=jnp.asarray(False),
        finite=_tree.all_finite(v0),
        anorm=jnp.zeros((), acc_dtype),
    )


def _acc_dtype(v0):
    dt = _tree.dtype(v0)
    return jnp.promote_types(dt, jnp.float32)


def _check_basis_dtype(basis_dtype):
    """``None`` or a real floating dtype (the storage type of the Krylov basis)."""
    if basis_dtype is None:
        return None
    try:
        dt = jnp.dtype(basis_dtype)
    except TypeError:
        raise ValueError(f"`basis_dtype` must be a floating dtype; got {basis_dtype!r}.") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"`basis_dtype` must be a real floating dtype; got {dt}.")
    return dt


def _upcast_basis(Q, like):
    """Basis rows back in the dtypes of ``like``'s leaves (after lower-precision storage)."""
    return jax.tree.map(lambda q, x: q.astype(jnp.result_type(x)), Q, like)


class _LeafFlat(NamedTuple):
    """Per-leaf 1-D view of a Krylov problem (internal; see :func:`_flat_leaves`)."""

    v0: PyTree
    matvec: Callable
    unflat: Callable  # vector with 1-D leaves -> shaped like the original v0
    unflat_basis: Callable  # basis with (m, size) leaves -> (m, *shape) leaves


def _flat_leaves(matvec: Callable, v0: PyTree) -> _LeafFlat:
    """Reshape every leaf of ``v0`` to 1-D and wrap ``matvec`` to match.

    Performance, not semantics: with a basis leaf of shape ``(m, *shape)`` for a
    multi-dimensional leaf, XLA (CPU) inserts whole-basis copies around the
    in-place row update inside the Lanczos loop (three copies of the basis per
    step on a transformer's parameters, about 3x the step's reorthogonalisation
    cost). With ``(m, size)`` leaves the update is in place. Leaves are *not*
    concatenated (no ``ravel_pytree``): the pytree structure is kept.

    Only on a single device: merging the axes of a leaf sharded along a minor
    axis (FSDP's ``P(None, "data")``) has no block layout, so the partitioner
    would replicate the whole basis (``tests/test_sharding.py``). With more than
    one device the leaves keep their shapes and the identity view is returned.
    """
    leaves, treedef = jax.tree.flatten(v0)
    shapes = [jnp.shape(x) for x in leaves]
    if jax.device_count() > 1 or all(len(s) <= 1 for s in shapes):
        identity = lambda t: t
        return _LeafFlat(v0, matvec, identity, identity)

    def flat(v):
        parts = treedef.flatten_up_to(v)
        return jax.tree.unflatten(treedef, [jnp.reshape(x, (-1,)) for x in parts])

    def unflat(v):
        parts = treedef.flatten_up_to(v)
        return jax.tree.unflatten(
            treedef, [jnp.reshape(x, s) for x, s in zip(parts, shapes, strict=True)]
        )

    def unflat_basis(Q):
        parts = treedef.flatten_up_to(Q)
        return jax.tree.unflatten(
            treedef,
            [jnp.reshape(x, (x.shape[0],) + s) for x, s in zip(parts, shapes, strict=True)],
        )

    return _LeafFlat(flat(v0), lambda v: flat(matvec(unflat(v))), unflat, unflat_basis)


def lanczos(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    num_matvecs: int,
    *,
    reortho: str = "full",
    basis_dtype=None,
) -> LanczosResult:
    """Lanczos tridiagonalisation ``A Q^T = Q^T T + r e_m^T`` of a symmetric operator.

    Builds an orthonormal basis ``Q`` of the Krylov space
    ``K_m(A, v0) = span{v0, A v0, ..., A^{m-1} v0}`` and the tridiagonal
    ``T = Q A Q^T`` (Lanczos 1950). With ``reortho="full"`` every new vector is
    re-orthogonalised against all previous ones by two classical Gram-Schmidt
    passes written as matrix products, which removes the spurious copies of
    converged eigenvalues that plain Lanczos produces in floating point.

    Cost: ``num_matvecs`` products, ``O(m N)`` extra work per step for full
    reorthogonalisation, memory ``(m + 2) N``.

    Args:
      matvec: symmetric linear operator on pytrees shaped like ``v0``.
      v0: start vector (any non-zero pytree; normalised internally).
      num_matvecs: Krylov depth ``m`` (static).
      reortho: ``"full"`` (default) or ``"none"`` (three-term recurrence only,
        for comparison; loses orthogonality as eigenvalues converge).
      basis_dtype: storage dtype of the basis (default: that of ``v0``'s leaves).
        A lower precision (float32 for float64 parameters, bfloat16 for
        float32) halves the stored ``m N`` basis; inner products and ``T``
        still accumulate in ``float32`` or wider, but orthogonality, and so the
        attainable accuracy of ``T``'s eigenvalues, is limited to about the
        basis dtype's epsilon times ``||A||``. The basis is returned in this
        dtype. Measured on XLA:CPU: a float32 basis under float64 vectors
        lowers the compiled program's memory; a bfloat16 one does not (the
        CPU backend widens bfloat16 to float32; ``docs/scaling.md``).

    Returns:
      A :class:`LanczosResult`.

    Raises:
      ValueError: if ``num_matvecs`` < 1 or exceeds the dimension, ``reortho`` is
        unknown, or ``matvec(v0)`` is not shaped like ``v0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> A = jnp.diag(jnp.arange(1.0, 21.0))
      >>> res = lanczos(lambda v: {"x": A @ v["x"]}, {"x": jnp.ones(20)}, 20)  # T ~ A
      >>> res.basis["x"].shape, round(float(jnp.abs(res.basis["x"] @ res.basis["x"].T
      ...                                              - jnp.eye(20)).max()), 4)
      ((20, 20), 0.0)
      >>> T = jnp.diag(res.alphas) + jnp.diag(res.betas, 1) + jnp.diag(res.betas, -1)
      >>> jnp.linalg.eigvalsh(T)[-3:].round(3).tolist()
      [18.0, 19.0, 20.0]

    References:
      C. Lanczos, *An iteration method for the solution of the eigenvalue problem
      of linear differential and integral operators*, J. Res. NBS 1950.
    """
    _tree.check_float_tree(v0, "v0")
    n = _tree.size(v0)
    if not isinstance(num_matvecs, int) or num_matvecs < 1:
        raise ValueError(f"`num_matvecs` must be a positive int; got {num_matvecs!r}.")
    if num_matvecs > n:
        raise ValueError(
            f"`num_matvecs`={num_matvecs} exceeds the dimension of `v0` ({n})."
        )
    _tree.check_matvec(matvec, v0, "v0")
    if reortho not in ("full", "none"):
        raise ValueError(f"`reortho` must be 'full' or 'none'; got {reortho!r}.")
    acc = _acc_dtype(v0)
    basis_dtype = _check_basis_dtype(basis_dtype)
    if basis_dtype is not None and reortho != "full":
        raise ValueError("`basis_dtype` needs reortho='full'.")
    if reortho == "full":
        fl = _flat_leaves(matvec, v0)
        state = _init_state(fl.v0, num_matvecs, acc, basis_dtype)
        state = _extend(fl.matvec, state, 0, num_matvecs, jnp.asarray(1.0, acc))
        T = projected_matrix(state.H)
        alphas = jnp.diag(T)
        betas = jnp.diag(T, -1)
        return LanczosResult(
            fl.unflat_basis(state.Q), alphas, betas, fl.unflat(state.r), state.beta,
            state.breakdown, num_matvecs, state.finite,
        )
    return _lanczos_plain(matvec, v0, num_matvecs, acc)


def _lanczos_plain(matvec, v0, m, acc):
    nv = _tree.norm(v0)
    q0 = _tree.scale(1.0 / nv, v0)

    def body(j, carry):
        Q, alphas, betas, q, q_prev, beta_prev, fin = carry
        Q = _tree.basis_set(Q, j, q)
        w = matvec(q)
        fin = fin & _tree.all_finite(w)
        a = _tree.vdot(q, w).astype(acc)
        w = _tree.add_scale(_tree.add_scale(w, -a, q), -beta_prev, q_prev)
        b = _tree.norm(w).astype(acc)
        alphas = alphas.at[j].set(a)
        betas = betas.at[j].set(b)
        q_next = _tree.scale(1.0 / jnp.where(b > 0, b, 1.0), w)
        return Q, alphas, betas, q_next, q, b, fin

    init = (
        _tree.basis_zeros(v0, m), jnp.zeros(m, acc), jnp.zeros(m, acc), q0,
        _tree.zeros_like(v0), jnp.zeros((), acc), _tree.all_finite(v0),
    )
    Q, alphas, betas, q, _, b, fin = jax.lax.fori_loop(0, m, body, init)
    return LanczosResult(
        Q, alphas, betas[:-1], _tree.scale(b, q), b, jnp.asarray(False), m, fin
    )
