"""Eager argument checks shared by every layer: one rule per kind of argument.

Static integer options (``k``, ``basis_size``, ``num_probes``, ...) are all
checked by `static_int`, so they accept the same things everywhere
(Python and NumPy integers) and fail the same way (a ``ValueError`` that names
the argument, the value and the allowed range).
"""

from __future__ import annotations

import operator

import jax
import numpy as np


def static_int(x, name: str, *, minimum: int | None = None, maximum: int | None = None,
               what: str | None = None) -> int:
    """``x`` as a Python ``int`` in ``[minimum, maximum]``, else a ``ValueError`` naming ``name``.

    Accepts Python and NumPy integers (and 0-d integer NumPy arrays); rejects
    bools, floats, strings and traced values (a static option cannot be a
    ``jit`` argument: it fixes a shape or a program).

    Args:
      x: the value.
      name: the argument's name, as the user wrote it.
      minimum: smallest allowed value (inclusive), or ``None``.
      maximum: largest allowed value (inclusive), or ``None``.
      what: optional words for what the bound means (e.g. ``"the dimension of v0"``).

    Returns:
      ``int(x)``.

    Raises:
      ValueError: for a non-integer or out-of-range value.

    Examples:
      >>> import numpy as np
      >>> static_int(np.int64(3), "k", minimum=1)
      3
      >>> static_int(True, "k")
      Traceback (most recent call last):
      ...
      ValueError: `k` must be an int; got True (bool).
    """
    if isinstance(x, jax.core.Tracer):
        raise ValueError(
            f"`{name}` must be a static Python int, not a traced value: it fixes the shape of "
            f"the computation. Pass it as a Python int (under `jax.jit`, mark it static with "
            f"`static_argnames=({name!r},)` or bind it with functools.partial); curvlib's "
            "functions are compiled and cached by themselves, so an eager call is as fast as "
            "a jitted one from the second call on."
        )
    if isinstance(x, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be an int; got {x!r} (bool).")
    try:
        v = operator.index(x)
    except TypeError:
        raise ValueError(f"`{name}` must be an int; got {x!r} ({type(x).__name__}).") from None
    lo, hi = minimum, maximum
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if lo is not None and hi is not None:
            rng = f"in [{lo}, {hi}]"
        elif lo is not None:
            rng = f">= {lo}"
        else:
            rng = f"<= {hi}"
        extra = f" ({what})" if what else ""
        raise ValueError(f"`{name}` must be {rng}{extra}; got {v}.")
    return int(v)


def optional_int(x, name: str, **bounds) -> int | None:
    """``None`` or `static_int`."""
    return None if x is None else static_int(x, name, **bounds)


def one_of(x, name: str, choices) -> str:
    """``x`` if it is one of ``choices``, else a ``ValueError`` listing them."""
    if x not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}; got {x!r}.")
    return x


def nonneg_number(x, name: str):
    """A concrete real number must be finite and ``>= 0`` (a traced value is taken as is)."""
    if isinstance(x, jax.core.Tracer):
        return x
    v = np.asarray(x)
    if v.ndim != 0 or not np.isreal(v) or not np.isfinite(v) or v < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0; got {x!r}.")
    return x
