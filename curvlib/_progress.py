"""Progress bars for long eager work: `show_progress` and the bars the host loops draw.

A solve driven from the host (an eager call's answer-now path, a host-driven operator,
a streamed data set) already returns to Python once per product, so it can report
products done against the budget, and how far the wanted pairs are from converged,
at no cost beyond one scalar read per product. Compiled code never reports: inside
the user's ``jax.jit`` (or once an eager call runs its fused program) there is no host
loop, and none is added (no callbacks inside compiled loops).
"""

from __future__ import annotations

import os
import warnings

from curvlib import _validate


def _from_environment() -> bool:
    """``CURVLIB_PROGRESS=1``: on, where tqdm is installed. Without it the setting stays off,
    with a warning: on, every eager `eigsh` and streamed pass failed at its first bar with
    tqdm's ``ModuleNotFoundError`` (tqdm is optional; `show_progress` refuses it the same)."""
    if os.environ.get("CURVLIB_PROGRESS", "0") != "1":
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        warnings.warn("CURVLIB_PROGRESS=1 needs tqdm (pip install tqdm); progress bars stay "
                      "off.", stacklevel=2)
        return False
    return True


_ENABLED = _from_environment()


def show_progress(enabled: bool | None = None) -> bool:
    """Whether eager solves driven from the host show a progress bar (tqdm); off by default.

    On, an eager [`eigsh`][curvlib.eigsh] runs its host-driven path (the same algorithm
    and the same answer to rounding as the fused program, see
    [`compile_behind`][curvlib.compile_behind]) and shows the products used against the
    budget, the verification rounds and the worst relative residual bound of the wanted
    Ritz pairs at the last convergence test; streamed operators
    ([`stream_matvec`][curvlib.stream_matvec] and the other ``stream_*`` functions) show the
    batches of each pass. Calls inside the user's ``jax.jit`` never show one (there is
    no host loop to report from), nor do eager calls whose vectors are sharded or
    mixed-dtype or hold more than 2^22 numbers (they run the fused program).
    ``CURVLIB_PROGRESS=1`` in the environment turns it on at import (where tqdm is
    installed; without it, it stays off with a warning).

    Args:
      enabled: ``True`` or ``False`` to switch; ``None`` (default) only reads the setting.

    Returns:
      The setting before the call (with ``None``, the setting in force), so
      ``was = show_progress(True)`` ... ``show_progress(was)`` restores it.

    Raises:
      ImportError: ``enabled=True`` without ``tqdm`` installed (``pip install tqdm``).

    Examples:
      >>> import curvlib
      >>> curvlib.show_progress()
      False
    """
    global _ENABLED
    if enabled is not None:
        _validate.one_of(enabled, "enabled", (True, False, None))
        if enabled:
            try:
                import tqdm  # noqa: F401
            except ImportError as e:
                raise ImportError("`show_progress(True)` needs tqdm: pip install tqdm") from e
    before = _ENABLED
    if enabled is not None:
        _ENABLED = bool(enabled)
    return before


def enabled() -> bool:
    return _ENABLED


def bar(total=None, desc: str = "", unit: str = "it", leave: bool = True):
    """A tqdm bar, or ``None`` when progress is off (callers test for ``None``)."""
    if not _ENABLED:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)


def batches(iterable, desc: str = "batches"):
    """``iterable`` under a bar that closes when the pass ends; itself when progress is off."""
    if not _ENABLED:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
