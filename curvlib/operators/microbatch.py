"""Microbatching: means over chunks of a batch, and which arguments of a loss are batched.

Every operator of [`curvlib.operators`][curvlib.operators] that takes ``microbatch_size``
chunks its *batched* arguments along their leading (sample) axis and passes the
others whole to every chunk. By default every extra argument is batched (a loss
``loss(params, x, y)`` is chunked in ``x`` and ``y`` together); ``batch_argnums``
names the batched ones when some are not (a PRNG key, a temperature, a lookup
table). Each batched leaf must have the same leading axis length; a leaf that
does not is reported by its pytree path (``args[2]``, ``args[0]['mask']``) with
the ``batch_argnums`` that would fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _tree
from curvlib._compile import run_program, traced_program, tracing, weak_cache

PyTree = Any


def batch_size(tree: PyTree, name: str) -> int:
    """The shared leading (sample) axis length of every leaf of ``tree``.

    Raises:
      ValueError: for an empty tree, a sample axis of length 0, or a leaf without that
        leading axis (named by path).
    """
    leaves = _tree.leaves_with_paths(tree)
    if not leaves:
        raise ValueError(
            f"`{name}` is an empty pytree; expected arrays with a leading sample axis."
        )
    first_path, first = leaves[0]
    n = _tree.leading_axis(first)
    if n is None:
        raise ValueError(
            f"every leaf of `{name}` needs a leading sample axis; `{name}{first_path}` has "
            f"{_tree.describe_shape(first)}."
        )
    for path, x in leaves[1:]:
        if _tree.leading_axis(x) != n:
            raise ValueError(
                f"every leaf of `{name}` must share the leading sample axis; "
                f"`{name}{first_path}` has length {n} but `{name}{path}` has "
                f"{_tree.describe_shape(x)}."
            )
    if n == 0:  # a mean over no samples: NaN, or zero products with no flag
        raise ValueError(f"`{name}` is empty: its leading sample axis has length 0.")
    return int(n)


def microbatch_mean(fn: Callable, batch: PyTree, microbatch_size: int | None) -> PyTree:
    """Mean of ``fn`` over microbatches of ``batch``, weighted by their sizes.

    For ``fn(b)`` that is itself a mean over the leading axis of ``b`` (a mean
    loss, its gradient, a curvature product), the result equals ``fn(batch)``
    while peak memory is that of one microbatch: full chunks run under
    ``lax.scan``; a shorter final chunk, if any, runs once more with its own
    weight.

    Args:
      fn: ``fn(chunk) -> pytree`` of float arrays.
      batch: pytree whose leaves share a leading (sample) axis of length ``n``.
      microbatch_size: samples per chunk; ``None`` or ``>= n`` calls ``fn(batch)``.

    Returns:
      ``sum_c (n_c / n) fn(chunk_c)``.

    Raises:
      ValueError: for an empty ``batch``, leaves without a shared leading axis
        (named by their pytree path), or ``microbatch_size < 1``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib import microbatch_mean
      >>> x = jnp.arange(10.0)  # chunks of 4, 4 and a remainder of 2
      >>> float(microbatch_mean(jnp.mean, x, 4)), float(jnp.mean(x))
      (4.5, 4.5)
    """
    n = batch_size(batch, "batch")
    if microbatch_size is not None:
        if isinstance(microbatch_size, bool) or not isinstance(
            microbatch_size, (int, np.integer)
        ):
            raise ValueError(f"`microbatch_size` must be an int or None; got {microbatch_size!r}.")
        microbatch_size = int(microbatch_size)
        if microbatch_size < 1:
            raise ValueError(f"`microbatch_size` must be >= 1; got {microbatch_size}.")
    if microbatch_size is None or microbatch_size >= n:
        return fn(batch)
    if not tracing(batch):
        # eager: the scan compiled once per computation (``fn``'s program, the arrays it
        # closes over its inputs), not once per call for a fresh closure
        # (a concrete batch's placement decides the chunks: the trace does not carry it)
        batch = gathered_for_chunks(batch, microbatch_size)
        strided = _strided(batch, n // microbatch_size, microbatch_size)
        program = traced_program(
            lambda b: _chunked_mean(fn, b, n, microbatch_size, strided), batch)
        return run_program(program, batch)
    return _chunked_mean(fn, batch, n, microbatch_size)


def _chunked_mean(fn: Callable, batch: PyTree, n: int, microbatch_size: int,
                  strided: bool = False) -> PyTree:
    """`microbatch_mean` on checked arguments, ``1 <= microbatch_size < n``; ``strided``:
    `_strided` held for the concrete batch this one was traced from."""
    num_full = n // microbatch_size
    rem = n - num_full * microbatch_size
    strided = strided or _strided(batch, num_full, microbatch_size)
    head = jax.tree.map(lambda x: _chunks(x, num_full, microbatch_size, strided), batch)
    out_shape = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], head))
    # accumulate half-precision outputs in float32 (many bfloat16 partial sums lose digits)
    acc_dt = lambda dt: _tree.acc_dtype(dt) if jnp.issubdtype(dt, jnp.floating) else dt
    init = jax.tree.map(lambda s: _tree.zeros_typed(s, acc_dt(s.dtype)), out_shape)

    def body(acc, chunk):
        return jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc, fn(chunk)), None

    total, _ = jax.lax.scan(body, init, head)
    out = jax.tree.map(lambda t: t * (microbatch_size / n), total)
    if rem:
        tail = jax.tree.map(lambda x: x[num_full * microbatch_size :], batch)
        out = jax.tree.map(lambda o, t: o + t.astype(o.dtype) * (rem / n), out, fn(tail))
    return jax.tree.map(lambda o, s: o.astype(s.dtype), out, out_shape)


def _strided(batch: PyTree, num_full: int, size: int) -> bool:
    """Whether the chunks of ``batch`` are taken strided (`_chunks`): some leaf's sample axis
    is split over several devices, by an explicit sharding type or, for a concrete array,
    on an ``Auto`` mesh into shards that the chunks split evenly (no remainder).

    One answer for the whole batch: chunk ``c`` must hold the same samples in every leaf
    (inputs and their labels; a replicated leaf beside a split one).
    """
    for x in jax.tree.leaves(batch):
        s = _tree.explicit_sharding(x)
        if s is not None:
            if tuple(s.spec) and s.spec[0] is not None:
                return True
            continue
        shards = _auto_shards(x)
        if shards > 1 and x.shape[0] == num_full * size and size % shards == 0:
            return True
    return False


def _auto_shards(x) -> int:
    """Into how many shards a concrete leaf's sample axis is split by a ``NamedSharding``
    (an ``Auto`` mesh; 1 for a tracer, an unsplit axis or another kind of placement)."""
    s = None if isinstance(x, jax.core.Tracer) else getattr(x, "sharding", None)
    if not isinstance(s, jax.sharding.NamedSharding) or not tuple(s.spec) or s.spec[0] is None:
        return 1
    names = s.spec[0] if isinstance(s.spec[0], tuple) else (s.spec[0],)
    return int(np.prod([s.mesh.shape[a] for a in names]))


def gathered_for_chunks(batch: PyTree, size: int) -> PyTree:
    """``batch`` with each concrete leaf whose sample axis an ``Auto`` mesh splits over
    several devices into shards that chunks of ``size`` do not split evenly (`_strided`'s
    other case) placed replicated on that mesh first.

    Contiguous chunks of such a leaf straddle devices, and XLA gathers the batch onto every
    device anyway (see `_chunks`); done by XLA, the slice and reshape of the split axis were
    miscompiled under differentiation (jaxlib 0.10.2, XLA:CPU): 8 examples over 4 devices in
    chunks of 3, a loss picking each label's log-probability, gave a Hessian product 16%
    off, a gradient and a GGN product 40% off, with no error. Gathered here, they are exact.
    """
    def place(x):
        if _tree.explicit_sharding(x) is not None or x.shape[0] <= size:
            return x
        shards = _auto_shards(x)
        if shards == 1 or (x.shape[0] % size == 0 and size % shards == 0):
            return x
        replicated = jax.sharding.PartitionSpec()
        return jax.device_put(x, jax.sharding.NamedSharding(x.sharding.mesh, replicated))

    return jax.tree.map(place, batch)


def gathered_args(args: tuple, argnums, size: int) -> tuple:
    """`gathered_for_chunks` of the batched arguments ``args[i]``, ``i in argnums``."""
    return tuple(gathered_for_chunks(a, size) if i in argnums else a
                 for i, a in enumerate(args))


def _chunks(x, num_full: int, size: int, strided: bool = False):
    """``x[:num_full * size]`` as chunks of ``size`` samples, shape ``(num_full, size, ...)``.

    Contiguous chunks, except when ``strided`` (`_strided`: some leaf of the batch has
    its sample axis split over several devices): there a contiguous chunk would straddle
    devices (a reshape explicit sharding types reject; on an ``Auto`` mesh XLA
    all-gathered the batch onto every device and evaluated each chunk on a few of them,
    repeated on the others), so the chunks are taken *strided* (chunk ``c`` holds samples
    ``c, c + num_full, c + 2 num_full, ...``) in every leaf alike. Each chunk is then split
    over the same devices as the batch and no data moves; the mean over chunks is
    unchanged.
    """
    s = _tree.explicit_sharding(x)
    spec = None if s is None else tuple(s.spec) + (None,) * (x.ndim - len(s.spec))
    if spec is None or spec[0] is None:
        if strided:  # (a leaf not split, beside one that is: the same samples per chunk)
            head = x[: num_full * size]
            return jnp.swapaxes(jnp.reshape(head, (size, num_full) + x.shape[1:]), 0, 1)
        return x[: num_full * size].reshape((num_full, size) + x.shape[1:])
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    shards = int(np.prod([s.mesh.shape[a] for a in names]))
    n = x.shape[0]
    if n != num_full * size or size % shards:
        raise ValueError(
            f"the batch's sample axis (length {n}) is explicitly sharded over {shards} devices "
            f"(mesh axes {names}); `microbatch_size` must then divide it and be a multiple of "
            f"{shards}; got {size}. (JAX's explicit sharding cannot slice a sharded axis into "
            "pieces that do not split evenly over its devices.)"
        )
    strided = jax.sharding.NamedSharding(
        s.mesh, jax.sharding.PartitionSpec(spec[0], None, *spec[1:])
    )
    return jnp.swapaxes(jnp.reshape(x, (size, num_full) + x.shape[1:], out_sharding=strided), 0, 1)


def _replace(args: tuple, argnums: tuple[int, ...], values: tuple) -> tuple:
    out = list(args)
    for i, a in zip(argnums, values, strict=True):
        out[i] = a
    return tuple(out)


@weak_cache
def microbatched(product: Callable, microbatch_size: int, argnums: tuple[int, ...]) -> Callable:
    """``product(params, args, *rest, v)`` averaged over chunks of ``args[i]``, ``i in argnums``.

    The unbatched arguments and ``rest`` are passed whole to every chunk.
    """

    def matvec(params, args, *rest):
        batched = tuple(args[i] for i in argnums)
        return microbatch_mean(
            lambda b: product(params, _replace(args, argnums, b), *rest), batched, microbatch_size
        )

    return matvec
