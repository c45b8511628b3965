"""Drivers for the product loop of every Krylov algorithm.

Each algorithm is written as a *reverse-communication* state machine (as
ARPACK is): ``request(cfg, state)`` names the vector to multiply,
``update(cfg, state, product)`` absorbs the product and does all the work
between two products, ``running(cfg, state)`` says whether to go on. Two
drivers run it:

* `run` — one ``lax.while_loop`` whose body holds the *only* call site of
  the user's product, so the compiled program contains the model once;
* `run_host` — a Python loop for *host-driven* operators (data streamed
  from the host, which cannot be traced): the product is the operator's own
  host loop over batches, while ``request``, ``update`` and ``running`` are
  each one jitted program, compiled once per configuration and shapes.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _compile, _progress, _space, _tree, _validate, _xp
from curvlib._compile import (  # noqa: F401
    QUICK,
    eager_jit,
    is_host_driven,  # noqa: F401  (the operator property)
    quick_jit,
    quick_options,
)

PyTree = Any


def run(request: Callable, update: Callable, running: Callable, cfg, matvec: Callable, state):
    """``while running: state = update(state, matvec(request(state)))``: one ``lax.while_loop``."""

    def body(s):
        return update(cfg, s, matvec(request(cfg, s)))

    return jax.lax.while_loop(lambda s: running(cfg, s), body, state)


@functools.lru_cache(maxsize=128)
def _jitted(fn: Callable, cfg, quick: bool = False):
    return (quick_jit if quick else eager_jit)(functools.partial(fn, cfg))


@functools.lru_cache(maxsize=128)
def _host_steps(request: Callable, update: Callable, running: Callable, cfg, quick: bool):
    """``(begin, advance)``: the two programs of `run_host`, compiled once per ``cfg`` and shapes.

    ``begin(s) = (request(s), running(s))``; ``advance(s, w)`` absorbs the product
    ``w`` and returns the next state with *its* request and running flag, so each
    product costs two dispatches (the product and ``advance``) and one
    synchronisation (the flag).
    """
    def begin(s):
        return request(cfg, s), running(cfg, s)

    def advance(s, w):
        s = update(cfg, s, w)
        return s, request(cfg, s), running(cfg, s)

    jit = quick_jit if quick else eager_jit
    return jit(begin), jit(advance)


def run_host(request: Callable, update: Callable, running: Callable, cfg, matvec: Callable,
             state, *, quick: bool = False, report: Callable | None = None, first=None):
    """The loop of `run` driven from Python, for a host-driven ``matvec``.

    ``request``, ``update`` and ``running`` are module-level functions and
    ``cfg`` is hashable, so the loop's two programs (`_host_steps`) are
    compiled once per configuration and shapes. One host synchronisation per
    product (the running flag), which a product streamed from the host pays
    anyway. ``quick`` compiles the steps with less backend optimisation
    (`QUICK`): for the answer-now path of an eager call, which runs only until
    its fused program is ready. ``report(cfg, state)`` (a module-level function)
    gives ``(products, budget, rounds, worst residual)`` for the progress bar
    (`curvlib.show_progress`); it runs only while a bar is shown.
    ``first``: the first request and running flag when the caller computed them with
    the state (`solve_now`'s `_start`).
    """
    _validate.concrete(state, "state", loop=True)
    begin, advance = _host_steps(request, update, running, cfg, quick)
    bar = None if report is None else _progress.bar(desc="eigsh", unit="product")
    read = None if bar is None else _jitted(report, cfg, quick)
    x, more = begin(state) if first is None else first
    try:
        while bool(more):
            state, x, more = advance(state, matvec(x))
            if bar is not None:
                _show(bar, *read(state))
    finally:
        if bar is not None:
            bar.close()
    return state


def _show(bar, done, budget, rounds, worst) -> None:
    """Products done against the budget, verification rounds, the worst relative residual."""
    bar.total = int(budget)
    bar.set_postfix_str(f"rounds={int(rounds)} worst residual={float(worst):.1e}", refresh=False)
    bar.update(int(done) - bar.n)  # redrawn at tqdm's own pace (`mininterval`), not per product


# ------------------------------------------------------------------ answer now

NOW_MAX_DIM = 1 << 22  # beyond: compiling is a small part of the first answer; fused only


def answers_now(layout: str, v0) -> bool:
    """Whether `solve_now` applies: ``v0`` is one flat vector of one dtype on one device.

    True for the ``concat`` layout and for a single 1-D leaf not sharded; false for
    mixed dtypes, sharded leaves, sizes beyond `NOW_MAX_DIM` and arrays on a device
    that is not of the default backend.
    """
    leaves = jax.tree.leaves(v0)
    if sum(int(jnp.size(x)) for x in leaves) > NOW_MAX_DIM or layout == "leaves":
        return False
    # the steps compile for the default backend (`quick_options`): arrays elsewhere (a CPU
    # array beside a GPU) take the fused program
    default = jax.default_backend()
    if any(d.platform != default for x in leaves
           for d in getattr(getattr(x, "sharding", None), "device_set", ())):
        return False
    if layout == "identity":  # (`choose_layout`'s answer for v0: a single 1-D leaf, or sharded)
        return (len(leaves) == 1 and jnp.ndim(leaves[0]) <= 1
                and _space._on_one_device(leaves[0]) is True
                and _tree.explicit_sharding(leaves[0]) is None)
    return True


@quick_jit  # (once per call: compiled cheaply)
def _flat_start(v0, key):
    return _space.Space(v0, "concat").flatten(v0), _space.seed(v0, key)


@functools.lru_cache(maxsize=128)
def _start(setup: Callable, request: Callable, running: Callable, cfg):
    """``setup``, then the first request and running flag: one program (`run_host`'s
    ``begin`` folded in, one compile fewer before the first product)."""

    def start(*args):
        s = setup(cfg, *args)
        return s, request(cfg, s), running(cfg, s)

    return jax.jit(start, compiler_options=quick_options())


@quick_jit(static_argnames=("rows", "cut_rows"))
def _user_layout(like, bases, vectors, cut, rows=None, cut_rows=()):
    """Bases (cut to ``rows``) and vectors in ``like``'s layout; ``cut[i]`` to ``cut_rows[i]``."""
    space = _space.Space(like, "concat")
    return ([space.unflatten_basis(X[:rows]) for X in bases],
            [space.unflatten(x) for x in vectors],
            [c[:r] for c, r in zip(cut, cut_rows, strict=True)])


@functools.cache
def ahead() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that compiles an answer-now call's later programs ahead of their use."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="curvlib-ahead")


def precompile(jitted, *args, **static) -> None:
    """Trace, lower and compile ``jitted`` for ``args`` (its call then finds the executable).

    Errors are left to the call itself, which raises them where they belong.
    """
    try:
        jitted.lower(*args, **static).compile()
    except Exception:  # noqa: BLE001  (the call that follows reports it)
        pass


def solve_now(setup, request, update, running, finish, cfg, matvec, v0, key, *args,
              bases: tuple = (), vectors: tuple = (), cut: dict | None = None,
              rows: int | None = None, report: Callable | None = None,
              host_rows: int | None = None):
    """An algorithm's ``finish(run(setup(v0, key, *args)))``, answered without its fused compile.

    The state machine runs on ``v0`` ravelled into one vector (the ``concat``
    layout the fused program uses too; ``cfg.layout`` becomes ``"identity"``), so
    its steps are programs of the size and dtype only: compiled once per
    session (and per persistent cache) for every model of that size, each with
    less backend optimisation (`QUICK`), and driven from the host (`run_host`).
    The model's product is compiled alone. ``setup(cfg, x0, key, *args, seed)``
    receives the seed the fused program draws from ``v0`` (or ``key``), so the
    random directions are the same; the result fields named in ``bases``
    (leading axis) and ``vectors`` return to ``v0``'s layout. With ``rows``, the
    bases keep their first ``rows`` rows, and each field of ``cut`` (a mapping of
    field name to rows) its first rows (for steps keyed on a size class that answer
    for its whole capacity), in the same small program. Same arithmetic as the
    fused program: the same answer to rounding, the same certificate. ``report``
    feeds the progress bar (`run_host`).

    ``host_rows``: for an algorithm written against `curvlib._xp.xp`, the number of
    vectors its state stores. When they fit in `HOST_MAX_ENTRIES` numbers (`on_host_ok`),
    the steps run on NumPy (`_solve_on_host`): nothing but the product compiles.
    """
    flat = cfg._replace(layout="identity")
    cut = cut or {}
    if host_rows is not None and on_host_ok(v0, host_rows):
        return _solve_on_host(setup, request, update, running, finish, flat, matvec, v0, key,
                              args, bases, vectors, cut, rows, report)
    # the model's product, `finish` and the return to v0's layout compile on a second thread
    # while this one traces and compiles the loop's steps (XLA compiles without Python's
    # lock: on two cores the first answer waits for the longest chain, not for the sum)
    x0, seed = _flat_start(v0, key)
    product_ready = ahead().submit(precompile, _space.flat_product, matvec, v0, x0)
    state, *first = _start(setup, request, running, flat)(x0, None, *args, seed)
    end = _jitted(finish, flat, True)
    finish_ready = ahead().submit(_precompile_end, end, state, v0, bases, vectors, cut, rows)
    # the loop's step compiles here meanwhile (the product's output is shaped like x0)
    precompile(_host_steps(request, update, running, flat, True)[1], state, x0)
    product_ready.result()
    product = functools.partial(_space.flat_product, matvec, v0)
    state = run_host(request, update, running, flat, product, state, quick=True, report=report,
                     first=first)
    finish_ready.result()
    res = end(state)
    placed = _user_layout(v0, *_fields(res, bases, vectors, cut), rows=rows,
                          cut_rows=tuple(cut.values()))
    return _placed(res, (bases, vectors, cut), placed)


# basis entries (vectors stored x their size) up to which the answer-now steps run on NumPy:
# 32 vectors of 131k numbers; there a step's Gram-Schmidt passes take about a millisecond
HOST_MAX_ENTRIES = 1 << 22
HOST_STEPS = [0]  # setups and steps run on NumPy in this process (for tests: which path ran)


def on_host_ok(v0, rows: int) -> bool:
    """Whether an answer-now call with ``rows`` stored vectors shaped like ``v0`` runs on NumPy.

    ``v0``'s leaves are float32 or float64 (one dtype: `answers_now`), and the stored
    vectors hold at most `HOST_MAX_ENTRIES` numbers. Beyond, a step's passes over the basis
    outweigh its compile, and the steps compile (`run_host` with ``quick``).
    """
    leaves = jax.tree.leaves(v0)
    if jnp.result_type(*leaves) not in (jnp.float32, jnp.float64):
        return False
    return rows * sum(int(jnp.size(x)) for x in leaves) <= HOST_MAX_ENTRIES


def _solve_on_host(setup, request, update, running, finish, cfg, matvec, v0, key, args,
                   bases, vectors, cut, rows, report):
    """`solve_now` with the algorithm's own functions run on NumPy arrays (`curvlib._xp`).

    The start vector and the seed come from the program the fused one shares
    (`_flat_start`), so the random directions are the same bits; the model's product
    compiles on the ahead thread meanwhile, and each product is one jitted call on the
    vector the NumPy state machine names. The result returns to ``v0``'s layout (on
    NumPy too) and becomes JAX arrays.
    """
    flat = jax.ShapeDtypeStruct((_tree.size(v0),), _tree.dtype(v0))
    product_ready = ahead().submit(precompile, _space.flat_product, matvec, v0, flat)
    x0, seed = jax.device_get(_flat_start(v0, key))
    args = [_to_host(a) for a in args]
    HOST_STEPS[0] += 1
    with _xp.host():
        state = setup(cfg, x0, None, *args, seed)
        x, more = request(cfg, state), running(cfg, state)
    product_ready.result()
    bar = None if report is None else _progress.bar(desc="eigsh", unit="product")
    try:
        while bool(more):
            w = np.asarray(_space.flat_product(matvec, v0, x))
            HOST_STEPS[0] += 1
            with _xp.host():
                state = update(cfg, state, w)
                x, more = request(cfg, state), running(cfg, state)
                if bar is not None:
                    _show(bar, *report(cfg, state))
    finally:
        if bar is not None:
            bar.close()
    with _xp.host():
        res = finish(cfg, state)
        placed = _user_layout.fn(v0, *_fields(res, bases, vectors, cut), rows=rows,
                                 cut_rows=tuple(cut.values()))
    return to_device(_placed(res, (bases, vectors, cut), placed), like=v0, operator=matvec)


def to_device(tree, like=None, operator=None):
    """A result computed on NumPy as JAX arrays of JAX's dtypes (int64 -> int32 without x64),
    converted on the host and put on the device in one transfer: no eager op to compile.

    Placed like ``like`` (the user's ``v0``) when its leaves are replicated over
    several devices (data parallelism: the result is replicated there too, as
    the compiled program returns it); on the one device the arrays of ``like``
    and ``operator`` are committed to, if any (a model placed on
    ``jax.devices()[3]``: there, as the compiled program returns it); on the
    default device otherwise.
    """
    def canonical(a):
        a = np.asarray(a)
        return a.astype(jax.dtypes.canonicalize_dtype(a.dtype), copy=False)

    return jax.device_put(jax.tree.map(canonical, tree),
                          _replicated_over(like) or _committed_to((like, operator)))


def _committed_to(trees):
    """The one device that the committed arrays among ``trees``' leaves live on, else
    ``None``: where a jitted call on them computes (uncommitted arrays follow committed
    ones, and alone give an uncommitted result on the default device)."""
    devices = {d for x in jax.tree.leaves(trees)
               if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.committed
               for d in x.sharding.device_set}
    return devices.pop() if len(devices) == 1 else None


def _replicated_over(like):
    """A sharding of ``like``'s leaves when all are replicated on the same several devices."""
    shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(like)]
    if not shardings or any(s is None or not s.is_fully_replicated for s in shardings):
        return None
    devices = {frozenset(s.device_set) for s in shardings}
    if len(devices) != 1 or len(shardings[0].device_set) < 2:
        return None
    s = shardings[0]
    if not isinstance(s, jax.sharding.NamedSharding):
        return None
    # replicated on the mesh: a spec of no axes places a result of any rank
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())


def _to_host(a):
    """An option array (a tolerance, a budget) as a NumPy array; a PRNG key as it is."""
    if isinstance(a, jax.Array) and not jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        return np.asarray(a)
    return a


def _placed(res, names: tuple, values: tuple):
    """``res`` with the fields named in each group of ``names`` replaced by `_user_layout`'s
    values for that group (bases, vectors, cut fields)."""
    return res._replace(**{n: v for ns, vs in zip(names, values, strict=True)
                           for n, v in zip(ns, vs, strict=True)})


def _fields(res, bases, vectors, cut) -> tuple[list, list, list]:
    return ([getattr(res, f) for f in bases], [getattr(res, f) for f in vectors],
            [getattr(res, f) for f in cut])


def _precompile_end(end, state, v0, bases, vectors, cut, rows) -> None:
    """`precompile` ``end`` (the algorithm's finish) and `_user_layout` for its result."""
    precompile(end, state)
    try:
        res = jax.eval_shape(end, state)
    except Exception:  # noqa: BLE001  (the call that follows reports it)
        return
    precompile(_user_layout, v0, *_fields(res, bases, vectors, cut), rows=rows,
               cut_rows=tuple(cut.values()))


def drive(request, update, running, cfg, matvec, state):
    """`run_host` for host-driven operators, `run` otherwise."""
    if is_host_driven(matvec):
        return run_host(request, update, running, cfg, matvec, state)
    return run(request, update, running, cfg, matvec, state)


class Slot:
    """The one product call site of a loop body, swappable by `while_loop`.

    A body calls ``slot(v)`` where it would call ``matvec(v)``; on the host
    path `while_loop` traces the body twice, once with a slot that
    records ``v`` and once with one that returns the product computed outside.
    """

    def __init__(self, matvec: Callable):
        self.matvec = matvec
        self._fn = matvec

    def __call__(self, v):
        return self._fn(v)

    def _trace_with(self, fn, body, s):
        self._fn = fn
        try:
            return body(s)
        finally:
            self._fn = self.matvec


def while_loop(cond, body, init, *, host: bool, slot: Slot | None = None):
    """``lax.while_loop``, or for a host-driven operator the same loop run from Python.

    For algorithms written as one loop body (CG, power iteration) whose product
    goes through ``slot``: with a host-driven product the body cannot be traced
    whole, so each iteration is split at the product into two jitted programs,
    the part that names the vector (the body traced with a recording slot; the
    rest is dead code) and the whole body given the product. Both are traced
    into programs keyed by what they compute, the call's constants their inputs
    (`curvlib._compile.traced_program`), so a second call with equal shapes and
    options compiles nothing; the work between two products is never dispatched
    op by op. Without a slot the body runs eagerly.
    """
    if not host:
        return jax.lax.while_loop(cond, body, init)
    _validate.concrete(init, "init", loop=True)
    state = init
    if slot is None:
        while bool(cond(state)):
            state = body(state)
        return state

    def request(s):
        seen = []

        def record(v):
            seen.append(v)
            return jax.tree.map(jax.numpy.zeros_like, v)

        slot._trace_with(record, body, s)
        if len(seen) != 1:
            raise RuntimeError(f"a loop body must call its product once; it called it {len(seen)}"
                               " times.")
        return seen[0]

    def update(s, w):
        return slot._trace_with(lambda v: w, body, s)

    # each traced once per call into a program keyed by what it computes (the call's
    # constants its inputs): a second call with equal shapes and options compiles nothing
    req = _compile.traced_program(request, state)
    more = _compile.traced_program(cond, state)
    run, upd = _compile.run_program, None
    while bool(run(more, state)):
        w = slot.matvec(run(req, state))
        if upd is None:  # (traced once the product's dtype is known)
            upd = _compile.traced_program(lambda a: update(*a), (state, w))
        state = run(upd, (state, w))
    return state
