"""Solver values: each Krylov algorithm's options, declared, defaulted and validated here.

A solver value is an immutable, hashable dataclass registered as a JAX pytree:
options that fix a program (a basis size, a step cap) are *static* metadata,
numeric tolerances are *leaves*, so a value can cross ``jax.jit`` and an
``optax.inject_hyperparams`` boundary with its tolerances traced. The
algorithm takes it as ``solver=``; every function built on an algorithm takes
it under the algorithm's name (``eigsh=``, ``cg=``) and forwards it, so each
option has exactly one default, the one written below.

    >>> import curvlib
    >>> opts = curvlib.Eigsh(rtol=1e-6, basis_size=30)
    >>> opts.rtol, opts.basis_size, opts.max_restarts  # the rest keep their one default
    (1e-06, 30, 1000)
    >>> curvlib.CG(max_steps=0)
    Traceback (most recent call last):
    ...
    ValueError: `max_steps` must be >= 1; got 0.

Options that depend on the problem (``k``, ``which``, the dimension) are
checked again by the algorithm when it sees the problem.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import numpy as np

from curvlib import _validate

__all__ = ["Eigsh", "CG", "PowerIteration", "Lanczos", "resolve"]


def _concrete(x) -> bool:
    """A value given by the user (not a tracer, an array or a pytree placeholder)."""
    return isinstance(x, (numbers.Number, np.generic, str))


def _int(x, name, minimum):
    if x is not None and _concrete(x):
        _validate.static_int(x, name, minimum=minimum)


def _nonneg(x, name):
    if x is not None and _concrete(x):
        if isinstance(x, str):
            raise ValueError(f"`{name}` must be a real number >= 0; got {x!r}.")
        _validate.number(x, name, minimum=0)


def _solver(data, meta):
    """Frozen dataclass + pytree with ``data`` leaves and ``meta`` static fields."""

    def deco(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)

    return deco


@_solver(data=["rtol", "max_matvecs", "max_restarts"],
         meta=["basis_size", "num_keep", "basis_dtype", "verify"])
class Eigsh:
    """Options of thick-restart Lanczos, [`curvlib.eigsh`][curvlib.eigsh].

    Attributes:
      rtol: relative residual tolerance: a Ritz pair converges when
        ``||A y - theta y|| <= max(rtol |theta|, floor)`` (see [`curvlib.eigsh`][curvlib.eigsh]);
        ``None`` is ``sqrt(eps)`` of the least precise dtype among ``v0``'s
        leaves, the basis and the operator's products, ``0`` machine precision.
        Traceable.
      basis_size: Krylov basis size ``m`` (vectors stored); ``None`` is
        ``min(dim, max(4k, 20))``. Static; ``k + 2 <= m <= dim`` is checked by eigsh
        (``k + 3`` or more for a verified answer: [`curvlib.eigsh`][curvlib.eigsh]).
      num_keep: Ritz vectors kept per restart; ``None`` is ``k + (m - k) // 2``. Static.
      max_matvecs: product budget; ``None`` is ``100 m``. Traceable.
      max_restarts: cap on thick restarts, verification rounds included: the certificate
        needs one round, so ``0`` returns unconverged (``MAX_STEPS``) unless the basis spans
        the whole space or ``verify=False``. Traceable.
      basis_dtype: dtype of the stored basis (e.g. ``jnp.bfloat16``); ``None``
        is ``v0``'s. Static.
      verify: run the verification phase (default ``True``): ``converged=True`` then
        also certifies that no copy of a wanted eigenvalue, and no eigenvalue beyond the
        wanted ones, was missed (a fresh random block, about a basis of products more).
        ``False`` stops at the first Krylov depth whose ``k`` Ritz pairs meet the
        tolerance: ``converged`` certifies the residuals only, as in ARPACK. Useful when
        repeated solves start from a good subspace (the refreshes of
        [`curvlib.track_curvature`][curvlib.track_curvature]), where the round would cost
        more than the search. Static.

    Examples:
      >>> import jax.numpy as jnp
      >>> import curvlib
      >>> A = jnp.diag(jnp.arange(1.0, 41.0))
      >>> opts = curvlib.Eigsh(rtol=1e-8, basis_size=12)
      >>> curvlib.eigsh(lambda v: A @ v, jnp.ones(40), k=2, solver=opts).eigenvalues.tolist()
      [40.0, 39.0]
      >>> curvlib.Eigsh(basis_size=0)
      Traceback (most recent call last):
      ...
      ValueError: `basis_size` must be >= 1; got 0.
    """

    rtol: Any = None
    basis_size: int | None = None
    num_keep: int | None = None
    max_matvecs: Any = None
    max_restarts: Any = 1000
    basis_dtype: Any = None
    verify: bool = True

    def __post_init__(self):
        if not isinstance(self.verify, (bool, np.bool_)):
            raise TypeError(f"`verify` must be True or False; got {self.verify!r}.")
        _nonneg(self.rtol, "rtol")
        _int(self.basis_size, "basis_size", 1)
        _int(self.num_keep, "num_keep", 1)
        _int(self.max_matvecs, "max_matvecs", 1)
        _int(self.max_restarts, "max_restarts", 0)


@_solver(data=["rtol", "atol"], meta=["max_steps"])
class CG:
    """Options of conjugate gradients, [`curvlib.cg`][curvlib.cg].

    Stops when ``||r|| <= max(rtol ||b||, atol)`` or after ``max_steps`` steps.

    Attributes:
      rtol: relative tolerance on ``||r|| / ||b||``. Traceable.
      atol: absolute tolerance on ``||r||``. Traceable.
      max_steps: iteration cap; ``None`` is ``min(10 dim, 2**31 - 3)``. Static
        ([`curvlib.cg`][curvlib.cg] also takes a traced cap as its own keyword).

    Examples:
      >>> import jax.numpy as jnp
      >>> import curvlib
      >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
      >>> inv = curvlib.inverse_matvec(lambda v: A @ v, damping=0.0, cg=curvlib.CG(rtol=1e-8))
      >>> inv(jnp.array([1.0, 2.0])).round(4).tolist()
      [0.0909, 0.6364]
    """

    rtol: Any = 1e-5
    atol: Any = 0.0
    max_steps: int | None = None

    def __post_init__(self):
        _nonneg(self.rtol, "rtol")
        _nonneg(self.atol, "atol")
        _int(self.max_steps, "max_steps", 1)


@_solver(data=["rtol"], meta=["max_matvecs", "num_iters"])
class PowerIteration:
    """Options of deflated power iteration, [`curvlib.power_iteration`][curvlib.power_iteration].

    Attributes:
      rtol: relative residual tolerance ``||A x - theta x|| <= rtol |theta|``. Traceable.
      max_matvecs: total product budget over all pairs; ``None`` is
        ``k * num_iters``. Static.
      num_iters: product cap per pair; ``None`` is 100 when ``max_matvecs`` is
        not given either, else no per-pair cap. Static.

    Examples:
      >>> import jax.numpy as jnp
      >>> import curvlib
      >>> A = jnp.diag(jnp.array([-3.0, 2.0, 1.0]))
      >>> opts = curvlib.PowerIteration(rtol=1e-6, num_iters=500)
      >>> curvlib.power_iteration(lambda v: A @ v, jnp.ones(3), solver=opts).eigenvalues.tolist()
      [-3.0]
    """

    rtol: Any = 1e-4
    max_matvecs: int | None = None
    num_iters: int | None = None

    def __post_init__(self):
        _nonneg(self.rtol, "rtol")
        _int(self.max_matvecs, "max_matvecs", 1)
        _int(self.num_iters, "num_iters", 1)


@_solver(data=[], meta=["num_matvecs", "reortho", "basis_dtype"])
class Lanczos:
    """Options of fixed-depth Lanczos, [`curvlib.lanczos`][curvlib.lanczos].

    Attributes:
      num_matvecs: Krylov depth ``m`` = products used (required). Static.
      reortho: ``"full"`` (reorthogonalise against the whole basis) or ``"none"``. Static.
      basis_dtype: dtype of the stored basis; ``None`` is ``v0``'s. Static.

    Examples:
      >>> import jax.numpy as jnp
      >>> import curvlib
      >>> A = jnp.diag(jnp.arange(1.0, 11.0))
      >>> res = curvlib.lanczos(lambda v: A @ v, jnp.ones(10), solver=curvlib.Lanczos(10))
      >>> int(res.num_matvecs), round(float(res.alphas.sum()), 4)  # trace(T) = trace(A)
      (10, 55.0)
    """

    num_matvecs: int
    reortho: str = "full"
    basis_dtype: Any = None

    def __post_init__(self):
        _int(self.num_matvecs, "num_matvecs", 1)
        if _concrete(self.reortho):
            _validate.one_of(self.reortho, "reortho", ("full", "none"))


def resolve(cls, solver, name: str = "solver", **options):
    """The solver value to run: ``solver`` (default ``cls()``) with the given ``options``.

    Options passed as ``None`` are "not given" (the value's own setting stays).

    Raises:
      TypeError: ``solver`` is not a ``cls``.
    """
    if solver is not None and not isinstance(solver, cls):
        raise TypeError(
            f"`{name}` must be a curvlib.{cls.__name__}; got {type(solver).__name__}."
        )
    given = {k: v for k, v in options.items() if v is not None}
    if solver is None:
        return cls(**given)
    return dataclasses.replace(solver, **given) if given else solver

