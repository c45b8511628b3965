"""Shared helpers of :mod:`curvlib.landscape`: the data convention and input checks.

Data convention (issue 4): ``loss_fn(params, batch)`` is the *mean* loss over
the leading axis of ``batch``; ``data`` is a pytree of arrays whose leading axis
is the sample order, and ``L_k(w) = loss_fn(w, data[:k])``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from curvlib import _tree
from curvlib.operators import microbatch_mean

PyTree = Any


def num_samples(data: PyTree) -> int:
    """Length of the shared leading (sample) axis of ``data``."""
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("`data` is an empty pytree; expected arrays with a leading sample axis.")
    shapes = [jnp.shape(x) for x in leaves]
    if any(len(s) == 0 for s in shapes):
        raise ValueError("every leaf of `data` needs a leading sample axis; got a scalar leaf.")
    n = shapes[0][0]
    if any(s[0] != n for s in shapes):
        raise ValueError(
            f"every leaf of `data` must share the leading sample axis; got lengths "
            f"{sorted({s[0] for s in shapes})}."
        )
    return int(n)


def take(data: PyTree, start: int, stop: int) -> PyTree:
    """``data[start:stop]`` along the sample axis (static bounds).

    A leaf whose sample axis is split over mesh axes of an explicit sharding
    type (``AxisType.Explicit``) stays split when ``stop - start`` is a multiple
    of the number of devices it is split over. Otherwise (JAX cannot slice a
    sharded axis into a length that does not split evenly) the smallest
    evenly-splitting window holding the samples is gathered, so the slice has
    its sample axis unsplit (each device then holds, and evaluates the loss on,
    all of its ``stop - start`` samples); its other axes keep their sharding.
    Values are those of the single-device slice.
    """
    return jax.tree.map(lambda x: _take_leaf(x, start, stop), data)


def _take_leaf(x, start: int, stop: int):
    s = _tree.explicit_sharding(x)
    spec = None if s is None else tuple(s.spec) + (None,) * (jnp.ndim(x) - len(s.spec))
    if spec is None or spec[0] is None:
        return x[start:stop]
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    shards = int(np.prod([s.mesh.shape[a] for a in names]))
    m, n = stop - start, jnp.shape(x)[0]
    if m % shards == 0:
        return jax.lax.slice_in_dim(x, start, stop)
    # an evenly splitting window [lo, lo + w) around the samples (w <= n: an
    # explicitly sharded axis splits evenly), gathered, then cut to length
    w = -(-m // shards) * shards
    lo = min(start, n - w)
    window = jax.lax.slice_in_dim(x, lo, lo + w)
    unsplit = NamedSharding(s.mesh, PartitionSpec(None, *spec[1:]))
    return jax.lax.slice_in_dim(jax.sharding.reshard(window, unsplit), start - lo, stop - lo)


def check_k(k, data: PyTree) -> int:
    """Validate ``1 <= k`` and ``k + 1 <= n``: both ``L_k`` and ``L_{k+1}`` must exist."""
    n = num_samples(data)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"`k` must be a Python int (a static sample count); got {k!r}.")
    k = int(k)
    if k < 1:
        raise ValueError(f"`k` must be >= 1 (L_k is a mean over the first k samples); got {k}.")
    if k + 1 > n:
        raise ValueError(
            f"`k + 1` = {k + 1} exceeds the number of samples in `data` ({n}); the increment "
            "L_{k+1} - L_k needs sample k+1."
        )
    return k


def check_dim(dim, params: PyTree, name: str = "dim") -> int:
    """Validate ``1 <= dim < N`` (N = parameter count)."""
    n = _tree.size(params)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"`{name}` must be a positive int; got {dim!r}.")
    if dim >= n:
        raise ValueError(
            f"`{name}` = {dim} must be smaller than the parameter count ({n}); with dim = N "
            "the full-space criterion `delta2_full_mc` is the same quantity."
        )
    return int(dim)


def check_microbatch(microbatch_size) -> int | None:
    if microbatch_size is None:
        return None
    if isinstance(microbatch_size, bool) or not isinstance(microbatch_size, (int, np.integer)):
        raise ValueError(
            f"`microbatch_size` must be a positive int or None; got {microbatch_size!r}."
        )
    if microbatch_size < 1:
        raise ValueError(f"`microbatch_size` must be >= 1; got {microbatch_size}.")
    return int(microbatch_size)


def check_num_samples(num_samples) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise ValueError(f"`num_samples` must be a positive int; got {num_samples!r}.")
    if num_samples < 2:
        raise ValueError(
            f"`num_samples` must be >= 2 (a standard error needs two draws); got {num_samples}."
        )
    return int(num_samples)


def check_sigma(sigma, dtype=None) -> jax.Array:
    """``sigma`` as an array (scalar or 1-D grid); concrete values must be finite and > 0."""
    s = jnp.asarray(sigma) if dtype is None else jnp.asarray(sigma, dtype)
    if not jnp.issubdtype(s.dtype, jnp.floating):
        s = s.astype(jnp.result_type(float))
    if s.ndim > 1:
        raise ValueError(f"`sigma` must be a scalar or a 1-D grid; got shape {s.shape}.")
    if not isinstance(s, jax.core.Tracer):
        v = np.asarray(s)
        if v.size == 0:
            raise ValueError("`sigma` is empty.")
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(
                f"`sigma` (the probe's per-coordinate standard deviation) must be finite and "
                f"> 0; got {v.tolist()}."
            )
    return s


def check_key(key) -> jax.Array:
    if key is None:
        raise ValueError("`key` is required (an explicit PRNG key; there is no default key).")
    return key


def normal_like(key: jax.Array, like: PyTree) -> PyTree:
    """Standard normal pytree shaped like ``like`` from *one* draw of ``N`` numbers.

    Same distribution as :func:`curvlib._tree.normal_like` (independent entries),
    but a single random-bits call site instead of one per leaf: for a model with
    tens of leaves this keeps XLA compile time of the enclosing program low.

    A leaf of ``like`` with an explicit sharding type (a mesh with
    ``AxisType.Explicit`` axes) gets its part resharded to that type, so the
    vector can be a tangent of such parameters. The numbers are the same on
    every layout (a key gives the single-device draw); the price is that the
    ``N`` numbers are drawn unsplit (replicated) before each device keeps its
    shard.
    """
    leaves, treedef = jax.tree.flatten(like)
    dt = _tree.dtype(like)
    sizes = [int(np.prod(jnp.shape(x), dtype=np.int64)) for x in leaves]
    flat = jax.random.normal(key, (sum(sizes),), dt)
    parts = jnp.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [flat]
    out = [
        _typed_like(p.reshape(jnp.shape(x)).astype(jnp.result_type(x)), x)
        for p, x in zip(parts, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _typed_like(y: jax.Array, x) -> jax.Array:
    """``y`` resharded to ``x``'s explicit sharding type, if ``x`` has one."""
    s = _tree.explicit_sharding(x)
    return y if s is None else jax.sharding.reshard(y, s)


def mean_loss(loss_fn: Callable, params: PyTree, batch: PyTree, microbatch_size) -> jax.Array:
    """``loss_fn(params, batch)``, accumulated over microbatches when asked."""
    return microbatch_mean(lambda b: loss_fn(params, b), batch, microbatch_size)


def increment(
    loss_fn: Callable, params: PyTree, data: PyTree, k: int, microbatch_size
) -> jax.Array:
    """``L_{k+1}(w) - L_k(w)`` through the identity ``(l_{k+1}(w) - L_k(w)) / (k + 1)``.

    For a mean loss the identity is exact; it costs ``k + 1`` per-sample
    evaluations instead of ``2k + 1`` and never subtracts two nearly equal means.
    """
    Lk = mean_loss(loss_fn, params, take(data, 0, k), microbatch_size)
    l1 = loss_fn(params, take(data, k, k + 1))
    return (l1 - Lk) / (k + 1)
