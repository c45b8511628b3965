"""The Krylov engine every Lanczos-type algorithm in curvlib shares.

A *band* Krylov basis (Ruhe 1979) built one product at a time, with full
reorthogonalisation. The basis ``Q`` has ``m`` rows filled in order (``nbas``
of them used); each used row is

* *multiplied* (``mult``): ``A q_i`` is known through its Gram-Schmidt
  coefficients, column ``i`` of ``H``;
* *pending*: orthonormal, waiting to be multiplied. A plain Lanczos chain has
  one pending row (its normalised residual); every extra pending row is
  another Krylov chain (a block of starting vectors);

Each step multiplies the first pending row ``q = Q[j]``, orthogonalises
``w = A q`` against every row (classical Gram-Schmidt twice, as two
basis-times-block products), stores the coefficients as column ``j`` of
``H`` and appends ``w / ||w||`` as a new pending row with ``H[nbas, j] =
||w||``. Rows are created in index order and multiplied first-in first-out,
so for ``i < j`` the entry ``H[i, j] = <q_i, A q_j>`` was computed when ``j`` was
multiplied, and rows created after a product are orthogonal to it (but for its
own remainder): exactly (to rounding)

    A q_j = sum_i H[i, j] q_i   for every multiplied j,

the projected matrix ``T = Q_mul A Q_mul^T`` is the mirrored upper triangle of
the multiplied block of ``H``, and the residual of a Ritz pair
``(theta, x = Q_mul^T y)`` is ``A x - theta x = Q_pend^T F y`` with ``F`` the
pending rows of ``H``: ``||A x - theta x|| = ||F y||``, no product needed. For
one chain ``F`` has a single non-zero, ``beta``, and this is the classical
``|beta y_last|``. Thick restarts (Wu & Simon 2000) keep Ritz vectors and the
pending rows with their rotated coupling ``F Y`` (the "arrowhead"). A fresh
vector appended as a new pending row has zero coupling to every multiplied
row (their products lie in the span of the basis), so new chains can start at
any time without breaking the relation.

A restart may also *drop* the pending rows ([`curvlib.eigsh`][curvlib.eigsh] does, to run
a verification block against locked pairs without the old chain). A kept
vector ``x_i`` then has ``A x_i = theta_i x_i + c_i d`` with ``d`` outside the
basis; the couplings ``c`` are kept as a column of ``E`` (one signed column per
stored dropped vector ``d_c``), and residual norms become the rigorous bound ``||F y|| +
||sum_c (E[:, c] . y) d_c||``, the second term from the dropped vectors' Gram matrix. Pending
rows dropped once every slot is taken are not stored: their couplings are kept as the
factor ``R`` of their Gram matrix (``R^T R = sum E_c E_c^T`` over those vectors, rotated with
the basis like ``E``), and the residual bound gains ``sqrt(l) ||R y||`` (``l`` drops left
vectors unstored; the vectors of one drop are orthonormal, those of different drops need
not be).

A fresh direction is orthogonalised (`fresh`) only at the steps that
use one, under a ``lax.cond``: every Gram-Schmidt pass reads the whole basis,
which at large ``N`` is the cost of a step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from curvlib import _tree
from curvlib._xp import at_set, cond, xp

PyTree = Any



class Band(NamedTuple):
    """State of a band Krylov basis (see the module docstring)."""

    Q: PyTree  # (m, ...) rows (m: the capacity); zero beyond nbas
    H: jax.Array  # (m, m) H[i, j] = <q_i, A q_j> for multiplied j
    E: jax.Array  # (m, c) couplings of multiplied rows to dropped vectors (c >= 1 columns)
    D: PyTree | None  # (c, ...) the dropped unit vectors (None when dropping is not used)
    G: jax.Array  # (c, c) Gram matrix of the stored dropped vectors (zero where none)
    R: jax.Array  # (m, m) factor of the couplings to dropped vectors that were not stored
    lost: jax.Array  # int32: drops that left vectors unstored
    ndrop: jax.Array  # int32: dropped vectors stored in D (at most c)
    mult: jax.Array  # (m,) bool: multiplied rows
    nbas: jax.Array  # int32: used rows
    anorm: jax.Array  # running max ||A q_j|| (a lower bound of ||A||)
    finite: jax.Array  # every product finite so far
    breakdowns: jax.Array  # int32: products whose remainder was numerically zero
    near: jax.Array  # int32: products whose remainder was below sqrt(eps) ||A|| (breakdowns too)
    limit: jax.Array  # int32: rows the basis may use (<= m; below it the rest is padding)


def acc_dtype(v):
    """Accumulation dtype of inner products and of ``H``: the vector dtype, at least float32."""
    return xp.promote_types(_tree.dtype(v), xp.float32)


def size(band: Band) -> int:
    return int(band.H.shape[0])


def init(v0, m: int, acc, basis_dtype=None, num_external: int = 0, limit=None) -> Band:
    """A basis of ``m`` rows holding ``v0 / ||v0||`` as its one pending row (``v0 != 0``).

    ``num_external`` dropped vectors (`compress` with ``drop_pending``) are
    stored, so that `exact_residuals` can report true residual norms. ``limit``
    (``<= m``, may be traced; default ``m``) caps the rows used: the other rows are
    padding that never enters the arithmetic, so one program serves every basis
    size up to its capacity ``m``.
    """
    Q = _tree.basis_zeros(v0, m, basis_dtype)
    # v0 / ||v0|| at any scale: divided by its largest entry first (then 1 <= ||.|| <= sqrt(N))
    c = _tree.max_abs(v0, acc)
    u = _tree.scale(1.0 / xp.where((c > 0) & xp.isfinite(c), c, 1.0), v0)
    nv = _tree.plain_norm(u).astype(acc)
    Q = _tree.basis_set(Q, 0, _tree.scale(1.0 / xp.where(nv > 0, nv, 1.0), u))
    f = xp.zeros(m, bool)
    return Band(
        Q=Q, H=xp.zeros((m, m), acc), E=xp.zeros((m, max(num_external, 1)), acc),
        D=_tree.basis_zeros(v0, num_external, basis_dtype) if num_external else None,
        G=xp.zeros((max(num_external, 1),) * 2, acc), R=xp.zeros((m, m), acc),
        lost=xp.zeros((), xp.int32),
        ndrop=xp.zeros((), xp.int32), mult=f,
        nbas=xp.asarray(1, xp.int32),
        anorm=xp.zeros((), acc), finite=_tree.all_finite(v0),
        breakdowns=xp.zeros((), xp.int32), near=xp.zeros((), xp.int32),
        limit=xp.asarray(m if limit is None else limit, xp.int32),
    )


def capacity(m: int, dim: int | None = None) -> int:
    """The basis capacity of ``m`` rows' size class: the next of 16, 24, 32, 48, 64, 96, ...

    (``2^j`` and ``1.5 * 2^j``; at most ``dim`` when given). Programs that take the
    rows used as data (`init`'s ``limit``) are compiled once per class, so a new
    ``k``, depth or basis size in a running session reuses them; the padding rows
    never enter the arithmetic and add at most half the basis.
    """
    c = 16
    while c < m:
        c = c * 3 // 2 if c & (c - 1) == 0 else c * 4 // 3
    return c if dim is None else min(c, dim)


def used(band: Band):
    return xp.arange(size(band)) < band.nbas


def pending(band: Band):
    return used(band) & ~band.mult


def next_row(band: Band):
    """``(j, any)``: the first pending row and whether there is one."""
    p = pending(band)
    return xp.argmax(p), xp.any(p)


def request(band: Band, like: PyTree) -> PyTree:
    """The next vector to multiply (the first pending row), or zero if none is pending."""
    j, some = next_row(band)
    q = _tree.basis_get(band.Q, j)
    return jax.tree.map(lambda a, b: xp.where(some, a, 0).astype(xp.result_type(b)), q, like)


def _orthogonalize_block(Q, W, acc):
    """Two classical Gram-Schmidt passes of the rows of ``W`` against ``Q``: ``(W_perp, W Q^T)``."""
    h1 = _tree.basis_gram(W, Q, acc)
    W = _tree.sub(W, _tree.basis_matmul(h1, Q))
    h2 = _tree.basis_gram(W, Q, acc)
    W = _tree.sub(W, _tree.basis_matmul(h2, Q))
    return W, h1 + h2


def _lossy(band: Band) -> float:
    """``sqrt(eps)`` of the basis storage when it is coarser than the accumulation, else 0.

    Rows stored in, say, bfloat16 are orthonormal only to its ``eps``: Gram-Schmidt against
    them leaves a part of order ``eps ||w||`` inside their span, and a remainder ``beta``
    far below ``||w||`` is mostly that part. Normalised, it made a row nearly dependent on
    the others, and a projected matrix with a Ritz value of 8.43 for an operator whose
    largest eigenvalue is 3.86 (20 x 20, four distinct values, bfloat16 basis: certified).
    A remainder below ``sqrt(eps) ||w||`` (the attainable relative accuracy of such a basis)
    is therefore a breakdown, and a fresh direction that keeps less than that of its norm is
    unusable. Static.
    """
    eb = max(float(jax.numpy.finfo(q.dtype).eps) for q in jax.tree.leaves(band.Q))
    return float(np.sqrt(eb)) if eb > float(jax.numpy.finfo(band.H.dtype).eps) else 0.0


def certifiable(band: Band, like):
    """Whether residuals at rounding level (``eps ||A||``) are normal numbers, and the
    products of a coarser vector dtype (``like``'s) are precise enough to certify.

    Below ``||A|| = tiny / eps`` (about ``1e-31`` in float32, ``1e-292`` in float64) the
    remainders that certify a pair are subnormal, which XLA flushes to zero: a
    residual of zero there proves nothing, and the pairs are returned unconverged.
    Products in a dtype whose normal range ends sooner (float16: ``6e-5``) carry a
    rounding of ``tiny eps`` per subnormal entry, up to ``sqrt(n) tiny eps`` over the
    ``n`` entries of that dtype, which the residuals do not see: certified only while
    that stays below ``sqrt(eps) ||A||`` (the default tolerance), else a float16
    operator of norm ``2e-6`` had Ritz values 6-10% above its largest eigenvalue and
    residuals 16x the reported ones.
    """
    fi = xp.finfo(band.H.dtype)
    ok = band.anorm * fi.eps >= fi.tiny
    sizes = {}
    for x in jax.tree.leaves(like):
        sizes[np.dtype(x.dtype)] = sizes.get(np.dtype(x.dtype), 0) + int(np.prod(np.shape(x)))
    for dt, n in sizes.items():  # (static: the coarser ranges than the accumulation's)
        fv = np.finfo(dt)
        if float(fv.tiny) > float(fi.tiny):
            ok = ok & (band.anorm >= float(np.sqrt(n) * fv.tiny * np.sqrt(fv.eps)))
    return ok


def breakdown_threshold(band: Band):
    """``10 sqrt(m) eps ||A||``: below it a remainder is numerically zero.

    Never below the smallest normal number ``tiny``: XLA flushes a subnormal remainder to
    zero, while NumPy (the eager steps) keeps it, and its reciprocal overflowed to ``inf``
    (an operator of norm ``3e-37`` in float32: NaN eigenvalues, ``finite=False``, where the
    compiled program said ``STALLED``).
    """
    acc = band.H.dtype
    fi = xp.finfo(acc)
    return xp.maximum(10 * fi.eps * xp.sqrt(band.limit.astype(acc)) * band.anorm, fi.tiny)


def _write_row(Q, slot, q, ok):
    # an out-of-range index drops the write: no read of the old row, so XLA can
    # update the basis in place (a `where` against ``Q[slot]`` costs a copy of Q)
    m = jax.tree.leaves(Q)[0].shape[0]
    idx = xp.where(ok, slot, m)
    return jax.tree.map(lambda Qi, qi: at_set(Qi, idx, qi.astype(Qi.dtype), mode="drop"), Q, q)


def absorb(band: Band, w: PyTree) -> Band:
    """Record the product ``w = A q`` of the row ``q`` requested last.

    Orthogonalises ``w`` against the basis (two passes), stores the
    coefficients as that row's column of ``H``, marks it multiplied, and
    appends the normalised remainder as a new pending row unless it is
    numerically zero (a *breakdown*: the chain has reached an invariant
    subspace) or the basis is full (callers compress first: `has_room`).
    A non-finite product is replaced by zero and clears ``finite``. If no row
    was pending the request was zero, and nothing changes but the count.
    """
    acc = band.H.dtype
    m = size(band)
    j, some = next_row(band)
    finite = band.finite & _tree.all_finite(w)
    w = _tree.where(finite, w, _tree.zeros_like(w))
    W, h = _orthogonalize_block(band.Q, jax.tree.map(lambda x: x[None], w), acc)
    w = _tree.basis_get(W, 0)
    rows = xp.arange(m)
    H = at_set(band.H, (slice(None), j),
               xp.where(some & (rows < band.nbas), h[0], band.H[:, j]))
    # the one norm over N numbers per product; scale-safe (see _tree.norm): its square
    # would overflow or underflow for an operator of norm beyond ~1e+-19 (float32)
    beta = _tree.norm(w).astype(acc)
    # ||A q|| = ||(h, beta)|| (its parts along the basis and off it), from m + 1 numbers
    wnorm = column_norms(xp.append(h[0], beta)[:, None])[0]
    anorm = xp.maximum(band.anorm, wnorm)
    band = band._replace(anorm=anorm)
    broke = ~(beta > breakdown_threshold(band)) | ~xp.isfinite(beta)
    lossy = _lossy(band)
    if lossy:
        broke = broke | ~(beta > lossy * wnorm)
    append = some & ~broke & (band.nbas < band.limit)
    q = _tree.scale(1.0 / xp.where(append, beta, 1.0), w)
    slot = xp.minimum(band.nbas, m - 1)
    Q = _write_row(band.Q, slot, q, append)
    H = at_set(H, (slot, j), xp.where(append, beta, H[slot, j]))
    return band._replace(
        Q=Q, H=H, mult=at_set(band.mult, j, band.mult[j] | some),
        nbas=band.nbas + append.astype(xp.int32), finite=finite,
        breakdowns=band.breakdowns + (some & broke & finite).astype(xp.int32),
        near=band.near + (some & finite & (broke | ~(beta > xp.sqrt(xp.finfo(acc).eps) * anorm))
                          ).astype(xp.int32),
    )


def fresh(band: Band, z: PyTree, want):
    """``(q, usable)``: the candidate direction ``z`` as a unit vector orthogonal to the basis.

    The two Gram-Schmidt passes run only when ``want`` (a ``lax.cond``): a
    fresh direction is needed for a breakdown or a verification block, rarely
    at every step, and each pass reads the whole basis. ``usable`` is false
    when ``z`` lies numerically in the span (or was not wanted); ready for
    `inject`.
    """
    acc = band.H.dtype

    def orthogonalize(z):
        Z, _ = _orthogonalize_block(band.Q, jax.tree.map(lambda x: x[None], z), acc)
        zp = _tree.basis_get(Z, 0)
        # z is a Gaussian direction (entries of order one): no range test needed
        nz = _tree.plain_norm(z).astype(acc)
        nr = _tree.plain_norm(zp).astype(acc)
        eps = xp.finfo(acc).eps
        usable = (nr > 10 * eps * xp.sqrt(band.limit.astype(acc)) * nz) & xp.isfinite(nr)
        lossy = _lossy(band)
        if lossy:
            usable = usable & (nr > lossy * nz)
        q = _tree.scale(1.0 / xp.where(usable, nr, 1.0), zp)
        # in the candidate's dtype, as the other branch (a basis wider than the vectors
        # promoted it, and the cond refused the two branches)
        return jax.tree.map(lambda a, b: a.astype(b.dtype), q, z), usable

    return cond(want, orthogonalize, lambda z: (z, xp.asarray(False)), z)


def inject(band: Band, q: PyTree, ok) -> Band:
    """Append the unit vector ``q`` (orthogonal to the basis) as a new pending row if ``ok``.

    Its coupling to every multiplied row is zero (their products lie in the
    span of the basis), so ``H`` gets no new entries.
    """
    m = size(band)
    ok = ok & (band.nbas < band.limit)
    slot = xp.minimum(band.nbas, m - 1)
    return band._replace(Q=_write_row(band.Q, slot, q, ok),
                         nbas=band.nbas + ok.astype(xp.int32))


def has_room(band: Band):
    """Whether the next product's remainder can be stored (a free row exists)."""
    return band.nbas < band.limit


def projected(band: Band):
    """``T = Q_mul A Q_mul^T`` (``m x m``, zero outside the multiplied rows and columns)."""
    mm = band.mult[:, None] & band.mult[None, :]
    return xp.where(mm, xp.triu(band.H) + xp.triu(band.H, 1).T, 0.0)


@_tree.full_precision
def residual_norms(band: Band, Y):
    """Bounds of ``||A x_i - theta_i x_i||`` for Ritz vectors ``x_i = Q^T Y[:, i]``.

    ``||F y||`` exactly, plus ``||sum_c (E[:, c] . y) d_c|| = sqrt(e^T G e)`` when
    vectors were dropped (``G`` their Gram matrix, kept by `compress`), plus
    ``sqrt(l) ||R y||`` for the dropped vectors that were not stored (`_unstored`). The
    dropped part is the norm the residual had along the pending rows it was dropped from,
    not inflated by the drop: a pair certified before a verification round stays so.
    """
    F = xp.where(pending(band)[:, None] & band.mult[None, :], band.H, 0.0)
    krylov = column_norms(F @ Y)
    if band.D is None:
        return krylov
    krylov = krylov + _unstored(band, Y)
    e = xp.where(band.mult[:, None], band.E, 0.0).T @ Y  # (c, cols)
    # e scales with the operator: divided by its largest entry before the quadratic form
    sc = xp.max(xp.abs(e), axis=0)
    sc = xp.where((sc > 0) & xp.isfinite(sc), sc, 1.0)
    e = e / sc
    dropped = sc * xp.sqrt(xp.maximum(xp.sum(e * (band.G @ e), axis=0), 0.0))
    return krylov + dropped


def _unstored(band: Band, Y):
    """``sqrt(l) ||R y||`` per column: the bound of the residual part ``sum_c (E_c . y) d_c``
    along the dropped vectors that were not stored (`compress`). The vectors of one drop are
    orthonormal (pending rows), so each drop's part has norm ``||e_drop||``; over ``l`` drops
    the sum is at most ``sqrt(l) ||e||``, and ``||e|| = ||R y||``. Exact under rotations of
    the basis: restarts do not inflate it."""
    return xp.sqrt(band.lost.astype(band.H.dtype)) * column_norms(band.R @ Y)


def column_norms(X):
    """Euclidean norms of the columns of a small matrix, free of overflow and underflow.

    Each column is divided by its largest entry before it is squared (``H`` and its
    residual couplings scale with the operator: a float32 operator of norm ``1e25`` or
    ``1e-25`` has squares outside the range).
    """
    s = xp.max(xp.abs(X), axis=0)
    d = xp.where((s > 0) & xp.isfinite(s), s, 1.0)
    return xp.where(xp.isfinite(s), d * xp.sqrt(xp.sum((X / d) ** 2, axis=0)), s)


class Order:
    """Wanted-first ordering of Ritz values for ``which`` in ``("LA", "SA", "LM")``.

    ``which`` is the name, or its code (`CODES`) as a traced integer: one program
    then serves all three orders.
    """

    CODES = {"LA": 0, "SA": 1, "LM": 2}

    def __init__(self, which):
        self.which = which

    def _pick(self, la, sa, lm):
        if isinstance(self.which, str):
            return {"LA": la, "SA": sa, "LM": lm}[self.which]()
        c = self.which
        return xp.where(c == 0, la(), xp.where(c == 1, sa(), lm()))

    def key(self, theta):
        """Ascending key: wanted values first."""
        return self._pick(lambda: -theta, lambda: theta, lambda: -xp.abs(theta))

    def sentinel(self, span):
        """A diagonal value for unused rows beyond the unwanted end of the spectrum."""
        return self._pick(lambda: -2 * span, lambda: 2 * span, lambda: 0.0 * span)

    def gain(self, new, old):
        """How much more wanted ``new`` is than ``old`` (positive = better)."""
        return self._pick(lambda: new - old, lambda: old - new,
                          lambda: xp.abs(new) - xp.abs(old))


def ritz(band: Band, order: Order):
    """Ritz pairs of the multiplied rows, wanted first: ``(theta, Y, res, valid)``.

    Other rows get a sentinel diagonal beyond the unwanted end of the spectrum;
    an eigenvector is *valid* when its weight on the multiplied rows exceeds
    1/2, and invalid ones sort last whatever their value. One ``m x m`` ``eigh``.

    Entries below ``eps ||T||_inf`` are set to zero first: they lie below ``T``'s own
    rounding (moving the Ritz values by at most ``m eps ||T||``, under every
    threshold), and LAPACK's divide and conquer, which ``eigh`` runs on NumPy and on
    XLA:CPU, can fail on them (NaN, or NumPy's "did not converge"): a ``48 x 48``
    ``T`` holding ten equal Ritz values of a repeated eigenvalue did, with two
    couplings of ``1e-27``.
    """
    T = projected(band)
    # divided by a power of two near its largest entry (exact): the row sums, the sentinel
    # and eigh's own norms stay in range for an operator near the largest float (the row
    # sums overflowed from ||A|| ~ fmax / 2 and zeroed T: Ritz value 0, certified)
    scale = xp.ldexp(xp.ones((), T.dtype), xp.frexp(xp.max(xp.abs(T)))[1] - 1)
    T = T / scale
    span = xp.max(xp.sum(xp.abs(T), axis=1)) + xp.finfo(T.dtype).tiny
    T = xp.where(xp.abs(T) > xp.finfo(T.dtype).eps * span, T, 0.0)
    T = T + xp.diag(xp.where(band.mult, 0.0, order.sentinel(span)).astype(T.dtype))
    theta, Y = xp.linalg.eigh(T)
    theta = theta * scale
    valid = xp.sum(xp.where(band.mult[:, None], Y**2, 0.0), axis=0) > 0.5
    idx = xp.argsort(xp.where(valid, order.key(theta), xp.inf), stable=True)
    theta, Y, valid = theta[idx], Y[:, idx], valid[idx]
    return theta, Y, residual_norms(band, Y), valid


@_tree.full_precision
def compress(band: Band, Y, K, drop_pending=False) -> Band:
    """Thick restart: keep the ``K`` (traced) Ritz vectors ``Q^T Y[:, :K]`` and the pending rows.

    New rows: ``[0, K)`` the Ritz vectors (multiplied, ``H`` block ``Y^T T Y``:
    diagonal for Ritz vectors), then the pending rows with their coupling
    ``F Y`` to the kept vectors. With ``drop_pending`` (traced) the pending rows
    are dropped instead, their coupling moving to ``E`` (as many as there are free slots
    for stored dropped vectors) or, beyond the slots, to the factor ``R`` (`_unstored`): a
    drop never leaves an old chain pending to crowd the basis.

    Stored dropped vectors are first projected off the current basis (their
    components along kept and pending rows are accounted for exactly in the
    new ``H``), so that the relation ``A x_i = theta_i x_i + Q_pend^T F[:, i] +
    sum_c E[i, c] d_c`` holds exactly for the kept vectors.
    """
    m = size(band)
    acc = band.H.dtype
    rows = xp.arange(m)
    pend = pending(band)
    keep = rows < K
    Yk = xp.where(keep[None, :] & band.mult[:, None], Y, 0.0)  # (old rows, new cols)
    F = xp.where(pend[:, None] & band.mult[None, :], band.H, 0.0) @ Yk  # old pending x new cols
    E = Yk.T @ xp.where(band.mult[:, None], band.E, 0.0)  # new cols x c
    D, ndrop, drop = band.D, band.ndrop, xp.zeros(m, bool)
    if band.D is not None:
        c = E.shape[1]
        # (I - P_Q) d_c: the parts along current rows move into F (pending) or vanish
        # into T (multiplied: already in the Ritz values); the rest stays external
        G = xp.where(used(band)[None, :], _tree.basis_gram(band.D, band.Q, acc), 0.0)  # (c, m)
        Dp = _tree.sub(band.D, _tree.basis_matmul(G, band.Q))
        nu = xp.sqrt(xp.maximum(xp.diagonal(_tree.basis_gram(Dp, Dp, acc)), 0.0))
        live = (xp.arange(c) < band.ndrop) & (nu > 0)
        F = F + xp.where(pend[:, None], G.T @ E.T, 0.0)
        E = xp.where(live[None, :], E * nu[None, :], 0.0)
        scale = xp.where(live, 1.0 / xp.where(nu > 0, nu, 1.0), 0.0)
        D = _tree.basis_matmul(xp.diag(scale), Dp)
        # dropped pending row p takes the free column ndrop + (its rank among pending rows)
        slot = band.ndrop + xp.cumsum(pend) - 1
        drop = pend & (slot < c) & drop_pending
        lost = pend & (slot >= c) & drop_pending
        # R_new^T R_new = Yk^T R^T R Yk + F_lost^T F_lost, by a QR (no squares to overflow)
        R = xp.linalg.qr(xp.concatenate([band.R @ Yk, xp.where(lost[:, None], F, 0.0)]),
                         mode="r")
        nlost = band.lost + xp.any(lost).astype(xp.int32)
        S = ((xp.arange(c)[:, None] == slot[None, :]) & drop[None, :]).astype(acc)  # (c, m)
        E = E + F.T @ S.T
        taken = xp.any(S > 0, axis=1)
        D = jax.tree.map(
            lambda d, new: xp.where(taken.reshape((-1,) + (1,) * (d.ndim - 1)),
                                     new.astype(d.dtype), d),
            D, _tree.basis_matmul(S, band.Q))
        ndrop = band.ndrop + xp.sum(drop).astype(xp.int32)
        held = xp.arange(c) < ndrop
        Gram = xp.where(held[:, None] & held[None, :], _tree.basis_gram(D, D, acc), 0.0)
    else:
        Gram, R, nlost, lost = band.G, band.R, band.lost, drop
    carried = pend & ~drop & ~lost  # (none after a drop)
    n_car = xp.sum(carried)
    src = xp.argsort(xp.where(carried, rows, m + rows))  # carried rows in index order
    t = rows - K
    moved = (rows >= K) & (t < n_car)
    P = xp.where(moved[:, None] & (rows[None, :] == src[xp.clip(t, 0, m - 1)][:, None]),
                  1.0, 0.0).astype(acc)
    Q = _tree.basis_matmul(Yk.T + P, band.Q)
    newT = Yk.T @ projected(band) @ Yk
    H = xp.where(keep[:, None] & keep[None, :], newT, 0.0) + P @ F
    return band._replace(Q=Q, H=H, E=E, D=D, G=Gram, R=R, lost=nlost, ndrop=ndrop, mult=keep,
                         nbas=(K + n_car).astype(xp.int32))


@_tree.full_precision
def exact_residuals(band: Band, Y):
    """True ``||A x_i - theta_i x_i||`` for Ritz vectors ``x_i = Q^T Y[:, i]`` (columns of ``Y``).

    Without dropped vectors this is `residual_norms`. With them,
    ``A x - theta x = Q_pend^T F y + sum_c (E[:, c] . y) (I - P_mul) d_c``:
    the dropped vectors are projected off the multiplied rows once (``O(c m N)``)
    and the norms follow from a small Gram matrix. Dropped vectors that were not
    stored add their bound `_unstored` (zero unless more were dropped than stored).
    """
    if band.D is None:
        return residual_norms(band, Y)
    acc = band.H.dtype
    pend = pending(band)
    F = xp.where(pend[:, None] & band.mult[None, :], band.H, 0.0)
    E = xp.where(band.mult[:, None], band.E, 0.0)
    c = E.shape[1]
    live = xp.arange(c) < band.ndrop
    G = xp.where(band.mult[None, :], _tree.basis_gram(band.D, band.Q, acc), 0.0)  # (c, m)
    Dp = _tree.sub(band.D, _tree.basis_matmul(G, band.Q))  # (I - P_mul) d_c
    Gp = _tree.basis_gram(Dp, band.Q, acc)  # components on the pending rows (and zero else)
    Gd = _tree.basis_gram(Dp, Dp, acc)
    e = xp.where(live[:, None], E.T @ Y, 0.0)  # (c, cols)
    a = F @ Y  # (m, cols): pending-row coordinates of the Krylov part
    # a and e scale with the operator: divided by their largest entry before squaring
    sc = xp.maximum(xp.max(xp.abs(a), axis=0), xp.max(xp.abs(e), axis=0))
    sc = xp.where((sc > 0) & xp.isfinite(sc), sc, 1.0)
    a, e = a / sc, e / sc
    # ||Q^T a + sum_c e_c Dp_c||^2 = ||a||^2 + 2 a . (Gp^T e) + e^T Gd e
    sq = xp.sum(a * a, axis=0) + 2 * xp.sum(a * (Gp.T @ e), axis=0) + xp.sum(e * (Gd @ e),
                                                                                   axis=0)
    exact = sc * xp.sqrt(xp.maximum(sq, 0.0)) + _unstored(band, Y)
    return xp.where(band.ndrop <= c, exact, residual_norms(band, Y))
