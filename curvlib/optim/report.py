"""Reports of `curvlib.track_curvature`: history columns, a text table, a figure.

Nothing here runs inside a training step: these functions take the
[`TrackCurvatureInfo`][curvlib.TrackCurvatureInfo] read out of optimiser states
([`curvlib.curvature_info`][curvlib.curvature_info]) and turn them into NumPy columns
([`curvature_history`][curvlib.curvature_history]), a plain-text table
([`format_curvature_table`][curvlib.format_curvature_table]) or a matplotlib figure
([`plot_curvature`][curvlib.plot_curvature]; matplotlib is imported when called, and the backend is
left to the caller).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from curvlib import _validate
from curvlib.optim.track import TrackCurvatureInfo, curvature_info

COLUMNS = (
    "step", "loss", "eigenvalues", "residual_norms", "trace", "trace_stderr",
    "grad_fraction", "grad_norm", "num_matvecs", "eigsh_matvecs", "converged", "skipped",
)


def _column(info: TrackCurvatureInfo, c: str):
    """Column ``c`` of ``info`` (the ``step`` column is the info's ``count`` field)."""
    return np.asarray(getattr(info, "count" if c == "step" else c))


def _stack(records: Any) -> dict[str, np.ndarray]:
    """The info columns of ``records`` with a leading time axis (one entry per record)."""
    if isinstance(records, Iterator):
        records = list(records)  # a generator of records
    if isinstance(records, Sequence) and not isinstance(records, (list, str, TrackCurvatureInfo)):
        try:  # one state (an optax chain's, a TrackCurvatureState) is a tuple too
            records = curvature_info(records)
        except (KeyError, ValueError, TypeError):
            records = list(records)  # a tuple or a deque of records
    if isinstance(records, list):
        infos = [r if isinstance(r, TrackCurvatureInfo) else curvature_info(r) for r in records]
        if not infos:
            raise ValueError("`records` is empty; expected states or infos appended per step.")
        return {c: np.stack([_column(i, c) for i in infos]) for c in COLUMNS}
    info = curvature_info(records)
    stacked = {c: _column(info, c) for c in COLUMNS}
    if stacked["step"].ndim == 0:
        stacked = {c: v[None] for c, v in stacked.items()}
    return stacked


def curvature_history(records: Any) -> dict[str, np.ndarray]:
    """Collect tracked values over a run into NumPy columns, one row per refresh.

    Args:
      records: a sequence (list, tuple, ``collections.deque``) or an iterator of optimiser
        states or [`TrackCurvatureInfo`][curvlib.TrackCurvatureInfo]
        (e.g. ``curvature_info(state)`` appended after every step; flax nnx
        optimizer states are read out by [`curvlib.curvature_info`][curvlib.curvature_info], so
        rows are never aliases of the last step), or one info/state whose
        leaves carry a leading time axis (the stacked output of ``lax.scan``).
        Rows that repeat a step (the values held between refreshes) or precede
        the first refresh are dropped.

    Returns:
      A dict of arrays with one row per successful refresh, ordered by step: ``step``,
      ``loss``, ``sharpness`` (``eigenvalues[:, 0]``), ``eigenvalues``
      (``(T, k)``), ``residual_norms``, ``trace``, ``trace_stderr``,
      ``grad_fraction``, ``grad_norm``, ``num_matvecs``, ``eigsh_matvecs``,
      ``converged``, ``skipped`` (a later refresh met a non-finite value and was
      skipped while this row's values were held: the refreshes between this row and
      the next failed; skipped refreshes before the first successful one leave no row).
      ``pandas.DataFrame({c: h[c] for c in ...})`` or
      [`format_curvature_table`][curvlib.format_curvature_table] turn it into a table.

    Raises:
      ValueError: for an empty sequence, or vmapped records (index one seed first).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, curvlib
      >>> opt = optax.chain(curvlib.track_curvature(2, 1, key=jax.random.PRNGKey(0),
      ...                                           num_probes=0), optax.sgd(0.1))
      >>> loss = lambda p: jnp.sum(jnp.array([4.0, 1.0]) * p ** 2)
      >>> @jax.jit
      ... def step(p, state):
      ...     u, state = opt.update(jax.grad(loss)(p), state, p, value_fn=loss)
      ...     return optax.apply_updates(p, u), state
      >>> p = jnp.ones(2); state = opt.init(p); infos = []
      >>> for _ in range(5):
      ...     p, state = step(p, state)
      ...     infos.append(curvlib.curvature_info(state))
      >>> h = curvlib.curvature_history(infos)
      >>> h["step"].tolist(), h["sharpness"].round(3).tolist()
      ([0, 2, 4], [8.0, 8.0, 8.0])
    """
    stacked = _stack(records)
    if stacked["step"].ndim != 1:
        raise ValueError(
            "expected one run (a leading time axis only); for vmapped runs index one "
            f"seed first (step has shape {stacked['step'].shape})."
        )
    steps = stacked["step"]
    _, first = np.unique(steps, return_index=True)
    rows = np.sort(first[steps[first] >= 0])
    rows = rows[np.argsort(steps[rows], kind="stable")]
    out = {c: v[rows] for c, v in stacked.items()}
    # a skipped refresh keeps the last successful one's step and values, flagged: the
    # first record of a step is the measurement, a later flagged one the failure after it
    out["skipped"] = np.array([bool(np.any(stacked["skipped"][steps == s])) for s in out["step"]],
                              bool)
    out["sharpness"] = out["eigenvalues"][:, 0]
    return out


TABLE_COLUMNS = ("step", "loss", "sharpness", "trace", "grad_fraction", "num_matvecs")


def format_curvature_table(history: dict[str, np.ndarray], max_rows: int | None = None) -> str:
    """A plain-text table of `curvature_history`, one line per refresh (83 columns).

    Args:
      history: the output of [`curvature_history`][curvlib.curvature_history].
      max_rows: print at most this many rows (the first ones; ``>= 0``).

    Returns:
      The table, a header line and one line per row.

    Examples:
      >>> import numpy as np, curvlib
      >>> h = {"step": np.array([0, 10]), "loss": np.array([1.0, 0.5]),
      ...      "sharpness": np.array([8.0, 9.5]), "trace": np.array([20.0, 21.0]),
      ...      "grad_fraction": np.array([0.9, 0.7]), "num_matvecs": np.array([30, 12])}
      >>> print(curvlib.format_curvature_table(h))  # doctest: +NORMALIZE_WHITESPACE
         step  loss  sharpness  trace  grad_fraction  num_matvecs
            0     1          8     20            0.9           30
           10   0.5        9.5     21            0.7           12
    """
    max_rows = _validate.static_int(max_rows, "max_rows", minimum=0, optional=True)
    lines = [" ".join(f"{c:>13}" for c in TABLE_COLUMNS)]
    n = len(history["step"]) if max_rows is None else min(max_rows, len(history["step"]))
    for i in range(n):
        cells = []
        for c in TABLE_COLUMNS:
            v = history[c][i]
            cells.append(f"{int(v):>13d}" if np.issubdtype(np.asarray(v).dtype, np.integer)
                         else f"{float(v):>13.5g}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def plot_curvature(
    history: dict[str, np.ndarray],
    *,
    learning_rate: float | None = None,
    axes: Sequence[Any] | None = None,
):
    """Plot a `curvature_history`: loss, top-k eigenvalues (with ``2/eta``), trace, alignment.

    The loss panel has a log scale when every finite loss is positive, else a
    linear one (a log axis would hide a loss ``<= 0``).

    The trace panel draws the estimate with error bars of one standard error
    (``trace_stderr``, when the history has it); the estimate is whatever
    ``trace_method`` the tracker used (the deflated Hutchinson estimator by
    default).

    Args:
      history: the output of [`curvature_history`][curvlib.curvature_history].
      learning_rate: if given (``> 0``), the edge-of-stability line ``2 / learning_rate``
        is drawn on the eigenvalue panel.
      axes: four matplotlib axes to draw on (a sequence, or an array of them such as
        ``plt.subplots(2, 2)[1]``, in reading order); a new 1 x 4 figure by default.

    Returns:
      The matplotlib figure.

    Examples:
      >>> import matplotlib; matplotlib.use("Agg")  # a script without a display
      >>> import numpy as np, curvlib
      >>> h = {"step": np.array([0, 10, 20]), "loss": np.array([1.0, 0.5, 0.3]),
      ...      "eigenvalues": np.array([[8.0, 3.0], [9.0, 3.5], [9.5, 3.6]]),
      ...      "trace": np.array([20.0, 21.0, 21.5]), "trace_stderr": np.array([1.0, 0.8, 0.9]),
      ...      "grad_fraction": np.array([0.9, 0.7, 0.6])}
      >>> fig = curvlib.plot_curvature(h, learning_rate=0.2)
      >>> [ax.get_title() for ax in fig.axes][2]
      'Hessian trace (± 1 s.e.)'
    """
    import matplotlib.pyplot as plt

    _validate.number(learning_rate, "learning_rate", minimum=0, exclusive=True, optional=True)
    if axes is None:
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    else:
        axes = list(np.ravel(np.asarray(axes, dtype=object)))  # plt.subplots(2, 2)'s grid too
        if len(axes) != 4:
            raise ValueError(f"`axes` must be four matplotlib axes; got {len(axes)}.")
        fig = axes[0].figure
    s = history["step"]
    loss = np.asarray(history["loss"], np.float64)
    axes[0].plot(s, loss)
    finite = loss[np.isfinite(loss)]
    if finite.size and np.all(finite > 0):  # a log axis draws no loss <= 0
        axes[0].set_yscale("log")
    axes[0].set_title("loss")
    ev = history["eigenvalues"]
    for i in range(ev.shape[1]):
        axes[1].plot(s, ev[:, i], lw=1.5 if i == 0 else 0.8,
                     label="sharpness" if i == 0 else None)
    if learning_rate is not None:
        axes[1].axhline(2.0 / learning_rate, ls="--", c="k", label=r"$2/\eta$")
    axes[1].set_title(f"top-{ev.shape[1]} Hessian eigenvalues")
    axes[1].legend()
    stderr = history.get("trace_stderr")
    axes[2].errorbar(s, history["trace"], yerr=stderr, capsize=2)
    axes[2].set_title("Hessian trace (± 1 s.e.)" if stderr is not None else "Hessian trace")
    axes[3].plot(s, history["grad_fraction"])
    axes[3].set_ylim(0, 1.05)
    axes[3].set_title("gradient fraction in top-k space")
    for a in axes:
        a.set_xlabel("step")
    fig.tight_layout()
    return fig
