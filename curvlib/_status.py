"""One status vocabulary for every algorithm result and every transform ``Info``.

Every result curvlib returns (``EigshResult``, ``LanczosResult``, ``CGResult``, ...,
``NewtonCGInfo``, ``KfacInfo``, the Monte Carlo estimates) reports through the same fields:

- ``converged``: the algorithm did what was asked (tolerance met, certificate given);
- ``finite``: every input and every product it saw was finite;
- ``num_matvecs``: operator products used;
- ``status``: one ``int32`` code from [`Status`][curvlib.Status], whose message
  [`status_message`][curvlib.status_message] returns.

The codes are ordered by precedence: when several things happened, the status is the most
serious one (`from_flags`). Inside ``jax.jit`` the status is an array like every other
field; an eager user who wants an exception calls [`raise_if_failed`][curvlib.raise_if_failed] on
the result.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from curvlib._xp import xp


class Status:
    """Status codes shared by every curvlib result (``result.status``).

    Attributes:
      SUCCESS: the requested tolerance was met (or the result is exact).
      MAX_STEPS: the product or step budget ran out before the tolerance was met.
      BREAKDOWN: the Krylov recursion met an invariant subspace that left the answer
        incomplete (e.g. fewer eigenpairs exist in the reachable space than asked for).
      NONFINITE: an input, a product or a step was NaN or infinite.
      NEGATIVE_CURVATURE: a direction of non-positive curvature was met where positive
        curvature was assumed (CG's Steihaug exit; informational for Newton-CG).
      STALLED: progress stopped without meeting the tolerance (a line search's step fell
        below its floor, a step was rejected).

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib import Status, cg
      >>> int(cg(lambda v: 2.0 * v, jnp.ones(3)).status) == Status.SUCCESS
      True
      >>> d = jnp.arange(1.0, 9.0)  # eight distinct eigenvalues: CG needs eight steps
      >>> int(cg(lambda v: d * v, jnp.ones(8), max_steps=2).status) == Status.MAX_STEPS
      True
    """

    SUCCESS = 0
    MAX_STEPS = 1
    BREAKDOWN = 2
    NONFINITE = 3
    NEGATIVE_CURVATURE = 4
    STALLED = 5


_MESSAGES = (
    "success",
    "the product or step budget ran out before the tolerance was met",
    "Krylov breakdown: an invariant subspace left the answer incomplete",
    "a non-finite (NaN or inf) input, product or step was met",
    "negative curvature: a direction with non-positive curvature was met",
    "stalled: progress stopped before the tolerance was met",
)

_NAMES = ("SUCCESS", "MAX_STEPS", "BREAKDOWN", "NONFINITE", "NEGATIVE_CURVATURE", "STALLED")


def status_message(code) -> str:
    """The human message of a status code (a Python int or a concrete array).

    For an array of codes (a ``vmap``-ed result) the message of the most serious one,
    with how many entries carry it.

    Examples:
      >>> import numpy as np
      >>> from curvlib import Status, status_message
      >>> status_message(Status.MAX_STEPS)
      'MAX_STEPS: the product or step budget ran out before the tolerance was met'
      >>> status_message(np.array([0, 3, 0]))[:35]
      'NONFINITE (1 of 3 entries): a non-f'
    """
    codes = np.asarray(code)
    if codes.size == 0 or not np.issubdtype(codes.dtype, np.integer) or np.any(
            (codes < 0) | (codes >= len(_MESSAGES))):
        raise ValueError(f"`code` must be curvlib Status codes in [0, {len(_MESSAGES) - 1}]; "
                         f"got {code!r}.")
    if codes.size == 1:
        c = int(codes.reshape(()))
        return f"{_NAMES[c]}: {_MESSAGES[c]}"
    c = int(np.asarray(worst(*codes.ravel())))
    return (f"{_NAMES[c]} ({int(np.sum(codes == c))} of {codes.size} entries): "
            f"{_MESSAGES[c]}")


def from_flags(*, finite=True, converged=True, breakdown=False, negative_curvature=False,
               stalled=False):
    """The status code of a run from its flags, most serious first (traceable).

    Precedence: ``NONFINITE`` > ``NEGATIVE_CURVATURE`` > ``BREAKDOWN`` > ``STALLED`` >
    ``MAX_STEPS`` (not ``converged``) > ``SUCCESS``. A flag may be a Python bool or a
    (possibly batched) array; the result is an ``int32`` array of the broadcast shape.
    """
    code = xp.where(xp.asarray(converged), Status.SUCCESS, Status.MAX_STEPS)
    code = xp.where(xp.asarray(stalled), Status.STALLED, code)
    code = xp.where(xp.asarray(breakdown), Status.BREAKDOWN, code)
    code = xp.where(xp.asarray(negative_curvature), Status.NEGATIVE_CURVATURE, code)
    code = xp.where(xp.asarray(finite), code, Status.NONFINITE)
    return code.astype(xp.int32)


class CurvatureError(RuntimeError):
    """Raised by `raise_if_failed` for a result whose status is not a success.

    Attributes:
      status: the offending code(s) (a NumPy array).
      result: the result object, so a caller can still inspect it.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib import CurvatureError, cg, raise_if_failed
      >>> try:
      ...     raise_if_failed(cg(lambda v: jnp.nan * v, jnp.ones(3)))
      ... except CurvatureError as e:
      ...     print(e)
      CGResult failed: NONFINITE: a non-finite (NaN or inf) input, product or step was met
    """

    def __init__(self, message: str, status, result):
        super().__init__(message)
        self.status = status
        self.result = result


def raise_if_failed(result: Any, *, allow=()):
    """Return ``result`` if its ``status`` is ``SUCCESS`` (or in ``allow``), else raise.

    The opt-in raise for eager code: every curvlib result and ``Info`` carries a
    ``status`` field. Batched results (e.g. under ``vmap``) fail if any entry fails.
    Do not call it inside ``jax.jit`` (the status is traced there; check it after the
    call instead).

    Args:
      result: a curvlib result or ``Info`` (anything with a ``status`` attribute), or a
        mapping of them ([`curvlib.block_eigsh`][curvlib.block_eigsh]'s results per block):
        each is checked, and the error names the first failing key.
      allow: codes that count as success too, e.g. ``(Status.NEGATIVE_CURVATURE,)``
        for a CG solve whose Steihaug exit the caller handles.

    Returns:
      ``result`` unchanged.

    Raises:
      CurvatureError: naming the result's type and the message of the most serious
        failing code (``status_message``'s precedence).
      TypeError: if ``result`` has no ``status`` field, or it is traced.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib import cg, raise_if_failed
      >>> res = raise_if_failed(cg(lambda v: 2.0 * v, jnp.ones(3)))
      >>> res.x.tolist()
      [0.5, 0.5, 0.5]
    """
    if isinstance(result, Mapping) and not hasattr(result, "status"):
        for name, item in result.items():
            try:
                raise_if_failed(item, allow=allow)
            except CurvatureError as e:
                raise CurvatureError(f"[{name!r}] {e}", e.status, result) from None
        return result
    if getattr(result, "status", None) is None:
        raise TypeError(f"`result` must be a curvlib result with a `status` field; got "
                        f"{type(result).__name__}"
                        f"{' whose status is None' if hasattr(result, 'status') else ''}.")
    known = tuple(range(Status.STALLED + 1))
    if isinstance(allow, (int, np.integer)) or any(
            isinstance(c, (bool, str)) or c not in known for c in allow):
        raise ValueError(f"`allow` must be a sequence of curvlib.Status codes (e.g. "
                         f"`(Status.NEGATIVE_CURVATURE,)`); got {allow!r}.")
    try:
        codes = np.asarray(result.status)
    except Exception as e:  # a tracer
        raise TypeError("`raise_if_failed` needs a concrete result: call it outside "
                        "`jax.jit` (on the jitted function's output).") from e
    ok = np.isin(codes, (Status.SUCCESS, *allow))
    if not np.all(ok):
        bad = [int(c) for c in np.unique(codes[~ok])]
        named = bad[0] if len(bad) == 1 else int(worst(*bad))  # the most serious, as
        n_bad = int(np.size(ok) - np.count_nonzero(ok))  # status_message names it
        where = "" if codes.ndim == 0 else f" ({n_bad} of {codes.size} entries)"
        raise CurvatureError(f"{type(result).__name__} failed{where}: {status_message(named)}",
                             codes, result)
    return result


def worst(*codes):
    """The most serious of several status codes (by `from_flags`'s precedence; traceable).

    Examples:
      >>> from curvlib._status import Status, worst
      >>> int(worst(Status.MAX_STEPS, Status.NONFINITE, Status.STALLED))
      3
    """
    codes = [jnp.asarray(c) for c in codes]
    has = lambda s: functools.reduce(jnp.logical_or, [c == s for c in codes])
    return from_flags(finite=~has(Status.NONFINITE), converged=~has(Status.MAX_STEPS),
                      breakdown=has(Status.BREAKDOWN),
                      negative_curvature=has(Status.NEGATIVE_CURVATURE),
                      stalled=has(Status.STALLED))
