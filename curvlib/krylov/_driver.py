"""Drivers for the product loop of every Krylov algorithm.

Each algorithm is written as a *reverse-communication* state machine (as
ARPACK is): ``request(cfg, state)`` names the vector to multiply,
``update(cfg, state, product)`` absorbs the product and does all the work
between two products, ``running(cfg, state)`` says whether to go on. Two
drivers run it:

* :func:`run` — one ``lax.while_loop`` whose body holds the *only* call site of
  the user's product, so the compiled program contains the model once;
* :func:`run_host` — a Python loop for *host-driven* operators (data streamed
  from the host, which cannot be traced): the product is the operator's own
  host loop over batches, while ``request``, ``update`` and ``running`` are
  each one jitted program, compiled once per configuration and shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

PyTree = Any


def is_host_driven(matvec) -> bool:
    """Whether ``matvec`` is a host-driven operator (``host_driven = True``): not traceable."""
    return bool(getattr(matvec, "host_driven", False))


def run(request: Callable, update: Callable, running: Callable, cfg, matvec: Callable, state):
    """``while running: state = update(state, matvec(request(state)))``: one ``lax.while_loop``."""

    def body(s):
        return update(cfg, s, matvec(request(cfg, s)))

    return jax.lax.while_loop(lambda s: running(cfg, s), body, state)


@functools.lru_cache(maxsize=128)
def _jitted(fn: Callable, cfg):
    return jax.jit(functools.partial(fn, cfg))


def run_host(request: Callable, update: Callable, running: Callable, cfg, matvec: Callable,
             state):
    """The loop of :func:`run` driven from Python, for a host-driven ``matvec``.

    ``request``, ``update`` and ``running`` are module-level functions and
    ``cfg`` is hashable, so each is compiled once per configuration and
    shapes. One host synchronisation per product (``running``), which a
    product streamed from the host pays anyway.
    """
    req, upd, run_ = _jitted(request, cfg), _jitted(update, cfg), _jitted(running, cfg)
    while bool(run_(state)):
        state = upd(state, matvec(req(state)))
    return state


def drive(request, update, running, cfg, matvec, state):
    """:func:`run_host` for host-driven operators, :func:`run` otherwise."""
    if is_host_driven(matvec):
        return run_host(request, update, running, cfg, matvec, state)
    return run(request, update, running, cfg, matvec, state)
