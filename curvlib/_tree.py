"""Pytree vector algebra used by every layer of curvlib.

Vectors are pytrees of arrays; a *basis* (a stack of vectors) is a pytree whose
leaves carry one extra leading axis ``(m, ...)``. Everything here is plain
``jax.tree.map`` / ``tensordot`` work, so sharded leaves stay sharded: nothing
is ever ravelled into one flat array.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


# ----------------------------------------------------------------- validation


def check_same_structure(a: PyTree, b: PyTree, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` naming both arguments unless trees and shapes match."""
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    if ta != tb:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same pytree structure; got "
            f"{name_a}: {ta} and {name_b}: {tb}."
        )
    for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"`{name_a}` and `{name_b}` must have matching leaf shapes; leaf {i} "
                f"has shape {jnp.shape(x)} in {name_a} and {jnp.shape(y)} in {name_b}."
            )


def check_matvec(matvec, v: PyTree, name: str) -> None:
    """Raise ``ValueError`` unless ``matvec(v)`` has ``v``'s structure and leaf shapes.

    Uses ``jax.eval_shape``: one abstract trace of ``matvec``, no computation.
    """
    out = jax.eval_shape(matvec, v)
    check_same_structure(v, out, name, "matvec(" + name + ")")


def check_float_tree(tree: PyTree, name: str) -> None:
    """Raise ``TypeError`` unless every leaf is a real floating array and the tree is non-empty."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"`{name}` is an empty pytree; expected at least one array leaf.")
    for i, x in enumerate(leaves):
        dt = jnp.result_type(x)
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(
                f"`{name}` must have real floating-point leaves; leaf {i} has dtype {dt}."
            )


def size(tree: PyTree) -> int:
    """Total number of scalar entries (static)."""
    return int(sum(np.prod(jnp.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))


def dtype(tree: PyTree):
    """The promoted dtype of all leaves."""
    return jnp.result_type(*jax.tree.leaves(tree))


# ------------------------------------------------------------- vector algebra


def acc_dtype(*dts):
    """The accumulation dtype for inner products: the promoted dtype, at least float32.

    Half-precision leaves (bfloat16, float16) are *stored* as they are but their
    inner products, norms and projections accumulate in float32.
    """
    return jnp.promote_types(jnp.result_type(*dts), jnp.float32)


def vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Real inner product ``<a, b>`` summed over all leaves.

    Accumulates in :func:`acc_dtype` of the leaves (float32 for bfloat16 leaves).
    """
    parts = [
        jnp.vdot(x, y, preferred_element_type=acc_dtype(x, y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(parts[1:], parts[0])


def norm(a: PyTree) -> jax.Array:
    return jnp.sqrt(vdot(a, a))


def add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, a, b)


def scale(s, a: PyTree) -> PyTree:
    return jax.tree.map(lambda x: (s * x).astype(x.dtype), a)


def add_scale(a: PyTree, s, b: PyTree) -> PyTree:
    """``a + s * b``."""
    return jax.tree.map(lambda x, y: (x + s * y).astype(x.dtype), a, b)


def zeros_like(a: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, a)


def where(c, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def astype(a: PyTree, dt) -> PyTree:
    return jax.tree.map(lambda x: x.astype(dt), a)


def all_finite(a: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(a)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def normal_like(key: jax.Array, a: PyTree, dt=None) -> PyTree:
    """Standard normal pytree shaped like ``a`` (one independent key per leaf)."""
    leaves, treedef = jax.tree.flatten(a)
    keys = jax.random.split(key, len(leaves))
    out = [
        jax.random.normal(k, jnp.shape(x), dt or jnp.result_type(x))
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def rademacher_like(key: jax.Array, a: PyTree, dt=None) -> PyTree:
    """Rademacher (+-1) pytree shaped like ``a``."""
    leaves, treedef = jax.tree.flatten(a)
    keys = jax.random.split(key, len(leaves))
    out = [
        jax.random.rademacher(k, jnp.shape(x), dt or jnp.result_type(x))
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------- basis (leading m)


def basis_zeros(a: PyTree, m: int, dt=None) -> PyTree:
    """A basis of ``m`` zero vectors shaped like ``a``."""
    return jax.tree.map(lambda x: jnp.zeros((m,) + jnp.shape(x), dt or x.dtype), a)


def basis_get(Q: PyTree, i) -> PyTree:
    return jax.tree.map(lambda q: q[i], Q)


def basis_set(Q: PyTree, i, v: PyTree) -> PyTree:
    return jax.tree.map(lambda q, x: q.at[i].set(x.astype(q.dtype)), Q, v)


def basis_project(Q: PyTree, v: PyTree, acc_dtype=None) -> jax.Array:
    """Coefficients ``Q v`` (shape ``(m,)``): one matrix-vector product per leaf."""
    parts = []
    for q, x in zip(jax.tree.leaves(Q), jax.tree.leaves(v), strict=True):
        q2 = q.reshape(q.shape[0], -1)
        x1 = x.reshape(-1)
        dt = acc_dtype or jnp.result_type(q2, x1)
        parts.append(
            jnp.dot(q2, x1.astype(q2.dtype), preferred_element_type=dt)
        )
    return sum(parts[1:], parts[0])


def basis_combine(Q: PyTree, c: jax.Array, like: PyTree | None = None) -> PyTree:
    """``Q^T c``: the combination ``sum_i c_i q_i`` as a vector pytree."""
    def comb(q):
        out = jnp.tensordot(c.astype(q.dtype), q, axes=1)
        return out
    out = jax.tree.map(comb, Q)
    if like is not None:
        out = jax.tree.map(lambda o, x: o.astype(jnp.result_type(x)), out, like)
    return out


def basis_matmul(C: jax.Array, Q: PyTree) -> PyTree:
    """``C Q``: a new basis whose rows are combinations of ``Q``'s rows."""
    return jax.tree.map(lambda q: jnp.tensordot(C.astype(q.dtype), q, axes=1), Q)


def basis_gram(P: PyTree, Q: PyTree, acc_dtype=None) -> jax.Array:
    """Gram matrix ``P Q^T`` of two bases (shape ``(p, q)``)."""
    parts = []
    for a, b in zip(jax.tree.leaves(P), jax.tree.leaves(Q), strict=True):
        a2 = a.reshape(a.shape[0], -1)
        b2 = b.reshape(b.shape[0], -1)
        dt = acc_dtype or jnp.result_type(a2, b2)
        parts.append(jnp.dot(a2, b2.T, preferred_element_type=dt))
    return sum(parts[1:], parts[0])


def basis_size(Q: PyTree) -> int:
    return int(jax.tree.leaves(Q)[0].shape[0])
