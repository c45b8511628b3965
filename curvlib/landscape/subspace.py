"""The curvature-aligned subspace: top-``D`` eigenpairs of ``H^(k)`` and their overlap across k."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from curvlib import _tree
from curvlib.krylov.eigen import EigshResult, eigsh
from curvlib.landscape import _common
from curvlib.operators import hessian_matvec

PyTree = Any


@functools.partial(
    jax.jit,
    static_argnames=(
        "loss_fn", "k", "dim", "microbatch_size", "mode", "num_matvecs", "tol", "max_restarts",
        "flatten",
    ),
)
def _subspace(loss_fn, params, data, k, dim, key, microbatch_size, mode, num_matvecs, tol,
              max_restarts, flatten):
    batch = _common.take(data, 0, k)
    if not flatten:
        matvec = hessian_matvec(loss_fn, params, batch, mode=mode, microbatch_size=microbatch_size)
        v0 = _common.normal_like(key, params)
        return eigsh(matvec, v0, dim, which="LA", num_matvecs=num_matvecs, tol=tol,
                     max_restarts=max_restarts)
    flat, unravel = ravel_pytree(params)
    flat_loss = _flat_loss(loss_fn, unravel)
    matvec = hessian_matvec(flat_loss, flat, batch, mode=mode, microbatch_size=microbatch_size)
    v0 = jax.random.normal(key, flat.shape, flat.dtype)
    res = eigsh(matvec, v0, dim, which="LA", num_matvecs=num_matvecs, tol=tol,
                max_restarts=max_restarts)
    return res._replace(eigenvectors=jax.vmap(unravel)(res.eigenvectors))


def _flat_loss(loss_fn, unravel):
    return lambda theta, batch: loss_fn(unravel(theta), batch)


def curvature_subspace(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    k: int,
    dim: int,
    *,
    key: jax.Array,
    microbatch_size: int | None = None,
    mode: str | None = None,
    num_matvecs: int | None = None,
    tol: float | None = None,
    max_restarts: int = 200,
    flatten: bool = False,
) -> EigshResult:
    """Top-``dim`` eigenpairs of ``H^(k)(params)``, the Hessian of ``L_k = loss_fn(., data[:k])``.

    Thick-restart Lanczos (:func:`curvlib.eigsh`, ``which="LA"``) on Hessian-vector
    products over the full first-``k`` samples, microbatched when asked: the
    eigenvalues are *signed* and ordered algebraically, largest first, and the
    eigenvectors orthonormal (a pytree shaped like ``params`` with a leading axis
    ``dim``). This is the ``U_D`` of ``Delta_2^(D)``; nested subspaces are its
    prefixes. The reference implementation's deflated power iteration estimates
    ``||H v||`` (sign-blind, largest magnitude) with 20-30 products per vector; a
    Krylov basis of ``~2 dim + 1`` vectors serves all ``dim`` at once.

    One compiled program (the whole restart loop is a ``lax.while_loop``).
    Cost: ``num_matvecs + restarts * (num_matvecs - num_keep)`` products; memory
    ``num_matvecs + 2`` parameter-sized vectors.

    Args:
      loss_fn: ``loss_fn(params, batch)``, the mean loss over the batch's leading axis.
      params: the point ``w*`` (any pytree of float arrays).
      data: ordered samples; the Hessian uses ``data[:k]``.
      k: ``1 <= k`` and ``k + 1 <= n`` (the subspace is always built for an increment).
      dim: number of eigenpairs ``D``, ``1 <= D < N``.
      key: PRNG key for Lanczos' start vector.
      microbatch_size: chunk size for the Hessian products over ``k`` samples.
      mode: Hessian product mode (see :func:`curvlib.hessian_matvec`).
      num_matvecs: Lanczos basis size (default ``max(2 dim + 1, 20)`` capped at ``N``).
      tol: relative residual tolerance (default ``sqrt(eps)``).
      max_restarts: cap on thick restarts.
      flatten: run the eigensolver on the ravelled parameter vector (the
        eigenvectors are returned as a pytree all the same). The Krylov vector
        algebra is per leaf, and XLA's compile time grows with the number of
        leaves: for a small, unsharded model with tens of leaves ``True``
        compiles about ten times faster. Leave ``False`` for sharded or large
        models (ravelling gathers and copies every parameter); parameters
        with explicit sharding types (a mesh with ``AxisType.Explicit`` axes)
        cannot be ravelled at all.

    Returns:
      :class:`curvlib.EigshResult`; check ``converged``.

    Raises:
      ValueError: ``k < 1``, ``k + 1 > n``, ``dim >= N``, a missing key, or
        ``flatten=True`` with explicitly sharded ``params``.
    """
    k = _common.check_k(k, data)
    _tree.check_float_tree(params, "params")
    if flatten:
        for i, x in enumerate(jax.tree.leaves(params)):
            if _tree.explicit_sharding(x) is not None:
                raise ValueError(
                    "`flatten=True` ravels `params` into one vector, which JAX rejects for "
                    "explicit sharding types (a reshape merging sharded axes); leaf "
                    f"{i} of `params` is typed {jax.typeof(x).str_short()}. Use the default "
                    "`flatten=False` on a mesh with AxisType.Explicit axes."
                )
    dim = _common.check_dim(dim, params)
    _common.check_key(key)
    mb = _common.check_microbatch(microbatch_size)
    return _subspace(loss_fn, params, data, k, dim, key, mb, mode, num_matvecs, tol,
                     int(max_restarts), bool(flatten))


def principal_angles(U: PyTree, V: PyTree) -> jax.Array:
    """Principal angles (radians, ascending) between ``span(U)`` and ``span(V)``.

    ``U`` and ``V`` are orthonormal bases (pytrees with leading axes ``p`` and
    ``q``); the cosines are the singular values of the Gram matrix ``U V^T``
    (Björck & Golub 1973). ``min(p, q)`` angles; 0 means a shared direction and
    ``pi/2`` an orthogonal one.

    Examples:
      >>> import jax.numpy as jnp
      >>> U = jnp.eye(3)[:2]; V = jnp.eye(3)[1:]
      >>> [round(float(t), 4) for t in principal_angles(U, V)]
      [0.0, 1.5708]
    """
    G = _tree.basis_gram(U, V)
    s = jnp.linalg.svd(G, compute_uv=False)
    return jnp.sort(jnp.arccos(jnp.clip(s, -1.0, 1.0)))
