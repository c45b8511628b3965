"""Conjugate gradients with damping and a negative-curvature (Steihaug) exit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from curvlib import _tree

PyTree = Any


class CGResult(NamedTuple):
    """Output of :func:`cg`.

    Attributes:
      x: the approximate solution of ``(A + damping I) x = b``; always finite.
      num_steps: CG iterations taken (one product each).
      residual_norm: ``||b - (A + damping I) x||`` from the recurrence.
      converged: the residual met ``max(rtol ||b||, atol)``.
      negative_curvature: a direction with ``p^T (A + damping I) p <= 0`` was
        met; ``x`` is the last iterate before it (Steihaug 1983).
      curvature_direction: that direction ``p`` (zeros when none was met): a
        descent-and-negative-curvature direction a trust-region method can use.
      finite: every product was finite; if not, ``x`` is the last finite iterate.
    """

    x: PyTree
    num_steps: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array
    curvature_direction: PyTree
    finite: jax.Array


class _CGState(NamedTuple):
    x: PyTree
    r: PyTree
    z: PyTree
    p: PyTree
    rz: jax.Array
    rnorm: jax.Array
    step: jax.Array
    negcurv: jax.Array
    negdir: PyTree
    finite: jax.Array


def cg(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    *,
    x0: PyTree | None = None,
    damping=0.0,
    rtol=1e-5,
    atol=0.0,
    max_steps: int | None = None,
    preconditioner: Callable[[PyTree], PyTree] | None = None,
) -> CGResult:
    """Solve ``(A + damping I) x = b`` by (preconditioned) conjugate gradients.

    Minimises ``q(x) = 1/2 x^T (A + lambda I) x - b^T x`` over growing Krylov
    spaces (Hestenes & Stiefel 1952). ``A`` need not be definite: when a search
    direction with non-positive curvature ``p^T (A + lambda I) p <= 0`` appears,
    the iteration stops and returns the last iterate (which still decreases
    ``q``) with ``negative_curvature=True`` (Steihaug 1983) instead of stepping
    to a saddle or to infinity. A non-finite product likewise stops the loop
    with the last finite iterate and ``finite=False``.

    Cost: one product (and one preconditioner application) per step; memory:
    five vectors. Runs as one ``lax.while_loop`` (jit-, vmap- and
    grad-compatible in ``b``'s values).

    Args:
      matvec: symmetric linear operator on pytrees shaped like ``b``.
      b: right-hand side pytree.
      x0: optional warm start (e.g. the previous solve in Hessian-free).
      damping: ``lambda >= 0`` added to the diagonal (traceable).
      rtol: relative tolerance on ``||r|| / ||b||``.
      atol: absolute tolerance on ``||r||``.
      max_steps: iteration cap; default ``10 * dim`` (SciPy's choice: in floating
        point CG can need more than ``dim`` steps). May be a traced integer
        scalar (a ``jit`` argument): it only bounds the ``lax.while_loop``, so
        changing it does not recompile; a traced value is not validated, and
        one below 1 takes no steps.
      preconditioner: optional SPD ``M^{-1}`` applied to residuals.

    Returns:
      A :class:`CGResult`.

    Raises:
      ValueError: if ``x0`` does not match ``b`` or a concrete ``max_steps`` < 1.

    Examples:
      >>> import jax.numpy as jnp
      >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
      >>> x = cg(lambda v: A @ v, jnp.array([1.0, 2.0]), rtol=1e-6).x
      >>> [round(float(xi), 4) for xi in x]
      [0.0909, 0.6364]
      >>> indefinite = jnp.diag(jnp.array([1.0, -1.0]))
      >>> res = cg(lambda v: indefinite @ v, jnp.array([1.0, 1.0]))
      >>> bool(res.negative_curvature), res.curvature_direction.tolist()
      (True, [1.0, 1.0])

    References:
      T. Steihaug, *The conjugate gradient method and trust regions in large
      scale optimization*, SIAM J. Numer. Anal. 1983.
    """
    _tree.check_float_tree(b, "b")
    if x0 is None:
        x0 = _tree.zeros_like(b)
    else:
        _tree.check_same_structure(b, x0, "b", "x0")
    _tree.check_matvec(matvec, b, "b")
    if max_steps is None:
        # finite-precision CG loses conjugacy and may need more than ``dim`` steps
        max_steps = 10 * _tree.size(b)
    elif isinstance(max_steps, jax.core.Tracer):
        # a traced cap (e.g. a jit argument) only bounds the while_loop; it cannot be checked
        max_steps = jnp.asarray(max_steps)
        if max_steps.shape != () or not jnp.issubdtype(max_steps.dtype, jnp.integer):
            raise ValueError(
                f"a traced `max_steps` must be an integer scalar; got {max_steps.dtype}"
                f"{list(max_steps.shape)}."
            )
    if not isinstance(max_steps, jax.core.Tracer) and int(max_steps) < 1:
        raise ValueError(f"`max_steps` must be >= 1; got {max_steps}.")
    precond = preconditioner if preconditioner is not None else (lambda v: v)
    acc = jnp.promote_types(_tree.dtype(b), jnp.float32)

    def op(v):
        return _tree.add_scale(matvec(v), damping, v)

    bnorm = _tree.norm(b).astype(acc)
    tol = jnp.maximum(rtol * bnorm, atol)
    x0_finite = _tree.all_finite(x0)
    x0 = _tree.where(x0_finite, x0, _tree.zeros_like(b))
    r0 = _tree.sub(b, op(x0))
    fin0 = _tree.all_finite(r0)
    # if the warm start is unusable, fall back to x0 = 0
    x0 = _tree.where(fin0, x0, _tree.zeros_like(b))
    r0 = _tree.where(fin0, r0, b)
    z0 = precond(r0)
    rz0 = _tree.vdot(r0, z0).astype(acc)
    init = _CGState(
        x=x0, r=r0, z=z0, p=z0, rz=rz0, rnorm=_tree.norm(r0).astype(acc),
        step=jnp.asarray(0), negcurv=jnp.asarray(False), negdir=_tree.zeros_like(b),
        finite=_tree.all_finite(b),
    )

    def cond(s: _CGState):
        return (s.rnorm > tol) & (s.step < max_steps) & ~s.negcurv & s.finite

    def body(s: _CGState):
        Ap = op(s.p)
        finite = _tree.all_finite(Ap)
        pAp = _tree.vdot(s.p, Ap).astype(acc)
        # p = 0 only when r = 0 (exact convergence with a zero tolerance): not curvature
        negcurv = finite & (pAp <= 0) & (s.rnorm > 0)
        good = finite & ~negcurv
        alpha = s.rz / jnp.where(good, pAp, 1.0)
        x = _tree.add_scale(s.x, alpha, s.p)
        r = _tree.add_scale(s.r, -alpha, Ap)
        z = precond(r)
        rz = _tree.vdot(r, z).astype(acc)
        beta = rz / jnp.where(s.rz != 0, s.rz, 1.0)
        p = _tree.add_scale(z, beta, s.p)
        stepped = (x, r, z, p, rz, _tree.norm(r).astype(acc))
        kept = (s.x, s.r, s.z, s.p, s.rz, s.rnorm)
        # a rejected step (negative curvature, non-finite product) keeps the last iterate
        x, r, z, p, rz, rnorm = jax.tree.map(lambda a, o: jnp.where(good, a, o), stepped, kept)
        return _CGState(
            x=x, r=r, z=z, p=p, rz=rz, rnorm=rnorm, step=s.step + 1, negcurv=negcurv,
            negdir=_tree.where(negcurv, s.p, s.negdir), finite=finite,
        )

    s = jax.lax.while_loop(cond, body, init)
    return CGResult(
        x=s.x,
        num_steps=s.step,
        residual_norm=s.rnorm,
        converged=(s.rnorm <= tol) & s.finite,
        negative_curvature=s.negcurv,
        curvature_direction=s.negdir,
        finite=s.finite,
    )
