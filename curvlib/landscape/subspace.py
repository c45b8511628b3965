"""The curvature-aligned subspace: top-``D`` eigenpairs of ``H^(k)`` and their overlap across k."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from curvlib import _deprecation, _tree, _validate
from curvlib._compile import eager_jit, quick_jit
from curvlib._status import worst
from curvlib.krylov import eigen
from curvlib.krylov.eigen import EigshResult
from curvlib.krylov.solvers import Eigsh, resolve
from curvlib.landscape import _common
from curvlib.landscape.coefficients import mean_check
from curvlib.operators import hessian_matvec

PyTree = Any


# ------------------------------------------------------------ the operator


def weighted_hessian_matvec(loss_fn: Callable, params: PyTree, data: PyTree, k, kind: str,
                            microbatch_size: int | None, mode: str) -> Callable:
    """``v -> H v`` for ``H`` the Hessian of ``sum_i w_i l_i`` (weights of ``kind`` at ``k``).

    ``kind="mean"`` gives ``H^(k)``, the Hessian of ``L_k``. Without
    microbatching the weighted loss over all of ``data`` goes to
    [`curvlib.hessian_matvec`][curvlib.hessian_matvec] (``mode="linearize"`` by default: one
    linearisation, then a tangent pass per product). With ``microbatch_size``
    every product loops over the chunks holding the weighted samples
    (``fwd-rev`` or ``rev-rev`` per chunk), so memory is one chunk's.
    """
    data = _common.chunkable(data, microbatch_size)
    dt = _common.weight_dtype(params)
    w = _common.sample_weights(_common.num_samples(data), k, kind, dt)
    safe = _common.sample_at(data, k)
    if microbatch_size is None:
        obj = lambda p, x, w_, s: _common.weighted_loss(loss_fn, p, x, w_, s)
        return hessian_matvec(obj, params, data, w, safe, mode=mode)
    lo, hi = _common.sample_range(k, kind)

    def matvec(v):
        def chunk(xs, ws):
            f = lambda p: _common.weighted_loss(loss_fn, p, xs, ws, safe)
            if mode == "fwd-rev":
                return jax.jvp(jax.grad(f), (params,), (v,))[1]
            return jax.grad(lambda p: _tree.vdot(jax.grad(f)(p), v))(params)

        init = _tree.acc_zeros_like(params)  # typed like params on an Explicit mesh
        out = _common.accumulate(chunk, init, data, w, microbatch_size, lo, hi)
        return jax.tree.map(lambda o, p: o.astype(jnp.result_type(p)), out, params)

    return matvec


# ------------------------------------------------------------ the subspace


@eager_jit(
    static_argnames=("loss_fn", "dim", "microbatch_size", "mode", "eigsh", "flatten", "layout"),
)
def _subspace(loss_fn, params, data, k, dim, key, microbatch_size, mode, eigsh, flatten,
              layout=None):
    if flatten:  # one flat vector: the loss of the unravelled parameters
        flat, unravel = ravel_pytree(params)
        flat_loss = lambda theta, batch: loss_fn(unravel(theta), batch)
        matvec = weighted_hessian_matvec(flat_loss, flat, data, k, _common.MEAN,
                                         microbatch_size, mode)
        v0 = jax.random.normal(key, flat.shape, flat.dtype)
        back = jax.vmap(unravel)
    else:
        product = weighted_hessian_matvec(loss_fn, params, data, k, _common.MEAN,
                                          microbatch_size, mode)
        matvec = lambda v: _common.constrain(product(v), layout)
        v0 = _common.constrain(_tree.flat_normal_like(key, params), layout)
        back = lambda U: _common.constrain(U, layout, True)
    res = eigen.eigsh(matvec, v0, dim, which="LA", solver=eigsh)
    return res._replace(eigenvectors=back(res.eigenvectors))


def _static(eigsh: Eigsh) -> Eigsh:
    """``eigsh`` with concrete numbers as Python scalars (a hashable static argument)."""
    def py(x, cast):
        return cast(x) if x is not None and not isinstance(x, jax.core.Tracer) else x
    return dataclasses.replace(eigsh, rtol=py(eigsh.rtol, float),
                               max_matvecs=py(eigsh.max_matvecs, int),
                               max_restarts=py(eigsh.max_restarts, int))


@_deprecation.moved_to_solver("curvlib.landscape.curvature_subspace", "eigsh", Eigsh,
                              basis_size="basis_size", tol="rtol", max_restarts="max_restarts",
                              num_matvecs="basis_size")
@_deprecation.renamed("curvlib.landscape.curvature_subspace", k="num_examples")
def curvature_subspace(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    num_examples: int,
    dim: int,
    *,
    key: jax.Array,
    microbatch_size: int | None = None,
    mode: str | None = None,
    eigsh: Eigsh | None = None,
    flatten: bool = False,
    check_mean: bool = True,
) -> EigshResult:
    """Top-``dim`` eigenpairs of ``H^(k)(params)``, the Hessian of ``L_k = loss_fn(., data[:k])``.

    Thick-restart Lanczos ([`curvlib.eigsh`][curvlib.eigsh], ``which="LA"``) on
    Hessian-vector products of ``L_k``: the eigenvalues are *signed* and ordered
    algebraically, largest first, and the eigenvectors orthonormal (a pytree
    shaped like ``params`` with a leading axis ``dim``). This is the ``U_D`` of
    ``Delta_2^(D)``; nested subspaces are its prefixes. Deflated power
    iteration (the reference implementation of the criterion) estimates
    ``||H v||`` (sign-blind, largest magnitude) with 20-30 products per vector;
    one Krylov basis serves all ``dim`` vectors at once.

    ``L_k = (1/k) sum_{i<k} l_i`` is a weighted sum of per-sample losses over
    the fixed-size ``data`` with ``k`` as data: one compiled program serves
    every ``k`` (a curve over ``k``, or ``k`` and ``k + 1``), and an eager
    second call with the same ``loss_fn`` and shapes reuses it. An eager call
    (with [`curvlib.compile_behind`][curvlib.compile_behind] on, the default)
    builds the operator in its own program and calls [`curvlib.eigsh`][curvlib.eigsh]
    eagerly, so the first answer waits only for the model's product to compile (the
    eigensolver's own program compiles behind); inside ``jax.jit`` it is one program.

    Cost: the products of [`curvlib.eigsh`][curvlib.eigsh] (``basis_size`` plus
    ``basis_size - keep`` per restart, fewer when it converges early); each
    product evaluates all ``n`` samples of ``data``, or with
    ``microbatch_size = m`` the ``ceil(k / m)`` chunks holding the first ``k``.
    Memory: ``basis_size + 2`` parameter-sized vectors plus one product's
    activations (one chunk's when microbatching).

    Args:
      loss_fn: ``loss_fn(params, batch)``, the mean loss over the batch's leading axis.
      params: the point ``w*`` (any pytree of float arrays).
      data: ordered samples (pytree, leading axis = sample order); the Hessian
        uses ``data[:k]``.
      num_examples: ``k``, the number of examples averaged in ``L_k`` (the paper's sample count),
        ``1 <= k`` and ``k + 1 <= n`` (the subspace serves an increment).
      dim: number of eigenpairs ``D``, ``1 <= D < N``.
      key: PRNG key for Lanczos' start vector.
      microbatch_size: chunk size ``m`` over the samples (bounds memory).
      mode: Hessian product mode: ``"linearize"`` (default without
        microbatching), ``"fwd-rev"`` (default with) or ``"rev-rev"``.
      eigsh: the eigensolver's options, a [`curvlib.Eigsh`][curvlib.Eigsh] (default
        ``Eigsh()``, the defaults of [`curvlib.eigsh`][curvlib.eigsh]); its ``basis_size``
        must satisfy ``D + 2 <= basis_size <= N``. The former keywords
        ``basis_size``, ``tol``, ``max_restarts`` and ``num_matvecs`` still
        work, with a warning.
      flatten: run the eigensolver on the ravelled parameter vector (the
        eigenvectors are returned as a pytree all the same). The Krylov vector
        algebra is per leaf, and XLA's compile time grows with the number of
        leaves: for a small, unsharded model with tens of leaves ``True``
        compiles several times faster. Leave ``False`` for sharded or large
        models (ravelling gathers and copies every parameter); parameters
        with explicit sharding types (a mesh with ``AxisType.Explicit`` axes)
        cannot be ravelled at all.
      check_mean: verify that ``loss_fn`` is a mean at ``params`` first
        ([`check_mean_loss`][curvlib.landscape.check_mean_loss]), as the other
        landscape functions do: the products weight the per-sample losses, so
        of a sum (or any loss that is not a mean) they are another matrix's.

    Returns:
      [`curvlib.EigshResult`][curvlib.EigshResult]; check ``converged``.

    Raises:
      ValueError: ``k < 1``, ``k + 1 > n``, ``dim >= N``, a basis size outside
        ``(D, N]``, a missing key, ``flatten=True`` with explicitly sharded
        ``params``, or with ``check_mean`` a ``loss_fn`` that is not a mean (or
        NaN/Inf losses at ``params``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib.landscape import curvature_subspace
      >>> loss = lambda w, x: 0.5 * jnp.mean((x @ w) ** 2)  # H^(k) = X_k^T X_k / k
      >>> x = jnp.array([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0]])
      >>> sub = curvature_subspace(loss, jnp.zeros(3), x, 3, 2, key=jax.random.PRNGKey(0))
      >>> [round(v, 4) for v in sub.eigenvalues.tolist()], bool(sub.converged)  # 9/3, 4/3
      ([3.0, 1.3333], True)
      >>> sub.eigenvectors.shape
      (2, 3)
    """
    k, loss_fn = _common.check_problem(loss_fn, params, data, num_examples)
    if flatten:
        for i, x in enumerate(jax.tree.leaves(params)):
            if _tree.explicit_sharding(x) is not None:
                raise ValueError(
                    "`flatten=True` ravels `params` into one vector, which JAX rejects for "
                    "explicit sharding types (a reshape merging sharded axes); leaf "
                    f"{i} of `params` is typed {jax.typeof(x).str_short()}. Use the default "
                    "`flatten=False` on a mesh with AxisType.Explicit axes."
                )
    eigsh = resolve(Eigsh, eigsh, "eigsh")
    dim = _common.check_subspace(dim, params, eigsh.basis_size)
    _validate.prng_key(key)
    mb = _validate.static_int(microbatch_size, "microbatch_size", minimum=1, optional=True)
    mode = _validate.mode(mode, microbatch_size=mb)
    if check_mean:
        mean_check(loss_fn, params, data, k, mb)
    return subspace(loss_fn, params, data, k, dim, key, mb, mode, eigsh, flatten)


def subspace(loss_fn, params, data, k, dim, key, microbatch_size, mode, eigsh, flatten):
    """`curvature_subspace` on checked arguments (``mode`` resolved, ``eigsh`` an
    [`Eigsh`][curvlib.Eigsh]): no checks."""
    layout = None if flatten else _tree.param_shardings(params)
    if not flatten and layout is None and _common.eager(params, data, k, key):
        return _subspace_now(loss_fn, params, data, k, dim, key, microbatch_size, mode, eigsh)
    return _subspace(loss_fn, params, data, k, dim, key, microbatch_size, mode, _static(eigsh),
                     bool(flatten), layout)


def _subspace_now(loss_fn, params, data, k, dim, key, microbatch_size, mode, eigsh):
    """`_subspace` in eager steps, so the eigensolver answers now.

    The operator is built by its own small program (the model's linearisation,
    `_common.linearized`, which the eager coefficients share), the start vector is the
    same draw, and [`curvlib.eigsh`][curvlib.eigsh] is called eagerly: its first call
    compiles only the model's product and runs its steps without compiling them, while
    its fused program compiles behind for later calls. The same eigenpairs to rounding,
    the same certificate.
    """
    v0 = _start_vector(key, params)
    if microbatch_size is None and mode in (None, "linearize"):
        k = np.int32(k)
        w = _common.host_weights(data, k, _common.MEAN, params)
        matvec = _common.linearized(loss_fn, params, data, k, w)[2]
    elif microbatch_size is None:
        matvec = _operator(loss_fn, params, data, k, mode)
    else:  # (a closure over the chunks: eigsh identifies its program by tracing it)
        matvec = weighted_hessian_matvec(loss_fn, params, data, k, _common.MEAN,
                                         microbatch_size, mode)
    return eigen.eigsh(matvec, v0, dim, which="LA", solver=eigsh)


_start_vector = quick_jit(_tree.flat_normal_like)  # (once per call: compiled cheaply)


@eager_jit(static_argnames=("loss_fn", "mode"))
def _operator(loss_fn, params, data, k, mode):
    """`weighted_hessian_matvec` without microbatching: an operator (a pytree) built once."""
    return weighted_hessian_matvec(loss_fn, params, data, k, _common.MEAN, None, mode)


# ------------------------------------------------------------ uniqueness


def unique_prefixes(eigenvalues, residual_norms, dims, tol=None) -> np.ndarray:
    """Whether each nested top-``D`` subspace is unique (host-side, per ``D`` in ``dims``).

    The span of the top ``D`` eigenvectors of ``H^(k)`` is a property of ``H^(k)`` only
    when ``lambda_D > lambda_{D+1}``. It is *not* unique, and ``Delta_2^(D)`` depends on
    which basis the eigensolver happened to return, when

    * ``lambda_D`` and ``lambda_{D+1}`` are tied within the certificate: their gap is at
      most ``r_D + r_{D+1} + tol (|lambda_D| + |lambda_{D+1}|)`` plus the rounding floor
      ``100 eps max_i |lambda_i|`` (``r`` the residual norms, ``tol`` the eigensolver's
      relative tolerance, default ``sqrt(eps)``), or
    * for the largest ``D`` (``lambda_{D+1}`` not computed), ``lambda_D`` is numerically
      zero (``|lambda_D| <= r_D + floor``): ``D`` likely exceeds the numerical rank of
      ``H^(k)`` (e.g. ``k = 2`` samples of a rank-one-per-sample loss and ``D = 3``), and
      the subspace holds an arbitrary null-space direction.

    A small ``lambda_D`` with a clear gap to ``lambda_{D+1}`` (an indefinite or
    ill-conditioned Hessian) is unique. For the largest ``D`` a tie with the next,
    uncomputed eigenvalue is not detected, and a zero ``lambda_D`` is flagged whether or
    not it is simple (ask for one more ``D``).

    Args:
      eigenvalues: the top eigenvalues, algebraically largest first (``(Dmax,)``).
      residual_norms: their residual norms (``(Dmax,)``).
      dims: nested dimensions ``D``, each ``<= Dmax``.
      tol: the eigensolver's relative tolerance (``None``: ``sqrt(eps)`` of the dtype).

    Returns:
      bool array, one entry per ``D``.

    Examples:
      >>> import numpy as np
      >>> from curvlib.landscape.subspace import unique_prefixes
      >>> lam = np.array([3.0, 1.0, 1.0, 0.0])
      >>> unique_prefixes(lam, np.zeros(4), [1, 2, 3, 4]).tolist()
      [True, False, True, False]
    """
    lam = np.asarray(eigenvalues)
    dt = lam.dtype if np.issubdtype(lam.dtype, np.floating) else np.float64
    lam = lam.astype(np.float64)
    res = np.nan_to_num(np.asarray(residual_norms, np.float64), nan=np.inf)
    eps = float(np.finfo(dt).eps)
    tol = np.sqrt(eps) if tol is None else float(tol)
    floor = 100 * eps * np.max(np.abs(lam), initial=0.0)
    out = []
    for d in dims:
        i = int(d) - 1
        zero = tie = False
        if i + 1 < lam.size:
            gap = lam[i] - lam[i + 1]
            tie = gap <= res[i] + res[i + 1] + tol * (abs(lam[i]) + abs(lam[i + 1])) + floor
        else:
            zero = abs(lam[i]) <= res[i] + floor
        out.append(not (zero or tie) and bool(np.isfinite(lam[i])))
    return np.asarray(out, bool)


# ------------------------------------------------------------ principal angles


def _tsqr_r(R: PyTree) -> jax.Array:
    """The ``q x q`` triangular factor of ``R^T = Q T`` for a basis ``R`` (``q`` vectors).

    Tall-skinny QR over the leaves: each leaf's ``(n_leaf, q)`` block is
    reduced by a Householder QR to its triangular factor, and the stacked
    factors are reduced once more. Backward stable like one QR of the
    ravelled ``N x q`` matrix, without ravelling the model.
    """
    q = _tree.basis_size(R)
    blocks = []
    for x in jax.tree.leaves(R):
        a = _tree.gathered(x).reshape(q, -1).T  # a q-vector block (replicated if split)
        blocks.append(jnp.linalg.qr(a, mode="r") if a.shape[0] > q else a)
    stacked = jnp.concatenate(blocks, axis=0)
    return jnp.linalg.qr(stacked, mode="r")[:q]


@eager_jit
def _principal_angles(U, V):
    # half-precision bases (bfloat16, float16 parameters) in float32: LAPACK has no
    # half-precision SVD or QR, and the angles accumulate as every inner product does
    U, V = (jax.tree.map(lambda x: x.astype(_tree.acc_dtype(x.dtype)), B) for B in (U, V))
    p, q = _tree.basis_size(U), _tree.basis_size(V)
    G = _tree.basis_gram(U, V)  # (p, q): cosines as singular values
    # residual of V's vectors after projecting out span(U), twice (the second
    # pass removes what rounding left along U when the residual is tiny)
    R = _tree.basis_matmul(jnp.eye(q, dtype=G.dtype), V)
    for _ in range(2):
        C = _tree.basis_gram(U, R)  # (p, q)
        R = jax.tree.map(lambda r, u: r - jnp.tensordot(C.T.astype(u.dtype), u, axes=1), R, U)
    m = min(p, q)
    cos = jnp.linalg.svd(G, compute_uv=False)[:m]  # descending
    sin = jnp.sort(jnp.linalg.svd(_tsqr_r(R), compute_uv=False))[:m]  # ascending
    # angle i (ascending) has the i-th largest cosine and the i-th smallest sine;
    # atan2 takes each from the one that determines it well
    return jnp.arctan2(jnp.clip(sin, 0.0, 1.0), jnp.clip(cos, 0.0, 1.0))


def principal_angles(U: PyTree, V: PyTree) -> jax.Array:
    """Principal angles (radians, ascending) between ``span(U)`` and ``span(V)``.

    ``U`` and ``V`` are orthonormal bases: pytrees with leading axes ``p`` and
    ``q`` (e.g. two ``curvature_subspace(...).eigenvectors``); there are
    ``min(p, q)`` angles, 0 for a shared direction and ``pi/2`` for an
    orthogonal one.

    The cosines are the singular values of the Gram matrix ``U V^T`` and the
    sines those of the residual ``(I - U^T U) V^T`` (Björck & Golub 1973);
    each angle is ``atan2(sin, cos)``. The cosine alone loses small angles:
    ``cos(1e-4) = 1 - 5e-9`` is 1 in float32, so ``arccos`` returns 0 (or
    ``~3e-4`` after rounding) where the sine form keeps them to about ``eps``
    absolute. The residual's singular values come from a tall-skinny QR over
    the leaves (no ravelling of the model).

    Cost: ``O((p + q) q N)`` for the Gram matrices and the two projections,
    ``O(q^2 N)`` for the QR; memory ``q`` parameter-sized vectors.

    Args:
      U: orthonormal basis, leading axis ``p`` (checked in an eager call; under ``jit``
        both bases are taken as given, and a basis that is not orthonormal gives
        angles with no meaning: ``2 I`` against ``I`` are pi/4 apart).
      V: orthonormal basis of the same structure, leading axis ``q``.

    Returns:
      ``(min(p, q),)`` angles in ``[0, pi/2]``, ascending.

    References:
      Å. Björck and G. H. Golub, *Numerical methods for computing angles
      between linear subspaces*, Math. Comp. 1973.
      A. V. Knyazev and M. E. Argentati, *Principal angles between subspaces
      in an A-based scalar product*, SIAM J. Sci. Comput. 2002.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.landscape import principal_angles
      >>> U = jnp.eye(3)[:2]; V = jnp.eye(3)[1:]
      >>> [round(float(t), 4) for t in principal_angles(U, V)]
      [0.0, 1.5708]
      >>> t = 1e-4  # a small angle survives in float32
      >>> V = jnp.array([[1.0, 0.0, 0.0], [0.0, jnp.cos(t), jnp.sin(t)]], jnp.float32)
      >>> round(float(principal_angles(U, V)[-1]) / t, 4)  # arccos of the cosine gives 0
      1.0
    """
    if jax.tree.structure(U) != jax.tree.structure(V):
        raise ValueError(
            f"`U` and `V` must have the same pytree structure; got {jax.tree.structure(U)} and "
            f"{jax.tree.structure(V)}."
        )
    for i, (u, v) in enumerate(zip(jax.tree.leaves(U), jax.tree.leaves(V), strict=True)):
        if jnp.ndim(u) < 1 or jnp.shape(u)[1:] != jnp.shape(v)[1:]:
            raise ValueError(
                "`U` and `V` must be bases of the same vectors (a leading basis axis, then "
                f"matching shapes); leaf {i} has shapes {jnp.shape(u)} and {jnp.shape(v)}."
            )
    _validate.basis(U, None, "U")
    _validate.basis(V, None, "V")
    return _principal_angles(U, V)


# ----------------------------------------------------------- k_curve's step
# (the inputs were checked once, by `curvlib.landscape.k_curve`; ``plan`` is its validated
# grid and options, ``plan.data`` the samples it uses)

def subspace_step(loss_fn, params, plan, k: int, key) -> dict:
    """A curve point's subspace: the top-``Dmax`` eigenpairs at ``k`` and, when asked and
    possible, at ``k + 1``; the principal angles between the nested subspaces."""
    c = plan.config
    Dmax = max(plan.dims)
    k_sub, k_next = jax.random.split(key)
    mode = "linearize" if c.microbatch_size is None else "fwd-rev"  # as curvature_subspace

    def solve(kk, key):  # the inputs were checked once, by k_curve
        return jax.block_until_ready(subspace(loss_fn, params, plan.data, kk, Dmax, key,
                                              c.microbatch_size, mode, c.eigsh, c.flatten))

    sub = solve(k, k_sub)
    out = dict(sub=sub, next=None, eigenvalues=np.asarray(sub.eigenvalues),
               eigenvalues_next=np.full(Dmax, np.nan), max_angle=np.full(len(plan.dims), np.nan),
               converged=bool(sub.converged), status=int(sub.status),
               finite=bool(sub.finite), num_matvecs=int(sub.num_matvecs),
               unique=unique_prefixes(sub.eigenvalues, sub.residual_norms, plan.dims,
                                      c.eigsh.rtol))
    if c.next_subspace and k + 2 <= plan.n:
        nxt = solve(k + 1, k_next)
        out.update(next=nxt, eigenvalues_next=np.asarray(nxt.eigenvalues),
                   converged=out["converged"] and bool(nxt.converged),
                   finite=out["finite"] and bool(nxt.finite),
                   num_matvecs=out["num_matvecs"] + int(nxt.num_matvecs),
                   status=int(worst(out["status"], nxt.status)))
        if out["finite"]:  # (NaN eigenvectors have no angle (NaN): the status says why)
            overlap, angles = jax.device_get(_overlap_and_angles(
                sub.eigenvectors, nxt.eigenvectors, tuple(int(d) for d in plan.dims)))
            # H^(k+1)'s values in the order of H^(k)'s vectors (the corollary)
            out["eigenvalues_matched"] = out["eigenvalues_next"][_match(np.abs(overlap))]
            out["max_angle"][:] = angles
    return out


@functools.partial(quick_jit, static_argnames="dims")  # (one small program per dims)
def _overlap_and_angles(U, V, dims: tuple):
    """``(U V^T, [max principal angle of the leading d rows of U and V for d in dims])``."""
    def top(B, d):
        return jax.tree.map(lambda x: x[:d], B)

    return _tree.basis_gram(U, V), jnp.stack([jnp.max(principal_angles(top(U, d), top(V, d)))
                                              for d in dims])


def _match(overlap: np.ndarray) -> np.ndarray:
    """``perm`` pairing each vector at ``k`` (row) with a distinct vector at ``k + 1``
    (column) so that the summed overlap ``sum_i |u_i . v_perm[i]|`` is largest (an optimal
    assignment): the spectral corollary's ``delta_i`` subtracts the eigenvalues of one
    eigenvector, not those of equal rank, which differ where two eigenvalues cross between
    ``k`` and ``k + 1``."""
    from scipy.optimize import linear_sum_assignment  # noqa: PLC0415 (scipy.optimize: 0.2 s)

    rows, cols = linear_sum_assignment(overlap, maximize=True)
    return cols[np.argsort(rows)]
