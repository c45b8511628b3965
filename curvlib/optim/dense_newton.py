r"""Exact dense Newton's method for small models, as an optax transform.

Each step forms the full curvature matrix ``C`` (the Hessian of ``value_fn``,
or the Gauss-Newton matrix of a ``(model_fn, loss_fn)`` split, see
`curvlib.optim.hessian_free`) column by column as ``vmap`` of the product
operator over the identity, takes its eigendecomposition
$C = Q \Lambda Q^\top$ and outputs

$$
p = Q\,\operatorname{diag}\!\big(1 / (\phi(\Lambda) + \lambda)\big)\,Q^\top g,
\qquad
\phi(\mu) = \begin{cases}
  \max(|\mu|, \mu_{\min}) & \texttt{"abs"} \\
  \max(\mu, \mu_{\min})   & \texttt{"clip"}
\end{cases}
$$

with the floor $\mu_{\min} = \max(\texttt{min\_eigenvalue},
\texttt{eigenvalue\_rtol}\cdot\max_i|\mu_i|)$. The default relative floor is
$n\,\epsilon$ (``n`` parameters, ``epsilon`` the dtype's machine
epsilon): the numerical-rank threshold of a symmetric eigensolver
(``numpy.linalg.matrix_rank``'s default), below which a computed eigenvalue is
indistinguishable from zero, so null directions of a singular Hessian (e.g.
softmax's shift invariance) do not blow up the step while every eigenvalue the
dtype resolves is used as it is (Brown's badly scaled function, condition
$10^{12}$, is solved in float64). Both floors can be raised or lowered
(``0`` disables them); a direction whose modified eigenvalue plus ``damping``
is exactly zero is left out of the step (the pseudo-inverse). Indefinite
Hessians give a descent direction (eigenvalue modification,
Nocedal & Wright 2006, sec. 3.4; the absolute value is the saddle-free Newton
of Dauphin et al. 2014). With a positive definite ``C`` and ``damping=0`` this is
the exact Newton step.

Cost per step: ``n`` curvature products (vmapped), an ``O(n^3)`` symmetric
eigendecomposition, ``O(n^2)`` memory, for ``n`` parameters; above
``max_params`` the transform refuses with a ``ValueError`` at ``init``.

References:
  J. Nocedal and S. Wright, *Numerical Optimization*, 2nd ed., 2006, sec. 3.4.
  Y. Dauphin et al., *Identifying and attacking the saddle point problem in
  high-dimensional non-convex optimization*, NeurIPS 2014.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from curvlib import _deprecation, _tree, _validate
from curvlib._compile import weak_cache
from curvlib._status import Status, from_flags
from curvlib.optim import _common

PyTree = Any

MODIFICATIONS = ("abs", "clip")


class NewtonInfo(NamedTuple):
    """Diagnostics of the last [`scale_by_newton`][curvlib.scale_by_newton] step.

    Attributes:
      min_eigenvalue: smallest eigenvalue of the unmodified curvature (NaN on a
        skipped step).
      max_eigenvalue: largest eigenvalue of the unmodified curvature (NaN on a
        skipped step).
      num_modified: eigenvalues below the floor (raised to it, or to ``|mu|``; 0 on a
        skipped step).
      skipped: the loss, gradient or curvature was non-finite; the step output
        zeros.
      loss: the loss at the incoming ``params``.
      converged: the Newton system was solved (a dense eigendecomposition: exact
        whenever ``finite``) to a non-zero step, or the gradient is zero.
      finite: the loss, gradient, curvature and step were finite (``~skipped``).
      num_matvecs: curvature products of the step (``n``, one per parameter).
      status: the [`curvlib.Status`][curvlib.Status] code: ``NONFINITE`` (skipped);
        ``STALLED`` for a zero step at a non-zero gradient (every direction dropped,
        as on a piecewise-linear loss, whose curvature is zero); else ``SUCCESS``.
        Inside [`newton`][curvlib.newton] (or any alias with a line search)
        ``STALLED`` when the line search failed to decrease the loss (its step
        fell to its floor, or the accepted step did not lower the loss): a step
        that would not lower the loss is withheld (zeros); after a search that failed
        far above the loss's precision floor (a Newton step far too long) the default
        search goes on halving from there at the next step. STALLED step after step is
        the precision floor of the loss's dtype. The parameters and state stay usable.
    """

    min_eigenvalue: jax.Array
    max_eigenvalue: jax.Array
    num_modified: jax.Array
    skipped: jax.Array
    loss: jax.Array
    converged: jax.Array = True
    finite: jax.Array = True
    num_matvecs: jax.Array = 0
    status: jax.Array = Status.SUCCESS


class ScaleByNewtonState(NamedTuple):
    """State of [`scale_by_newton`][curvlib.scale_by_newton]: a step counter and `NewtonInfo`.

    Attributes:
      count: steps taken.
      info: the [`NewtonInfo`][curvlib.NewtonInfo] diagnostics of the last step.
    """

    count: jax.Array
    info: NewtonInfo


def dense_curvature(matvec: Callable, params: PyTree) -> jax.Array:
    """The ``(n, n)`` matrix of ``matvec`` in the ravelled basis of ``params`` (symmetrised).

    Cost: ``n`` products (``vmap`` over the identity), ``O(n^2)`` memory.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib.optim.dense_newton import dense_curvature
      >>> f = lambda p: p["a"] ** 2 * p["b"][0] + p["b"][1] ** 2
      >>> p = {"a": jnp.asarray(1.0), "b": jnp.array([3.0, 0.0])}
      >>> hvp = lambda v: jax.jvp(jax.grad(f), (p,), (v,))[1]
      >>> dense_curvature(hvp, p).tolist()
      [[6.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]]
    """
    flat, unravel = ravel_pytree(params)
    eye = jnp.eye(flat.size, dtype=flat.dtype)
    cols = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0])(eye)
    return 0.5 * (cols + cols.T)


def modified_newton_direction(C, g, damping, min_eigenvalue, modification="abs",
                              eigenvalue_rtol=None):
    """``Q diag(1/(phi(Lambda) + damping)) Q^T g`` and the eigenvalues of ``C``.

    Components whose modified eigenvalue plus ``damping`` is zero are dropped
    (the pseudo-inverse on an exactly singular, undamped, unfloored ``C``).
    Cost: one ``O(n^3)`` symmetric eigendecomposition.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim.dense_newton import modified_newton_direction
      >>> C = jnp.diag(jnp.array([-2.0, 4.0])); g = jnp.array([1.0, 1.0])
      >>> p, w = modified_newton_direction(C, g, 0.0, 0.0, "abs")
      >>> p.tolist(), w.tolist()  # |-2| = 2: a descent direction, g^T p > 0
      ([0.5, 0.25], [-2.0, 4.0])
    """
    w, Q = jnp.linalg.eigh(C)
    floor = eigenvalue_floor(w, min_eigenvalue, eigenvalue_rtol)
    mod = jnp.abs(w) if modification == "abs" else w
    wt = jnp.maximum(mod, floor) + damping
    coef = jnp.where(wt > 0, (Q.T @ g) / jnp.where(wt > 0, wt, 1.0), 0.0)
    return Q @ coef, w


def default_eigenvalue_rtol(n: int, dtype) -> float:
    """``n * eps``: the numerical-rank threshold of an ``n x n`` symmetric eigensolve.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim.dense_newton import default_eigenvalue_rtol
      >>> default_eigenvalue_rtol(10, jnp.float32) == 10 * float(jnp.finfo(jnp.float32).eps)
      True
    """
    return float(n * jnp.finfo(dtype).eps)


def eigenvalue_floor(w, min_eigenvalue, eigenvalue_rtol=None):
    """``max(min_eigenvalue, eigenvalue_rtol * max|w|)`` (default ``eigenvalue_rtol = n eps``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim.dense_newton import eigenvalue_floor
      >>> w = jnp.array([2.0, 2e12])  # Brown's badly scaled Hessian at its minimiser
      >>> float(eigenvalue_floor(w, 0.0, 1e-6)), float(eigenvalue_floor(w, 5.0, 0.0))
      (2000000.0, 5.0)
    """
    if eigenvalue_rtol is None:
        eigenvalue_rtol = default_eigenvalue_rtol(w.shape[0], w.dtype)
    rel = jnp.asarray(eigenvalue_rtol, w.dtype) * jnp.max(jnp.abs(w))
    return jnp.maximum(jnp.asarray(min_eigenvalue, w.dtype), rel)


@_deprecation.renamed("curvlib.scale_by_newton", hvp_mode="mode")
def scale_by_newton(
    damping: float = 0.0,
    *,
    min_eigenvalue: float = 0.0,
    eigenvalue_rtol: float | None = None,
    modification: str = "abs",
    max_params: int = 4096,
    ggn: tuple[Callable, Callable] | None = None,
    mode: str | None = None,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Dense Newton direction with damping and eigenvalue modification.

    ``update(updates, state, params, *, value_fn, **extra_args)`` with the
    routing of [`curvlib.optim`][curvlib.optim] (``value=`` is reused when given).

    Args:
      damping: ``lambda >= 0`` added to the modified eigenvalues (traceable).
      min_eigenvalue: absolute floor ``>= 0`` of the modified eigenvalues
        (traceable; default ``0``: only the relative floor).
      eigenvalue_rtol: relative floor ``>= 0``: eigenvalues below
        ``eigenvalue_rtol * max|mu|`` are raised to it (traceable). Default
        ``n * eps`` of the parameters' dtype (the numerical-rank threshold);
        raise it to regularise more, lower it (even to ``0``) to trust every
        computed eigenvalue.
      modification: ``"abs"`` (``|mu|``, saddle-free) or ``"clip"``
        (``max(mu, mu_min)``).
      max_params: refuse (``ValueError`` at ``init``) above this many
        parameters: the method is ``O(n^3)`` time and ``O(n^2)`` memory.
      ggn: optional ``(model_fn, loss_fn)`` Gauss-Newton split.
      mode: Hessian product mode of [`curvlib.hessian_matvec`][curvlib.hessian_matvec] (renamed from
        ``hvp_mode``, which still works with a warning); refused with ``ggn=``
        (the Gauss-Newton product takes none).
      has_aux: ``value_fn`` returns ``(loss, aux)``; ``aux`` is ignored.

    Returns:
      An `optax.GradientTransformationExtraArgs` with state
      [`ScaleByNewtonState`][curvlib.ScaleByNewtonState].

    Raises:
      ValueError: invalid settings at construction; too many parameters at
        ``init``.
      ValueError: from ``init``, for ``params`` with integer, bool, complex or
        key leaves (a `TypeError` too) or an empty ``params``.
      TypeError: from ``update`` when ``value_fn`` is missing, cannot take the
        extra arguments passed, or does not return a scalar loss.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.optim import scale_by_newton
      >>> f = lambda p: 0.5 * p @ jnp.array([[3.0, 1.0], [1.0, 2.0]]) @ p - p.sum()
      >>> tx = scale_by_newton(); p = jnp.zeros(2); s = tx.init(p)
      >>> u, s = tx.update(jax.grad(f)(p), s, p, value_fn=f)
      >>> [round(float(x), 5) for x in p - u]  # the exact minimiser A^-1 1
      [0.2, 0.4]
    """
    _validate.number(damping, "damping", minimum=0)
    _validate.number(min_eigenvalue, "min_eigenvalue", minimum=0)
    _validate.number(eigenvalue_rtol, "eigenvalue_rtol", minimum=0, finite=False, optional=True)
    if modification not in MODIFICATIONS:
        raise ValueError(f"`modification` must be one of {MODIFICATIONS}; got {modification!r}.")
    # a guard read at ``init`` only: an integer value, concrete there (under
    # ``optax.inject_hyperparams`` an array, traced when ``update`` rebuilds it)
    _validate.number(max_params, "max_params", minimum=1, integer=True)
    _validate.functions(ggn, "ggn", 2, what=_common.GGN, optional=True)
    _validate.mode(mode, ggn=ggn)
    name = "scale_by_newton"

    def init_fn(params):
        n, dt = _common.dense_init(
            name, params, max_params, "forms the dense {n} x {n} curvature matrix",
            "use curvlib.newton_cg for large models")
        return _tree.unaliased(ScaleByNewtonState(  # donatable
            count=jnp.zeros((), jnp.int32), info=_initial_info(dt)))

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        setup = _common.curvature_setup(
            name, value_fn, params, extra_args,
            ggn=ggn, hvp_mode=mode, microbatch_size=None, has_aux=has_aux,
            updates=updates,
        )
        g, unravel = ravel_pytree(updates)
        p, info = _newton_step(dense_curvature(setup.matvec, params), g, setup, damping,
                               min_eigenvalue, modification, eigenvalue_rtol)
        return unravel(p), ScaleByNewtonState(optax.safe_increment(state.count), info)

    return optax.GradientTransformationExtraArgs(init_fn, _common.compiled_when_eager(
        update_fn, damping, min_eigenvalue, eigenvalue_rtol, max_params))


def _initial_info(dt) -> NewtonInfo:
    """The `NewtonInfo` of a fresh state (parameters of dtype ``dt``): no step taken yet."""
    zero = jnp.zeros((), dt)
    return NewtonInfo(zero, zero, jnp.zeros((), jnp.int32), jnp.asarray(False),
                      jnp.zeros((), _common.loss_dtype(dt)), converged=jnp.asarray(True),
                      finite=jnp.asarray(True), num_matvecs=jnp.zeros((), jnp.int32),
                      status=jnp.asarray(Status.SUCCESS, jnp.int32))


def _newton_step(C, g, setup, damping, min_eigenvalue, modification, eigenvalue_rtol):
    """``(p, info)``: the modified Newton step for the flat gradient ``g`` and the dense
    curvature ``C`` (`modified_newton_direction`), zero where anything is not finite.

    The eigendecomposition runs in at least float32 (LAPACK has no half precision); a
    non-finite ``C`` is replaced by the identity before it (and the step then zeroed), so
    the decomposition never sees a NaN.
    """
    C = C.astype(jnp.promote_types(C.dtype, jnp.float32))
    finite = jnp.isfinite(setup.value) & jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(C))
    C = jnp.where(finite, C, jnp.eye(C.shape[0], dtype=C.dtype))
    p, w = modified_newton_direction(
        C, g.astype(C.dtype), damping, min_eigenvalue, modification, eigenvalue_rtol
    )
    finite = finite & jnp.all(jnp.isfinite(p))
    p = jnp.where(finite, p, 0.0).astype(g.dtype)
    # a zero step for a non-zero gradient (every direction dropped: a curvature of
    # zero, as a piecewise-linear loss has) makes no progress: a stall, not a solve
    stalled = finite & jnp.any(g != 0) & ~jnp.any(p != 0)
    floor = eigenvalue_floor(w, min_eigenvalue, eigenvalue_rtol)
    # (NaN, not the identity's eigenvalues, where the curvature was not finite)
    measured = lambda x: jnp.where(finite, x, jnp.nan).astype(setup.dtype)
    return p, NewtonInfo(
        min_eigenvalue=measured(w[0]),
        max_eigenvalue=measured(w[-1]),
        num_modified=jnp.where(finite, jnp.sum(w < floor), 0).astype(jnp.int32),
        skipped=~finite,
        loss=setup.value,
        converged=finite & ~stalled,
        finite=finite,
        num_matvecs=jnp.asarray(g.size, jnp.int32),
        status=from_flags(finite=finite, stalled=stalled),
    )


@weak_cache
def _loss_in_default_float(fn: Callable) -> Callable:
    """``fn`` with its value cast to JAX's default float (``jnp.result_type(float)``).

    optax's backtracking line search with ``store_grad=True`` transposes the
    loss's linearisation with the cotangent ``1.0``, a Python float; under
    ``jax_enable_x64`` that is a float64 while a float32 model's loss is
    float32, and the transpose fails. A loss in the default float matches it;
    the gradient keeps the parameters' dtype.
    """

    @functools.wraps(fn)
    def loss(params, *args, **kwargs):
        return jnp.asarray(fn(params, *args, **kwargs), jnp.result_type(float))

    return loss


@functools.cache
def default_linesearch() -> optax.GradientTransformationExtraArgs:
    """The line search of `newton`: Armijo backtracking from the full step, storing grad.

    optax's `optax.scale_by_backtracking_linesearch` (halving, at most 20
    backtracking steps), restarted from the full step ``1`` at every search
    (Nocedal & Wright 2006, Alg. 3.1), with ``store_grad=True``: the loss and gradient at the
    accepted point stay in the state, so the loop `optax.lbfgs`
    documents (`optax.value_and_grad_from_state`) reuses them instead of
    evaluating the gradient again (with ``store_grad=False`` that loop fails:
    "Value or gradient not found"). One object for every call (a pure pair of functions):
    an alias rebuilt at every step (`optax.inject_hyperparams`) shares its eager search's
    compiled program.

    Returns:
      An `optax.GradientTransformationExtraArgs` with optax's
      ``ScaleByBacktrackingLinesearchState``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim.dense_newton import default_linesearch
      >>> state = default_linesearch().init(jnp.zeros(2))
      >>> float(state.value), state.grad.tolist()  # +inf: value_and_grad_from_state recomputes
      (inf, [0.0, 0.0])
    """
    ls = optax.scale_by_backtracking_linesearch(
        max_backtracking_steps=20, decrease_factor=0.5, store_grad=True
    )

    def update_fn(updates, state, params=None, *, value_fn, **extra_args):
        # every search starts from the full Newton step: optax's state carries the last
        # accepted step, so one backtracking would cap every later search below it, and
        # after a failed search at the precision floor of the loss (its last trial's excess
        # over the Armijo line at rounding level) the step would shrink by 2^-20 per
        # iteration until the parameters silently stop moving. A search that failed far
        # above it (its step withheld, `curvlib._chain.withhold_if_worse`: Newton's step far
        # from a minimiser can be more than 2^20 times too long) is continued instead: the
        # next one goes on halving from where it stopped
        err, lr = state.info.decrease_error, state.learning_rate
        floor = jnp.sqrt(jnp.finfo(jnp.result_type(state.value)).eps) * jnp.abs(state.value)
        failed = jnp.isfinite(err) & (err > floor) & (lr > 0)
        state = state._replace(learning_rate=jnp.where(failed, 0.5 * lr, jnp.ones_like(lr)))
        dts = {jnp.dtype(x.dtype) for x in jax.tree.leaves(params)}
        if len(dts) < 2:
            return ls.update(updates, state, params, value_fn=_loss_in_default_float(value_fn),
                             **extra_args)
        # parameters of several dtypes (a bfloat16 layer beside float32 ones): optax steps a
        # bfloat16 leaf in float32 and its gradient branches then disagree on the dtype
        # ("cond branches must have equal output types"); searched in the common dtype, the
        # loss seeing each leaf in its own, the step and state handed back in the leaves'
        common = jnp.result_type(*dts)
        up = functools.partial(jax.tree.map, lambda x: x.astype(common))
        like = functools.partial(jax.tree.map, lambda x, o: x.astype(o.dtype))
        fn = _loss_in_default_float(value_fn)

        @functools.wraps(fn)
        def loss(p, *args, **kwargs):
            return fn(like(p, params), *args, **kwargs)

        extra = {k: up(v) if k == "grad" else v for k, v in extra_args.items()}
        out, new = ls.update(up(updates), state._replace(grad=up(state.grad)), up(params),
                             value_fn=loss, **extra)
        return like(out, updates), new._replace(grad=like(new.grad, state.grad))

    return optax.GradientTransformationExtraArgs(ls.init, update_fn)


_DEFAULT = _common.Default("default_linesearch(): Armijo backtracking")


@_deprecation.renamed("curvlib.newton", hvp_mode="mode")
def newton(
    learning_rate: optax.ScalarOrSchedule | None = None,
    damping: float = 0.0,
    *,
    min_eigenvalue: float = 0.0,
    eigenvalue_rtol: float | None = None,
    modification: str = "abs",
    max_params: int = 4096,
    ggn: tuple[Callable, Callable] | None = None,
    mode: str | None = None,
    has_aux: bool = False,
    linesearch: Any = _DEFAULT,
) -> optax.GradientTransformationExtraArgs:
    """Dense Newton: ``chain(scale_by_newton, -lr, linesearch)`` (see `scale_by_newton`).

    The default line search (`default_linesearch`) is optax's Armijo
    backtracking starting from the full Newton step (so a quadratic is still
    solved in one step, while the far field of e.g. a logistic loss, where
    pure Newton overshoots, is globalised). ``update(grads, state, params,
    value_fn=loss, **batch)`` is all it needs: the loss and gradient the line
    search takes are computed when ``value=``/``grad=`` are not passed. It
    stores the loss and gradient at the new point, so the loop of
    `optax.lbfgs` (`optax.value_and_grad_from_state`) works
    unchanged. ``linesearch=None`` gives the pure (modified) Newton iteration.

    The arguments ``damping``, ``min_eigenvalue``, ``eigenvalue_rtol``,
    ``modification``, ``max_params``, ``ggn`` and ``mode`` are those of
    [`scale_by_newton`][curvlib.scale_by_newton].

    Args:
      learning_rate: optional scale or schedule; ``None`` means 1.
      damping: ``lambda >= 0`` added to the modified eigenvalues (traceable).
      min_eigenvalue: absolute floor ``>= 0`` of the modified eigenvalues.
      eigenvalue_rtol: relative floor ``>= 0`` of the modified eigenvalues (default
        ``n * eps``, the numerical-rank threshold).
      modification: ``"abs"`` (``|mu|``, saddle-free) or ``"clip"`` (``max(mu, mu_min)``).
      max_params: refuse (``ValueError`` at ``init``) above this many parameters.
      ggn: optional ``(model_fn, loss_fn)`` Gauss-Newton split.
      mode: Hessian product mode of [`curvlib.hessian_matvec`][curvlib.hessian_matvec]
        (renamed from ``hvp_mode``, which still works with a warning); refused with
        ``ggn=`` (the Gauss-Newton product takes none).
      has_aux: ``value_fn`` returns ``(loss, aux)``.
      linesearch: an optax line search, ``None``, or the default.

    Returns:
      An `optax.GradientTransformationExtraArgs`; ``state[0]`` is the
      [`ScaleByNewtonState`][curvlib.ScaleByNewtonState].

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvlib.optim import newton
      >>> f = lambda p: jnp.sum(jnp.logaddexp(0.0, -p)) + 0.05 * jnp.sum(p ** 2)
      >>> opt = newton(); p = jnp.full(3, 5.0); s = opt.init(p)
      >>> vg = optax.value_and_grad_from_state(f)  # the loop optax.lbfgs documents
      >>> @jax.jit
      ... def step(p, s):
      ...     v, g = vg(p, state=s)
      ...     u, s = opt.update(g, s, p, value=v, grad=g, value_fn=f)
      ...     return optax.apply_updates(p, u), s
      >>> for _ in range(8):
      ...     p, s = step(p, s)
      >>> bool(jnp.linalg.norm(jax.grad(f)(p)) < 1e-5)
      True
    """
    if linesearch is _DEFAULT:
        linesearch = default_linesearch()
    direction = scale_by_newton(
        damping, min_eigenvalue=min_eigenvalue, eigenvalue_rtol=eigenvalue_rtol,
        modification=modification, max_params=max_params, ggn=ggn, mode=mode,
        has_aux=has_aux,
    )
    return _common.alias(
        "newton", [direction, _common.learning_rate_link(learning_rate)],
        linesearch=linesearch, has_aux=has_aux, options=(learning_rate,),
    )
