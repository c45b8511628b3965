"""Operators over a dataset streamed from the host: means over batches, accumulated per product.

When the data do not fit in device memory, a curvature operator over the
whole dataset is the weighted mean of its per-batch operators,

    ``C v = sum_b (n_b / n) C_b v``,   ``n = sum_b n_b``,

for every loss that is a mean over its batch (then ``C`` is exactly the
operator of the full-batch mean loss). Here the batches come from a *host
iterator* (NumPy arrays; grain, tf.data, a PyTorch ``DataLoader`` converted
to NumPy, a memory-mapped file): every product makes one pass over them,
each batch's work is one call of a jitted function (compiled once per batch
shape: a ragged last batch adds one compilation, no more), and the running
sum stays on the device. Dispatch is asynchronous, so the host reads the next
batch while the device computes.

* [`stream_mean`][curvlib.stream_mean]: the weighted mean over a stream of any jitted per-batch
  function;
* [`stream_matvec`][curvlib.stream_matvec]: an operator ``v -> C v`` over a stream (a
  [`StreamMatvec`][curvlib.StreamMatvec], *host-driven*: ``host_driven = True``), from any
  in-memory builder: ``lambda p, batch: curvlib.hessian_matvec(loss, p, batch)``;
* [`stream_gradient`][curvlib.stream_gradient]: the loss and its gradient over a stream.

A host-driven operator cannot run inside ``jit``/``vmap`` (it loops over host
data); curvlib's Krylov algorithms drive it from the host, keeping their
per-step work compiled. Its products equal the full-batch operator's to
rounding (the test suite checks ``1e-12`` in float64).
"""

from __future__ import annotations

import functools
import itertools
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _compile, _progress, _tree, _validate
from curvlib.operators import _common as C
from curvlib.operators.hessian import _value_and_grad
from curvlib.operators.microbatch import batch_size

PyTree = Any


# ------------------------------------------------------------------ streams


def _pass_factory(batches) -> Callable[[], Iterable]:
    """``batches`` as a zero-argument callable that starts a fresh pass over the data."""
    if isinstance(batches, Iterator):
        raise TypeError(
            "`batches` is a one-shot iterator (a generator or `iter(...)`), but every product "
            "makes a new pass over the data. Pass a function that returns a fresh iterator "
            "(`lambda: iter(loader)`, a generator function) or a re-iterable object (a list, "
            "a tf.data.Dataset, a grain DataLoader)."
        )
    if callable(batches):
        return lambda: _iterable(batches(), "`batches()`", "returned")
    batches = _iterable(batches, "`batches`", "is")
    return lambda: batches


def _iterable(batches, name: str, verb: str) -> Iterable:
    """``batches`` (``name``: how the message calls it), refused unless an iterable of batches."""
    if isinstance(batches, Mapping):  # (one batch, or a dataset's columns: not batches)
        raise TypeError(
            f"{name} {verb} a {type(batches).__name__}: iterating it yields its keys "
            f"({list(batches)[:3]}), not batches. Pass a list of batches "
            "(`[{'x': x0, 'y': y0}, {'x': x1, 'y': y1}]`) or a function returning an iterator "
            "over them."
        )
    if isinstance(batches, (np.ndarray, jax.Array)):  # (one batch: its rows are not batches)
        raise TypeError(
            f"{name} {verb} an array of shape {np.shape(batches)}: iterating it yields its rows "
            "as batches (each row's leading axis taken as its samples). Pass a list of batches "
            "(`[x]` for one batch, `list(stacked)` for batches stacked on a leading axis) or a "
            "function returning an iterator over them "
            "(`lambda: (x[i:i + b] for i in range(0, len(x), b))`)."
        )
    if not isinstance(batches, Iterable):
        raise TypeError(
            "`batches` must be a function returning an iterable of batches, or a re-iterable "
            f"of batches; {name} {verb} a {type(batches).__name__}."
        )
    return batches


def _call(fn, with_key: bool, batch, args, key, index):
    if with_key:
        return fn(batch, *args, jax.random.fold_in(key, index))
    return fn(batch, *args)


def _per_batch(kind: str, user_fn: Callable) -> Callable:
    """The per-batch function ``fn(batch, *args[, key_b])`` of a stream of a given ``kind``."""
    if kind == "mean":
        return user_fn
    if kind in ("product", "block"):  # user_fn = build(params, batch[, key]) -> matvec
        def product(params, batch, key, v):  # the output checked when traced: no run-time cost
            op = user_fn(params, batch, *key)
            if not callable(op):
                raise TypeError("`build(params, batch)` must return an operator (a function "
                                f"`v -> C v`); got {type(op).__name__}.")
            out = op(v)
            _validate.same_structure(v, out, "v", "build(params, batch)(v)", floating=True,
                                     what="`build` must return the batch's operator on "
                                          "vectors shaped like `params`.")
            return out

        if kind == "product":
            return lambda batch, params, v, *key: product(params, batch, key, v)
        return lambda batch, params, V, *key: jax.vmap(
            lambda v: product(params, batch, key, v))(V)
    has_aux = kind == "value_and_grad_aux"  # user_fn = fun(params, batch)

    def loss(params, batch):  # the output checked when traced: no run-time cost
        out = user_fn(params, batch)
        _validate.output(out, "fun", has_aux=has_aux)
        return out

    return lambda batch, params: _value_and_grad(loss, has_aux)(params, batch)


# jitted per-batch steps, keyed weakly by the user's function; a step refers to that function
# only through a weak reference, so the cache never keeps a user function (or what its
# closure holds) alive, and an entry lives exactly as long as the function
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# what each function read when its steps were made (`_compile.environment`), and the paths
# a pass itself changed (a loss counting its traces): ``[environment, ignored paths]``
_READS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _entries(user_fn: Callable):
    """``(cache dict for user_fn, a getter of user_fn)``: weakly held when possible.

    The steps are made again when something ``user_fn`` reads changed since they were (a
    global, a closed-over value, an attribute: `_compile.environment`), as the in-memory
    operators are: a new stream on the same function reads the values as they are now.
    An operator holds its own steps (`StreamMatvec`), as ``jax.jit`` holds a trace.
    """
    try:
        env = _compile.environment(user_fn)
        memo = _READS.get(user_fn)
        if memo is None or _compile.changed_reads(env, memo[0], memo[1]):
            _STEPS[user_fn] = {}
            _READS[user_fn] = [env, frozenset() if memo is None else memo[1]]
        return _STEPS[user_fn], weakref.ref(user_fn)
    except TypeError:  # not hashable or not weakly referenceable: not cached
        return {}, (lambda: user_fn)


def _settle(user_fn: Callable, before: dict | None) -> None:
    """After a pass: what ``user_fn`` reads that the pass itself changed (``before`` its
    environment then) is not compared again, so such a function keeps its steps."""
    if before is None:
        return
    try:
        memo = _READS.get(user_fn)
        if memo is not None:
            memo[1] = memo[1] | _compile.changed_reads(_compile.environment(user_fn), before)
    except TypeError:
        pass


def _avals(tree):
    return jax.tree.structure(tree), tuple(
        (tuple(jnp.shape(x)), jnp.result_type(x)) for x in jax.tree.leaves(tree))


def _out_shape(user_fn, kind, with_key, batch, args, key):
    """The per-batch outputs' shapes and dtypes (one abstract trace, cached per input shapes)."""
    entries, _ = _entries(user_fn)
    sig = ("shape", kind, with_key, _avals(batch), _avals(args))
    if sig not in entries:
        fn = _per_batch(kind, user_fn)
        entries[sig] = jax.eval_shape(
            lambda b, a, k: _call(fn, with_key, b, a, k, 0), batch, args, key
        )
    return entries[sig]


def _step(user_fn: Callable, kind: str, with_key: bool):
    """The jitted ``acc + n_b * fn(batch, *args[, key_b])`` (``acc``'s dtypes) for ``user_fn``."""
    entries, get = _entries(user_fn)
    if (kind, with_key) not in entries:

        def step(acc, batch, n, args, key, index):
            out = _call(_per_batch(kind, get()), with_key, batch, args, key, index)
            return jax.tree.map(lambda a, o: a + n * o.astype(a.dtype), acc, out)

        entries[(kind, with_key)] = jax.jit(step)
    return entries[(kind, with_key)]


def _group_step(user_fn: Callable, kind: str, with_key: bool):
    """The jitted step of `_step` over a stack of batches: one ``lax.scan``, in order."""
    entries, get = _entries(user_fn)
    if ("group", kind, with_key) not in entries:

        def step(acc, stacked, ns, args, key, indices):
            fn = _per_batch(kind, get())

            def body(acc, item):
                batch, n, index = item
                out = _call(fn, with_key, batch, args, key, index)
                return jax.tree.map(lambda a, o: a + n * o.astype(a.dtype), acc, out), None

            return jax.lax.scan(body, acc, (stacked, ns, indices))[0]

        entries[("group", kind, with_key)] = jax.jit(step)
    return entries[("group", kind, with_key)]


def _stack(batches):
    """Batches of equal shapes stacked on a new leading axis (NumPy stays on the host)."""
    def stack(*xs):
        if all(isinstance(x, np.ndarray) or np.isscalar(x) for x in xs):
            return np.stack(xs)
        return jnp.stack(xs)

    return jax.tree.map(stack, *batches)


@jax.jit(static_argnums=2)
def _divide(acc, total, dtypes):
    return [(a / total).astype(dt) for a, dt in zip(acc, dtypes, strict=True)]


def _mean(acc, total, like):
    """``acc / total`` in the dtypes of ``like`` (the per-batch outputs' shapes and dtypes)."""
    leaves, treedef = jax.tree.flatten(acc)
    dtypes = tuple(jnp.dtype(s.dtype) for s in jax.tree.leaves(like))
    return jax.tree.unflatten(treedef, _divide(leaves, total, dtypes))


def _acc_zeros(out_shape: PyTree) -> PyTree:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, _tree.acc_dtype(s.dtype)), out_shape)


def _run_pending(step, group, acc, pending, args, key):
    """``acc`` plus the pending batches' sum: one ``step``, or one ``group`` call on their stack."""
    if len(pending) == 1:
        batch, n, i = pending[0]
        return step(acc, batch, n, args, key, i)
    if pending:
        stacked = _stack([b for b, _, _ in pending])
        ns = np.asarray([n for _, n, _ in pending], np.int32)
        idx = np.asarray([i for _, _, i in pending], np.int32)
        return group(acc, stacked, ns, args, key, idx)
    return acc


def _checked_batch(batch, i: int, treedef, sharding):
    """``(batch, n)``: batch ``i`` checked (structure ``treedef``, non-empty) and placed."""
    if jax.tree.structure(batch) != treedef:
        raise ValueError(
            f"batch {i} of the stream has structure {jax.tree.structure(batch)} but the "
            f"first batch had {treedef}; every batch must have the same pytree structure."
        )
    n = batch_size(batch, f"batch {i}")
    if n < 1:
        raise ValueError(f"batch {i} of the stream is empty.")
    # a host copy of every writable NumPy leaf: JAX may alias a host buffer until the
    # computation reading it runs (asynchronously, or a later batch's group call), so a
    # loader refilling one buffer in place would change batches already handed over
    batch = jax.tree.map(
        lambda x: np.array(x) if isinstance(x, np.ndarray) and x.flags.writeable else x, batch)
    if sharding is not None:
        batch = _put(batch, sharding)
    return batch, n


def _put(batch, sharding):
    """``batch`` placed by ``sharding``, each leaf whose rows do not split over it (a ragged
    last batch: 3 rows over 4 devices) replicated over the sharding's devices instead."""
    leaves = jax.tree.leaves(batch)
    placed = [jax.device_put(x, s if _splits(s, np.shape(x)) else _replicated(s))
              for x, s in zip(leaves, _leaf_shardings(batch, sharding), strict=True)]
    return jax.tree.unflatten(jax.tree.structure(batch), placed)


_END = object()  # a stream's end


def _placed(batches: Iterable, sharding) -> Iterator:
    """``(batch, n)`` per batch of a stream every process holds whole, checked and placed."""
    treedef = None
    for i, batch in enumerate(batches):
        treedef = jax.tree.structure(batch) if treedef is None else treedef
        yield _checked_batch(batch, i, treedef, sharding)


def _leaf_shardings(batch, sharding):
    """One sharding per leaf of ``batch`` (``sharding``: one for all, or a matching pytree)."""
    if isinstance(sharding, jax.sharding.Sharding):
        return [sharding] * len(jax.tree.leaves(batch))
    return jax.tree.structure(batch).flatten_up_to(sharding)


def _process_sizes(status: int, signature: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every process's ``status`` (a batch's local size, or a negative code) and
    ``signature`` (`_signature` of its batch), in process order."""
    if jax.process_count() == 1:
        return np.asarray([status]), np.asarray([signature])
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.asarray([status, signature], np.int64))
    got = np.asarray(got).reshape(-1, 2)
    return got[:, 0], got[:, 1]


def _layout(batch) -> str:
    """What every process's part of a batch must share: each leaf's shape past the sample
    axis and dtype (the structure is the user's type, whose text may hold addresses)."""
    leaves = [f"{np.shape(x)[1:]} {x.dtype if hasattr(x, 'dtype') else np.result_type(x)}"
              for x in jax.tree.leaves(batch)]
    return f"{len(leaves)} leaves [{', '.join(leaves)}]"


def _signature(batch) -> int:
    """`_layout` of ``batch`` as a number the processes can all-gather."""
    return zlib.crc32(_layout(batch).encode())


def _agreed(batches: Iterable, sharding) -> Iterator:
    """``(global batch, n)`` per step of per-process streams, the processes agreeing first.

    Each step costs one all-gather of two integers per process (a host sync), so
    that every process takes the same branch: all have a batch (assemble it), all
    are done (stop), or not (raise on every process, never a hang): a stream that
    ends early, a batch that is malformed or whose loader raised on one process, or
    parts that differ across processes in their leaves' trailing shapes or dtypes (each
    process would compile another program, and wait in its collectives for the others).
    """
    it = iter(batches)
    treedef = None
    for i in itertools.count():
        error, status, signature = None, -1, 0
        try:  # the loader's and the checks' errors are raised below, once the others know
            batch = next(it, _END)
            if batch is not _END:
                treedef = jax.tree.structure(batch) if treedef is None else treedef
                batch, status = _checked_batch(batch, i, treedef, None)
                signature = _signature(batch)
        except Exception as e:  # re-raised after the all-gather
            error, status = e, -2
        sizes, signatures = _process_sizes(status, signature)
        if error is not None:
            raise error
        if (sizes == -2).any():
            raise ValueError(
                f"batch {i} of the stream failed on process(es) "
                f"{np.flatnonzero(sizes == -2).tolist()} (see the error there).")
        if (sizes == -1).all():
            return
        if (sizes == -1).any():
            raise ValueError(
                f"the processes' streams have different lengths: process(es) "
                f"{np.flatnonzero(sizes == -1).tolist()} ended after {i} batches, process(es) "
                f"{np.flatnonzero(sizes >= 0).tolist()} yielded more. With `process_local=True` "
                "every process must yield the same number of batches.")
        if (signatures != signatures[0]).any():
            raise ValueError(
                f"batch {i} of the stream differs across processes: process(es) "
                f"{np.flatnonzero(signatures != signatures[0]).tolist()} yielded other leaf "
                "shapes past the sample axis, dtypes or numbers of leaves than process 0 (on "
                f"process {jax.process_index()}: {_layout(batch)}). With `process_local=True` the "
                "processes' parts of a batch must differ only in their number of rows.")
        yield _assemble(batch, sizes, sharding), int(sizes.sum())


def _assemble(batch, sizes: np.ndarray, sharding):
    """The global batch: this process's rows and the others', placed by ``sharding``.

    Local sizes equal to the rows each process's devices hold under the sharding:
    JAX's own assembly (``jax.make_array_from_process_local_data``), nothing leaves its
    process. Otherwise (a ragged batch, or a sharding under which the processes' devices
    do not split the rows between them: replicated, a leaf's ``P()``): every process's
    rows are gathered to every process (padded to the largest) and the batch is placed
    by ``sharding`` where its size splits, else replicated on the sharding's mesh:
    correct, and a one-off cost.
    """
    n = int(sizes.sum())
    leaves = jax.tree.leaves(batch)
    shardings = _leaf_shardings(batch, sharding)
    local = tuple(sizes.tolist())
    if all(_process_rows(s, (n,) + np.shape(x)[1:]) == local
           for x, s in zip(leaves, shardings, strict=True)):
        out = [jax.make_array_from_process_local_data(s, np.asarray(x), (n,) + np.shape(x)[1:])
               for x, s in zip(leaves, shardings, strict=True)]
        return jax.tree.unflatten(jax.tree.structure(batch), out)
    from jax.experimental import multihost_utils

    top, out = int(sizes.max()), []
    for x, s in zip(leaves, shardings, strict=True):
        x = np.asarray(x)
        pad = np.zeros((top - x.shape[0],) + x.shape[1:], x.dtype)
        rows = np.asarray(multihost_utils.process_allgather(np.concatenate([x, pad])))
        full = np.concatenate([r[:k] for r, k in zip(rows, sizes, strict=True)])
        if not _splits(s, full.shape):
            s = _replicated(s)
        out.append(jax.make_array_from_callback(full.shape, s, lambda idx, f=full: f[idx]))
    return jax.tree.unflatten(jax.tree.structure(batch), out)


@functools.lru_cache(maxsize=64)
def _process_rows(sharding, shape) -> tuple[int, ...] | None:
    """How many rows of a batch of ``shape`` each process's devices hold under
    ``sharding`` (in process order), or ``None`` where the rows do not split over it.
    The same on every process (it reads the sharding, not the data). Cached: a stream's
    batches share a few shapes, and the count is of the devices' row ranges (merged where
    a process's devices overlap), not of the rows."""
    if not _splits(sharding, shape):
        return None
    ranges: dict[int, list] = {}
    for d, idx in sharding.devices_indices_map(tuple(shape)).items():
        start, stop, _ = idx[0].indices(shape[0])
        ranges.setdefault(d.process_index, []).append((start, stop))
    counts = []
    for p in range(jax.process_count()):
        held, end = 0, 0
        for start, stop in sorted(ranges.get(p, ())):
            held += max(stop - max(start, end), 0)
            end = max(end, stop)
        counts.append(held)
    return tuple(counts)


def _splits(sharding, shape) -> bool:
    try:
        sharding.shard_shape(tuple(shape))
    except ValueError:
        return False
    return True


def _replicated(sharding):
    """A sharding that replicates over ``sharding``'s devices (its mesh where it has one)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
    return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("devices",)),
                                      jax.sharding.PartitionSpec())


def _check_process_local(process_local, sharding) -> bool:
    _validate.one_of(process_local, "process_local", (True, False))
    if process_local and sharding is None:
        raise ValueError(
            "`process_local=True` needs `sharding`: the placement of the global batch (e.g. "
            "`NamedSharding(mesh, P('data'))` on a mesh over every process's devices), from "
            "which each process's rows are assembled.")
    return process_local


def _stream_sum(user_fn, kind, batches, args, *, key, sharding, what: str, out_shape=None,
                step=None, per_call: int = 1, group=None, process_local: bool = False):
    """``(sum_b n_b fn(batch_b, *args), n, number of batches, output shapes)``: one host pass.

    Batch ``b`` (0-based) gets the key ``fold_in(key, b)`` when ``key`` is given.
    ``out_shape`` (``fn``'s output shapes and dtypes), when known, spares a trace
    of ``fn`` per pass; ``step`` (``group``) is the jitted step (over a stack of
    batches) when the caller holds it. Up to ``per_call`` consecutive batches
    of equal shapes run as one call (the same sum, in the same order). With
    ``process_local`` each process's ``batches`` yields its own rows of each
    global batch (`_agreed`).
    """
    start = _pass_factory(batches)
    with_key = key is not None
    try:
        before = _compile.environment(user_fn)
    except TypeError:
        before = None
    step = _step(user_fn, kind, with_key) if step is None else step
    if group is None and per_call > 1:
        group = _group_step(user_fn, kind, with_key)
    key = jnp.zeros((2,), jnp.uint32) if key is None else key
    acc = None
    total = count = 0
    pending = []  # (batch, n, index) of equal shapes, not yet run

    def flush(acc):
        acc = _run_pending(step, group, acc, pending, args, key)
        pending.clear()
        return acc

    placed = _agreed(start(), sharding) if process_local else _placed(start(), sharding)
    for i, (batch, n) in enumerate(_progress.batches(placed, what)):
        if acc is None and out_shape is None:
            out_shape = _out_shape(user_fn, kind, with_key, batch, args, key)
        if acc is None:
            if jax.tree.leaves(out_shape):  # (an empty output averages to itself)
                _validate.float_leaves(out_shape, "output", advice=(
                    f"The per-batch outputs are averaged over the stream ({what}), so they "
                    "must be floating means."))
            acc = _acc_zeros(out_shape)
        if pending and _avals(batch) != _avals(pending[0][0]):
            acc = flush(acc)
        pending.append((batch, n, i))
        if len(pending) >= per_call:
            acc = flush(acc)
        total += n
        count += 1
    if acc is None:
        raise ValueError(
            f"the stream of batches yielded no batch; {what} needs at least one (every pass "
            "needs the whole stream: a function `batches` must return a fresh iterator on "
            "every call, not one already used).")
    acc = flush(acc)
    _settle(user_fn, before)
    return acc, total, count, out_shape


def stream_mean(fn: Callable, batches, *args, key=None, sharding=None,
                batches_per_call: int = 1, process_local: bool = False) -> PyTree:
    """The weighted mean ``sum_b (n_b / n) fn(batch_b, *args)`` over a stream of batches.

    The streaming counterpart of [`curvlib.microbatch_mean`][curvlib.microbatch_mean]: for an ``fn``
    that is a mean over its batch (a mean loss, its gradient, a curvature
    product), the result is ``fn`` of the whole dataset. One pass over
    ``batches``; ``fn`` runs as one jitted call per batch (compiled once per
    batch shape), ``args`` are traced arguments of that call (parameters,
    tangents: never baked into the program), and the sum is accumulated on the
    device in at least float32. The result has ``fn``'s output dtypes.

    Args:
      fn: ``fn(batch, *args) -> pytree`` of float arrays, or ``fn(batch, *args,
        key_b)`` when ``key`` is given.
      batches: a function returning a fresh iterable of batches (``lambda:
        iter(loader)``), or a re-iterable (a list, a ``tf.data.Dataset``, a grain
        ``DataLoader``); not a dict or an array (one batch: iterating it yields
        its keys, or its rows). A batch is a pytree of NumPy (or JAX) arrays with a
        shared leading axis ``n_b >= 1``, its weight. Writable NumPy arrays are
        copied when read, so a loader may refill one buffer in place.
      *args: further arguments of ``fn``.
      key: optional PRNG key; batch ``b`` (counting from 0) then receives
        ``jax.random.fold_in(key, b)`` as ``fn``'s last argument (the same key
        on every pass over the same stream).
      sharding: optional ``jax.sharding.Sharding`` (or pytree of them matching a
        batch) to place every batch with (``jax.device_put``), e.g.
        ``NamedSharding(mesh, P("data"))`` for data parallelism. A leaf whose
        rows do not split over it (a ragged last batch: 3 rows over 4 devices)
        is placed replicated on its devices instead.
      batches_per_call: run up to this many consecutive batches of equal shapes
        as one jitted call (stacked; a ``lax.scan`` over them, the same sum in
        the same order). Fewer calls cost less: on the benchmark transformer
        (2 CPU cores) one Hessian product over 8 batches took 720 ms as 8 calls,
        617 ms as 2 calls of 4 and 566 ms as one call, the in-memory figure.
        The price is device memory: that many batches at once. A batch of
        another shape (a ragged last batch) runs in a call of its own.
      process_local: ``True`` when each process of a multi-process run
        (``jax.distributed``) reads only its own part of the data: batch ``b``
        of the stream is then the union over processes of each process's
        ``b``-th batch (``n_b = sum_p n_{b,p}``), assembled into a global array
        with ``jax.make_array_from_process_local_data(sharding, local_batch)``
        (``sharding`` is required, e.g. ``NamedSharding(mesh, P("data"))`` on a
        mesh over every process's devices). Cost: one all-gather of two integers
        per process per batch (a host sync), so that all processes agree on
        each batch's size, its leaves' shapes past the sample axis and dtypes, and
        on the stream's end; a batch whose parts differ in size across processes,
        or whose total does not split over ``sharding`` (a ragged last batch), is
        all-gathered whole to every process and placed replicated: the same mean,
        at the price of that batch's copy on every device (a leaf whose sharding
        does not split the rows between the processes, e.g. labels placed
        ``P()``, is gathered too, then placed as asked). Processes whose streams differ in
        length, or whose parts of a batch differ in a leaf's trailing shape or
        dtype, raise a ``ValueError`` on every process (never a hang). In a single
        process it is ``sharding``'s placement of each batch (a leaf whose rows do
        not split over it, a ragged last batch, placed replicated on its devices).

    Returns:
      The weighted mean, shaped like ``fn``'s output.

    Raises:
      TypeError: for a one-shot iterator (a product needs a fresh pass), a
        dict or an array as ``batches`` (or returned by it), or traced ``args``.
      ValueError: for a ``key`` that is not one PRNG key, an empty stream, an empty
        batch, batches of differing structures or leaves without a shared leading axis
        (named by batch and path);
        with ``process_local``, for a missing ``sharding``, streams of different
        lengths across processes, or parts of a batch whose leaves differ across
        processes past the sample axis or in dtype.

    Examples:
      >>> import numpy as np
      >>> from curvlib import stream_mean
      >>> data = np.arange(10.0)
      >>> batches = lambda: (data[i:i + 4] for i in range(0, 10, 4))   # 4 + 4 + 2
      >>> float(stream_mean(lambda b, c: (b - c).mean(), batches, 1.0))
      3.5
    """
    _validate.concrete(args, "args")
    _validate.prng_key(key, optional=True)  # (as stream_matvec: before the first batch)
    per_call = _validate.static_int(batches_per_call, "batches_per_call", minimum=1)
    local = _check_process_local(process_local, sharding)
    acc, total, _, out_shape = _stream_sum(fn, "mean", batches, args, key=key,
                                           sharding=sharding, what="stream_mean",
                                           per_call=per_call, process_local=local)
    return _mean(acc, total, out_shape)


# ---------------------------------------------------------------- operators


class StreamMatvec:
    """A host-driven operator ``v -> C v = sum_b (n_b / n) C_b v`` over a stream of batches.

    Build it with [`stream_matvec`][curvlib.stream_matvec]. The interface every host-driven
    operator offers (what curvlib's algorithms detect):

    * ``host_driven = True`` (a class attribute);
    * ``op(v) -> pytree``: one product, one pass over the data, ``v`` shaped
      like ``params`` (concrete arrays: not under ``jit``/``vmap``);
    * ``op.matmat(V) -> pytree``: the products of a block of vectors (leaves
      with a leading axis) in one pass;
    * ``op.params``: the point (the shapes and dtypes of ``v``);
    * ``op.num_examples`` / ``op.num_batches``: what the last pass saw (``None``
      before the first); a later pass over a stream of another size raises.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> import curvlib
      >>> batches = [np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), np.zeros((1, 2))]
      >>> def build(w, xb):  # one batch's Hessian, 2 xb^T xb / n_b
      ...     return curvlib.hessian_matvec(lambda w, xb: jnp.mean((xb @ w) ** 2), w, xb)
      >>> H = curvlib.stream_matvec(build, jnp.zeros(2), batches)
      >>> H.matmat(jnp.eye(2)).tolist()  # two products in one pass over the batches
      [[1.0, 0.5], [0.5, 2.5]]
      >>> H.num_examples, H.num_batches
      (4, 2)
      >>> top = curvlib.eigsh(H, jnp.ones(2), k=1)  # a host loop, one pass per product
      >>> round(float(top.eigenvalues[0]), 4), bool(top.converged)  # (3.5 + 13 ** 0.5) / 2
      (2.6514, True)
    """

    host_driven = True

    def __init__(self, build, params, batches, key, sharding, batches_per_call=1,
                 process_local=False):
        self.params = params
        self._process_local = process_local
        self._per_call = batches_per_call
        self._build = build
        self._batches = batches
        self._key = key
        self._sharding = sharding
        self._signature = C.signature(params)
        shardings = _tree.param_shardings(params)
        self._layout = None if shardings is None else (jax.tree.structure(params), shardings)
        # held here: products never retrace, whatever the cache does with `build`
        self._steps = {kind: _step(build, kind, key is not None) for kind in ("product", "block")}
        self._groups = {kind: _group_step(build, kind, key is not None)
                        for kind in ("product", "block")} if batches_per_call > 1 else {}
        self.num_examples = None
        self.num_batches = None

    def __repr__(self):
        return (f"StreamMatvec(num_examples={self.num_examples}, "
                f"num_batches={self.num_batches})")

    def _run(self, kind, v):
        out_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), v)
        acc, total, count, out_shape = _stream_sum(
            self._build, kind, self._batches, (self.params, v), key=self._key,
            sharding=self._sharding, what="a streamed product", out_shape=out_shape,
            step=self._steps[kind], per_call=self._per_call, group=self._groups.get(kind),
            process_local=self._process_local,
        )
        if self.num_examples is not None and (total, count) != (
                self.num_examples, self.num_batches):
            raise ValueError(
                f"the stream changed between products: this pass had {total} examples in "
                f"{count} batches, the previous one {self.num_examples} in {self.num_batches}. "
                "A streamed operator needs the same data on every pass (a fixed order is not "
                "required, but the same examples are)."
            )
        self.num_examples, self.num_batches = total, count
        out = _mean(acc, total, out_shape)
        if self._layout is not None and jax.tree.structure(out) == self._layout[0]:
            # placed like the parameters; a block's leading (vector) axis unsplit
            place = ((lambda s, o: s) if kind == "product" else
                     (lambda s, o: _tree.basis_sharding(s, o.ndim - 1)))
            out = jax.tree.unflatten(self._layout[0], [
                jax.device_put(o, place(s, o)) for o, s in zip(
                    jax.tree.leaves(out), self._layout[1], strict=True)])
        return out

    def __call__(self, v: PyTree) -> PyTree:
        _validate.concrete(v, "v")
        _validate.tangent(v, self._signature, "params", "vector")
        return self._run("product", C.cast_like(v, self.params))

    def matmat(self, V: PyTree) -> PyTree:
        """``C V`` for a block of vectors ``V`` (leaves with a leading axis ``k``): one pass.

        Args:
          V: ``k`` vectors shaped like ``params``, stacked on a leading axis of every leaf.

        Returns:
          ``C V``, stacked the same way.
        """
        _validate.concrete(V, "V")
        rows = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(V)}
        if len(rows) != 1 or None in rows:
            raise ValueError(
                "`V` must hold vectors shaped like `params` stacked on a shared leading axis; "
                f"got leading axes {sorted(map(str, rows))}."
            )
        _validate.tangent(jax.tree.map(lambda x: x[0], V), self._signature, "params", "vector")
        V = jax.tree.map(lambda x, p: jnp.asarray(x).astype(jnp.result_type(p)), V, self.params)
        return self._run("block", V)


def stream_matvec(build: Callable, params: PyTree, batches, *, key=None,
                  sharding=None, batches_per_call: int = 1,
                  process_local: bool = False) -> StreamMatvec:
    """Any curvature operator over a dataset streamed from the host, as a host-driven operator.

    ``build(params, batch)`` returns the in-memory operator of one batch (a
    mean over it), e.g. ``curvlib.hessian_matvec(loss, params, batch)``,
    ``curvlib.ggn_matvec(...)``, ``curvlib.fisher_matvec(...)``,
    ``curvlib.empirical_fisher_matvec(...)``, acting on vectors shaped like ``params``
    (for a block, restrict the stream instead:
    ``curvlib.restrict(stream_matvec(build, params, batches), params, where)``). Every
    product of the result makes one pass over ``batches``:

        ``C v = sum_b (n_b / n) build(params, batch_b)(v)``,

    which is the operator of the whole dataset's mean loss (equal to the
    full-batch operator to rounding). Building and applying the batch
    operator is one jitted call per batch (compiled once per batch shape;
    the ``"linearize"`` modes linearise inside that call, costing about one
    ``"fwd-rev"`` product per batch). Memory on the device: one batch's
    operator plus two vectors.

    The Monte-Carlo Fisher over a stream draws fresh targets per batch: pass
    ``key`` and a three-argument ``build(params, batch, key_b)``; batch ``b``
    gets ``jax.random.fold_in(key, b)``, the same on every pass, so the
    operator is fixed.

    Args:
      build: ``build(params, batch) -> matvec`` (``build(params, batch, key_b)``
        with ``key``); must be traceable (it runs inside ``jax.jit``).
      params: the point.
      batches: a function returning a fresh iterable of batches, or a
        re-iterable (see [`stream_mean`][curvlib.stream_mean]). Every pass must yield the same
        examples.
      key: optional PRNG key (see above).
      sharding: optional placement of every batch (see [`stream_mean`][curvlib.stream_mean]).
      batches_per_call: consecutive batches of equal shapes per jitted call
        (see [`stream_mean`][curvlib.stream_mean]): fewer, larger calls, more device memory.
      process_local: each process's ``batches`` yields only its own rows of
        each global batch (multi-process runs; see
        [`stream_mean`][curvlib.stream_mean]): ``C v`` is then the operator of the
        union of every process's data, and ``params`` and ``v`` are global
        arrays. Needs ``sharding``; costs one small all-gather per batch.

    Returns:
      A [`StreamMatvec`][curvlib.StreamMatvec] (``host_driven = True``).

    Raises:
      TypeError: for a one-shot iterator, a dict or an array as ``batches``;
        when called, for traced vectors, or a ``build`` that returns no operator.
      ValueError: when called, for a vector that does not match ``params``, an
        empty stream, a stream whose size changed since the last pass, or a
        batch operator whose output is not shaped like ``params``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> import curvlib
      >>> x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
      >>> loss = lambda w, xb: jnp.mean((xb @ w) ** 2)            # H = 2 x^T x / n
      >>> H = curvlib.stream_matvec(lambda w, xb: curvlib.hessian_matvec(loss, w, xb),
      ...                           jnp.zeros(2), [x[:3], x[3:]])  # batches of 3 and 1
      >>> H.host_driven, H(jnp.array([1.0, 0.0])).tolist()
      (True, [1.0, 0.5])
      >>> curvlib.hessian_matvec(loss, jnp.zeros(2), x)(jnp.array([1.0, 0.0])).tolist()
      [1.0, 0.5]
    """
    if not callable(build):
        raise TypeError(f"`build` must be callable; got {type(build).__name__}.")
    _validate.float_leaves(params, "params")
    _validate.concrete(params, "params")
    _validate.prng_key(key, optional=True)
    _pass_factory(batches)  # one-shot iterators are refused now, not at the first product
    per_call = _validate.static_int(batches_per_call, "batches_per_call", minimum=1)
    local = _check_process_local(process_local, sharding)
    return StreamMatvec(build, params, batches, key, sharding, per_call, local)


def stream_gradient(fun: Callable, params: PyTree, batches, *, has_aux: bool = False,
                    sharding=None, batches_per_call: int = 1, process_local: bool = False):
    """``(value, grad)`` of a mean loss over a dataset streamed from the host.

    ``fun(params, batch)`` is a mean over its batch; the result is the
    weighted mean over the stream, i.e. the value and gradient of the whole
    dataset's mean loss (one pass, one jitted ``jax.value_and_grad`` call per
    batch). With ``has_aux=True`` the result is ``((value, aux), grad)`` with
    ``aux`` averaged like the loss (its leaves must be floating means).

    Args:
      fun: ``fun(params, batch) -> scalar`` (``(scalar, aux)`` with ``has_aux``).
      params: the point.
      batches: a function returning a fresh iterable of batches, or a re-iterable.
      has_aux: ``fun`` returns ``(loss, aux)``.
      sharding: optional placement of every batch (see [`stream_mean`][curvlib.stream_mean]).
      batches_per_call: consecutive batches of equal shapes per jitted call
        (see [`stream_mean`][curvlib.stream_mean]).
      process_local: each process's ``batches`` yields only its own rows of
        each global batch (multi-process runs; see
        [`stream_mean`][curvlib.stream_mean]). Needs ``sharding``.

    Returns:
      ``(value, grad)`` or ``((value, aux), grad)``.

    Raises:
      TypeError: for a one-shot iterator, a dict or an array as ``batches``, or
        traced ``params``.
      ValueError: for an empty stream or malformed batches.
      ArgumentError: (a ``ValueError`` and a ``TypeError``) for ``params`` that hold no
        array or a leaf that is not real floating.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from curvlib import stream_gradient
      >>> data = np.arange(5.0)
      >>> loss = lambda p, b: jnp.mean((b - p) ** 2)
      >>> value, g = stream_gradient(loss, 1.0, [data[:3], data[3:]])
      >>> round(float(value), 6), round(float(g), 6)
      (3.0, -2.0)
    """
    _validate.one_of(has_aux, "has_aux", (True, False))
    _validate.float_leaves(params, "params")  # (as `gradient`: no empty or integer params)
    _validate.concrete(params, "params")
    kind = "value_and_grad_aux" if has_aux else "value_and_grad"
    per_call = _validate.static_int(batches_per_call, "batches_per_call", minimum=1)
    local = _check_process_local(process_local, sharding)
    acc, total, _, out_shape = _stream_sum(fun, kind, batches,
                                           (params,), key=None, sharding=sharding,
                                           what="stream_gradient", per_call=per_call,
                                           process_local=local)
    out = _mean(acc, total, out_shape)
    return ((out[0], out[1]), out[2]) if has_aux else out
