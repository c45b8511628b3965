"""The array namespace of curvlib's Krylov engines: ``jax.numpy``, or NumPy on the host.

The engines (`curvlib.krylov._band` and the state machines built on it) are written once,
against ``xp``. Traced (the fused program, the user's own ``jit``), ``xp`` is
``jax.numpy``. An eager first call on a small problem runs the very same functions on
NumPy arrays instead (inside `host`): a step then costs its arithmetic and a few
microseconds per operation, with no XLA compile at all, so the first answer waits only for
the user's product to compile (`curvlib.krylov._driver.solve_now`).

Only what the two libraries spell differently needs a helper here: functional updates
(`at_set`), branches (`cond`), ``iota``, `bitcast`, contractions with an accumulation type (NumPy
accumulates in the operands' type, which is what curvlib asks for on the host: float32
and float64 vectors only), and ``eigh`` of a non-finite matrix (NumPy raises where XLA
returns NaN).

Examples:
  >>> import jax
  >>> from curvlib._xp import at_set, host, xp
  >>> with host():
  ...     x = at_set(xp.zeros(3), 1, 5.0)
  >>> type(x).__name__, x.tolist()
  ('ndarray', [0.0, 5.0, 0.0])
  >>> isinstance(at_set(xp.zeros(3), 1, 5.0), jax.Array)
  True
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_state = threading.local()


def on_host() -> bool:
    """Whether this thread runs the engines on NumPy (inside `host`)."""
    return getattr(_state, "host", False)


@contextlib.contextmanager
def host(on: bool = True):
    """Run the engines on NumPy arrays in this thread (other threads are not affected).

    Floating-point warnings are off inside: like XLA, the engines compute both sides of a
    ``where`` and keep one (a division by zero on the side not kept is expected).
    ``host(False)`` returns to ``jax.numpy`` inside (to trace a JAX program from a step).
    """
    was = on_host()
    _state.host = on
    try:
        with np.errstate(all="ignore"):
            yield
    finally:
        _state.host = was


def _eigh(a, *args, **kwargs):
    """``numpy.linalg.eigh``, NaN for a matrix with a non-finite entry (as XLA's)."""
    if not np.all(np.isfinite(a)):
        n = a.shape[-1]
        return np.full(a.shape[:-1], np.nan, a.dtype), np.full(a.shape[:-2] + (n, n), np.nan,
                                                               a.dtype)
    return np.linalg.eigh(a)


def _accumulating(fn: Callable) -> Callable:
    """NumPy's ``fn`` taking ``jax.numpy``'s ``preferred_element_type`` (the result's dtype)."""
    def call(*args, preferred_element_type=None, **kwargs):
        out = fn(*args, **kwargs)
        return out if preferred_element_type is None else out.astype(preferred_element_type)

    return call


class _Linalg:
    eigh = staticmethod(_eigh)

    def __getattr__(self, name):  # (first use only: kept as an attribute)
        value = getattr(np.linalg, name)
        setattr(self, name, value)
        return value


class _NumPy:
    """NumPy under ``jax.numpy``'s spelling, for the few calls that differ."""

    linalg = _Linalg()
    dot = staticmethod(_accumulating(np.dot))
    vdot = staticmethod(_accumulating(np.vdot))
    tensordot = staticmethod(_accumulating(np.tensordot))

    @staticmethod
    def zeros(shape, dtype=None, out_sharding=None):
        return np.zeros(shape, dtype)

    def __getattr__(self, name):  # (first use only: kept as an attribute)
        value = getattr(np, name)
        setattr(self, name, value)
        return value


_NP = _NumPy()


class _Namespace:
    """``jax.numpy``, or NumPy inside `host` (looked up at each use: one code, two libraries)."""

    def __getattr__(self, name):
        return getattr(_NP if getattr(_state, "host", False) else jnp, name)


xp = _Namespace()


def at_set(x, idx, value, mode=None):
    """``x.at[idx].set(value, mode=mode)``; on the host a copy of ``x`` with the entries set.

    ``mode="drop"`` skips an out-of-range index (the only out-of-range writes the engines
    make: a row index equal to the row count, meaning "no write").
    """
    if not on_host():
        return x.at[idx].set(value, mode=mode)
    out = np.array(x, copy=True)
    if mode == "drop":
        first = idx[0] if isinstance(idx, tuple) else idx
        if not isinstance(first, slice) and not 0 <= int(first) < out.shape[0]:
            return out
    out[idx] = value
    return out


def cond(pred, true_fn: Callable, false_fn: Callable, *operands):
    """``jax.lax.cond``; on the host, or eagerly (``pred`` concrete), a Python ``if``.

    Only the branch taken runs. An eager ``lax.cond`` would compile a program of its
    two branches keyed on their jaxprs: branches written as closures (over an optax
    step's state) are new functions at every call, so an eager ``update`` would compile
    at every step (a tracker's refresh: seconds). Under a trace (``jit``, ``vmap``,
    ``grad``) this is ``lax.cond``.
    """
    if on_host():
        return true_fn(*operands) if bool(pred) else false_fn(*operands)
    if not isinstance(pred, jax.core.Tracer):  # (JAX arrays out, as from lax.cond: a state
        # restored as NumPy arrays leaves a skipped step as JAX arrays, as a jitted one)
        return jax.tree.map(jnp.asarray, true_fn(*operands) if bool(pred) else
                            false_fn(*operands))
    return jax.lax.cond(pred, true_fn, false_fn, *operands)


def iota(dtype, shape, dimension: int):
    """``jax.lax.broadcasted_iota``: the index along ``dimension``, broadcast to ``shape``."""
    if on_host():
        idx = np.arange(shape[dimension], dtype=dtype)
        return np.broadcast_to(idx.reshape([-1 if a == dimension else 1
                                            for a in range(len(shape))]), shape)
    return jax.lax.broadcasted_iota(dtype, shape, dimension)


def bitcast(x, dtype):
    """``jax.lax.bitcast_convert_type`` between types of one width: the same bits, retyped."""
    if on_host():
        return np.asarray(x).view(dtype)
    return jax.lax.bitcast_convert_type(x, dtype)
