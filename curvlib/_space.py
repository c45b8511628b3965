"""How a Krylov algorithm stores vectors: one flat array, per-leaf rows, or the pytree itself.

Semantics never depend on the layout; compile time and memory traffic do.

* ``"concat"``: every leaf ravelled and concatenated into one 1-D array, so a
  basis is one ``(m, N)`` array and each step is a handful of dense
  operations, whatever the number of leaves. XLA compiles such a program
  several times faster than one with per-leaf operations (a model with tens of
  leaves has tens of copies of every basis operation), and its in-place row
  updates stay in place. The price is one gather/scatter copy of ``N``
  numbers around each product. Chosen when all leaves share a dtype and live
  on one device (or are replicated).
* ``"leaves"``: each leaf reshaped to 1-D, leaves kept apart (mixed dtypes on
  one device). A basis leaf ``(m, *shape)`` of a multi-dimensional parameter
  would make XLA:CPU copy the whole basis around every in-place row update.
* ``"identity"``: leaves keep their shapes: parameters sharded over several
  devices (a ravel would gather them) or typed with explicit shardings.

The choice is made from where the arrays live (`choose_layout`) when
they are concrete; inside the user's own ``jit`` (tracers carry no placement
unless their sharding is explicit) it is made from the process's device count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _tree, _validate
from curvlib._compile import eager_jit
from curvlib._xp import iota, xp

PyTree = Any

LAYOUTS = ("concat", "leaves", "identity")


def _on_one_device(x) -> bool | None:
    """Whether a concrete array is on one device (or replicated); ``None`` if traced."""
    if isinstance(x, jax.core.Tracer):
        return None
    s = getattr(x, "sharding", None)
    if s is None:  # NumPy arrays, Python scalars
        return True
    return len(s.device_set) == 1 or s.is_fully_replicated


def on_one_device(*trees) -> bool:
    """Whether every leaf is concrete and on one single device (or a NumPy/Python value).

    The condition for an eager answer computed on the host and put back with ``device_put``:
    a replicated or multi-process array must keep its placement, so it takes the program.
    """
    for x in jax.tree.leaves(trees):
        if isinstance(x, jax.core.Tracer):
            return False
        s = getattr(x, "sharding", None)
        if s is not None and len(s.device_set) != 1:
            return False
    return True


def choose_layout(v: PyTree) -> str:
    """The storage layout for vectors shaped like ``v`` (see the module docstring)."""
    leaves = jax.tree.leaves(v)
    if any(_tree.explicit_sharding(x) is not None for x in leaves):
        return "identity"
    where = [_on_one_device(x) for x in leaves]
    if any(w is False for w in where):
        return "identity"
    if any(w is None for w in where) and jax.device_count() > 1:
        return "identity"
    if len(leaves) == 1 and jnp.ndim(leaves[0]) <= 1:
        return "identity"
    if len({jnp.result_type(x) for x in leaves}) == 1:
        return "concat"
    return "leaves"


class Space:
    """Conversions between user pytrees and the internal layout (static shapes only)."""

    def __init__(self, like: PyTree, layout: str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}")
        self.like = like
        leaves, self.treedef = jax.tree.flatten(like)
        self.shapes = [tuple(jnp.shape(x)) for x in leaves]
        self.dtypes = [jnp.result_type(x) for x in leaves]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.layout = layout
        self.dim = int(sum(self.sizes))

    # ---------------------------------------------------------------- vectors

    def flatten(self, v: PyTree):
        if self.layout == "identity":
            return v
        parts = [xp.reshape(x, (-1,)) for x in self.treedef.flatten_up_to(v)]
        if self.layout == "leaves":
            return jax.tree.unflatten(self.treedef, parts)
        if len(parts) == 1:
            return parts[0].astype(self.dtypes[0])
        return xp.concatenate([p.astype(self.dtypes[0]) for p in parts])

    def unflatten(self, x) -> PyTree:
        return self._unflatten(x, batched=False)

    def _unflatten(self, x, batched: bool) -> PyTree:
        """``x`` in the user's leaf shapes: one vector, or with ``batched`` a basis.

        A basis keeps its leading axis ``m`` and its dtype; a vector in the
        ``concat`` layout is cast back to each leaf's dtype.
        """
        if self.layout == "identity":
            return x
        k = int(batched)  # leading axes kept: 0 for a vector, 1 (``m``) for a basis
        if self.layout == "leaves":
            parts = self.treedef.flatten_up_to(x)
            return jax.tree.unflatten(
                self.treedef,
                [xp.reshape(p, xp.shape(p)[:k] + s)
                 for p, s in zip(parts, self.shapes, strict=True)],
            )
        return jax.tree.unflatten(
            self.treedef, self._split(x, axis=k, lead=xp.shape(x)[:k], cast=not batched))

    def _split(self, x, axis, lead, cast=True):
        out, start = [], 0
        for size, shape, dt in zip(self.sizes, self.shapes, self.dtypes, strict=True):
            part = x[(slice(None),) * axis + (slice(start, start + size),)]
            part = xp.reshape(part, lead + shape)
            out.append(part.astype(dt) if cast else part)
            start += size
        return out

    def normal(self, key):
        """A standard normal vector in the internal layout, from one draw of ``N`` numbers.

        One random-bits call site whatever the number of leaves (each would
        otherwise lower to its own copy of the generator).
        """
        if self.layout == "identity":  # keeps explicit sharding types
            return _tree.normal_like(key, self.like)
        dt = jnp.promote_types(self.dtypes[0], jnp.float32) if self.layout == "concat" else (
            jnp.result_type(*self.dtypes))
        flat = jax.random.normal(key, (self.dim,), dt)
        if self.layout == "concat":
            return flat.astype(self.dtypes[0])
        parts = jnp.split(flat, np.cumsum(self.sizes)[:-1]) if len(self.sizes) > 1 else [flat]
        return jax.tree.unflatten(self.treedef, [p.astype(d) for p, d in zip(parts, self.dtypes,
                                                                          strict=True)])

    def gaussian(self, seed, counter):
        """A standard normal vector in the internal layout, a pure function of ``(seed, counter)``.

        Counter-based: every entry is Box-Muller on two 24-bit uniforms from a
        murmur3-style hash of (entry index, ``seed``, ``counter``), all traced
        ``uint32`` scalars. It is elementwise, so it keeps every layout and
        sharding, compiles to one small fusion (a counter-based generator such
        as threefry lowers to dozens), and costs nothing but the draw when it
        is not used. The statistical quality is that of the hash: ample for
        Krylov start vectors, not meant for cryptography or Monte Carlo. The
        entries have float32 precision (in any vector dtype).
        """
        seed = xp.asarray(seed, xp.uint32)
        counter = xp.asarray(counter, xp.uint32)
        # log and cos in float64 where JAX has it, rounded to float32: XLA's and NumPy's
        # float64 functions agree to an ulp, so the float32 draws are the same bits on
        # every engine (`curvlib._xp`), but for a double rounding once in 2^29 entries
        wide = xp.float64 if jax.config.jax_enable_x64 else xp.float32
        offsets = np.cumsum([0] + self.sizes[:-1]).tolist()

        def draw(x, offset):
            shape = xp.shape(x)
            idx = xp.zeros(shape, xp.uint32)
            for ax in range(len(shape)):
                idx = idx * xp.uint32(shape[ax]) + iota(xp.uint32, shape, ax)
            idx = idx + xp.uint32(offset)
            u1 = _uniform(idx, seed, counter, xp.uint32(0x68E31DA4)).astype(wide)
            u2 = _uniform(idx, seed, counter, xp.uint32(0xB5297A4D)).astype(wide)
            r = xp.sqrt(-2.0 * xp.log(u1)).astype(xp.float32)
            c = xp.cos(2.0 * np.pi * u2).astype(xp.float32)
            out = (r * c).astype(xp.result_type(x))
            # iota is replicated: on an Explicit mesh the draw takes the leaf's sharding type
            s = _tree.explicit_sharding(x)
            return out if s is None else _tree._like(out, s, out.ndim)

        if self.layout == "identity":
            leaves = self.treedef.flatten_up_to(self.like)
            return jax.tree.unflatten(
                self.treedef, [draw(x, o) for x, o in zip(leaves, offsets, strict=True)])
        if self.layout == "concat":
            return draw(xp.zeros((self.dim,), self.dtypes[0]), 0)
        return jax.tree.unflatten(self.treedef, [
            draw(xp.zeros((n,), d), o)
            for n, d, o in zip(self.sizes, self.dtypes, offsets, strict=True)
        ])

    # ----------------------------------------------------------------- bases

    def unflatten_basis(self, Q) -> PyTree:
        """A basis (leading axis ``m``) back in the user's leaf shapes (dtype kept)."""
        return self._unflatten(Q, batched=True)

    def flatten_basis(self, U: PyTree):
        """A user basis (leading axis) in the internal layout."""
        if self.layout == "identity":
            return U
        parts = [xp.reshape(x, (x.shape[0], -1)) for x in self.treedef.flatten_up_to(U)]
        if self.layout == "leaves":
            return jax.tree.unflatten(self.treedef, parts)
        if len(parts) == 1:
            return parts[0].astype(self.dtypes[0])
        return xp.concatenate([p.astype(self.dtypes[0]) for p in parts], axis=1)

    # -------------------------------------------------------------- operators

    def wrap(self, matvec: Callable) -> Callable:
        """``matvec`` acting on internal vectors (cast back to the vector dtypes)."""
        if self.layout == "identity":
            def op(v):
                w = matvec(v)
                return jax.tree.map(lambda a, b: jnp.asarray(a).astype(jnp.result_type(b)), w, v)
            return op
        return lambda x: self.flatten(matvec(self.unflatten(x)))


def _mix(h):
    """murmur3's 32-bit finaliser: a bijection that avalanches every input bit."""
    h = h ^ (h >> xp.uint32(16))
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> xp.uint32(13))
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> xp.uint32(16))


def _uniform(idx, seed, counter, salt):
    """A uniform in ``(0, 1]`` from 24 hashed bits of (index, seed, counter, salt)."""
    h = _mix(idx * xp.uint32(0x9E3779B9) + _mix(seed ^ salt))
    h = _mix(h ^ (counter * xp.uint32(0x27D4EB2F) + salt))
    return ((h >> xp.uint32(8)).astype(xp.float32) + 1.0) * (1.0 / 16777216.0)


def seed(v0, key):
    """The ``uint32`` seed of an algorithm's random directions: from ``key``, else from ``v0``."""
    return seed_from_vector(v0) if key is None else seed_from_key(key)


def seed_from_key(key):
    """A ``uint32`` seed from a PRNG key (typed or raw ``uint32`` data)."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    data = jnp.ravel(jnp.asarray(data, jnp.uint32))
    return _mix(data[0] ^ _mix(data[-1] + jnp.uint32(0x632BE59B)))


def seed_from_vector(v):
    """A ``uint32`` seed from a vector's values (deterministic default when no key is given)."""
    # only determinism matters here, not accuracy: the plain norm (inf or 0 at extreme
    # scales is still a deterministic seed) keeps the scale-safe rescue out of the program.
    # Its last 12 bits dropped: the user's jit and an eager call sum in different orders,
    # and a last-bit difference gave other draws (and other product counts) to the same v0
    bits = jax.lax.bitcast_convert_type(_tree.plain_norm(v).astype(jnp.float32), jnp.uint32)
    return _mix(bits >> jnp.uint32(12))


# ------------------------------------------------------------- products

@eager_jit
def flat_product(matvec, like, x):
    """``matvec`` on ``x``, ``like`` ravelled (``concat``): one program per operator program
    and size, shared by every eager caller (the answer-now solvers, the landscape)."""
    space = Space(like, "concat")
    out = matvec(space.unflatten(x))
    _validate.same_structure(like, out, "v0", "matvec(v0)", floating=True)  # (at the trace only)
    return space.flatten(out)


@eager_jit
def flat_products(matvec, like, X):
    """``matvec`` applied to every row of ``X`` (rows: ``like`` ravelled), one ``vmap``."""
    space = Space(like, "concat")
    return jax.vmap(lambda x: space.flatten(matvec(space.unflatten(x))))(X)
