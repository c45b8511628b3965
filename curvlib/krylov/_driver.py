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

import functools
from collections.abc import Callable
from typing import Any

import jax

from curvlib._compile import is_host_driven  # noqa: F401  (the operator property)

PyTree = Any


def run(request: Callable, update: Callable, running: Callable, cfg, matvec: Callable, state):
    """``while running: state = update(state, matvec(request(state)))``: one ``lax.while_loop``."""

    def body(s):
        return update(cfg, s, matvec(request(cfg, s)))

    return jax.lax.while_loop(lambda s: running(cfg, s), body, state)


# XLA options of the answer-now steps (`run_host` with ``quick``): they run only until the
# fused program is compiled, so they trade run-time optimisation for half the compile time.
QUICK = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=128)
def _jitted(fn: Callable, cfg, quick: bool = False):
    return jax.jit(functools.partial(fn, cfg), compiler_options=QUICK if quick else None)


def run_host(request: Callable, update: Callable, running: Callable, cfg, matvec: Callable,
             state, *, quick: bool = False):
    """The loop of `run` driven from Python, for a host-driven ``matvec``.

    ``request``, ``update`` and ``running`` are module-level functions and
    ``cfg`` is hashable, so each is compiled once per configuration and
    shapes. One host synchronisation per product (``running``), which a
    product streamed from the host pays anyway. ``quick`` compiles the steps
    with less backend optimisation (`QUICK`): for the answer-now path of an
    eager call, which runs only until its fused program is ready.
    """
    req, upd = _jitted(request, cfg, quick), _jitted(update, cfg, quick)
    run_ = _jitted(running, cfg, quick)
    while bool(run_(state)):
        state = upd(state, matvec(req(state)))
    return state


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
    rest is dead code) and the whole body given the product. Both close over
    the call's constants, so they compile once per call; the work between two
    products is never dispatched op by op. Without a slot the body runs
    eagerly.
    """
    if not host:
        return jax.lax.while_loop(cond, body, init)
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

    req, upd, more = jax.jit(request), jax.jit(update), jax.jit(cond)
    while bool(more(state)):
        state = upd(state, slot.matvec(req(state)))
    return state
