"""Inverse curvature products ``v -> (C + lambda I)^{-1} v`` as operators.

Two methods, one object ([`InverseMatvec`][curvlib.InverseMatvec]):

* ``"cg"``: every product solves ``(C + lambda I) x = v`` by conjugate
  gradients ([`curvlib.cg`][curvlib.cg]) to ``rtol``; ``solve(b, x0=...)`` accepts a
  warm start and returns the diagnostics;
* ``"lowrank"``: the top eigenpairs ``C ~ U diag(theta) U^T`` (from
  [`curvlib.eigsh`][curvlib.eigsh], computed once when the operator is built, or given)
  make every product closed-form and product-free:
  ``U diag(1/(theta + lambda) - 1/lambda) U^T v + v / lambda``, the exact
  inverse of the damped rank-``r`` approximation ``U diag(theta) U^T + lambda I``.

References:
  P. W. Koh and P. Liang, *Understanding black-box predictions via influence
  functions*, ICML 2017.
  A. Schioppa, P. Zablotskaia, D. Vilar and A. Sokolov, *Scaling up influence
  functions*, AAAI 2022.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from curvlib import _compile, _deprecation, _tree, _validate
from curvlib._compile import as_operator, eager_jit, is_host_driven, is_pytree_operator, tracing
from curvlib._status import Status, from_flags, worst
from curvlib.krylov import cg, eigen
from curvlib.krylov.solvers import CG, Eigsh, resolve

PyTree = Any

METHODS = ("cg", "lowrank")


class InverseSolve(NamedTuple):
    """Output of [`InverseMatvec.solve`][curvlib.InverseMatvec.solve].

    Attributes:
      x: the solution of ``(C + lambda I) x = b``; NaN where the solve failed
        (``finite`` false, or a direction of non-positive curvature: CG met one, or
        for ``"lowrank"`` some ``theta_i + lambda <= 0``).
      num_matvecs: products of ``C`` used by this solve (``0`` for ``"lowrank"``).
      residual_norm: CG's true residual ``||b - (C + lambda I) x||`` (as
        [`CGResult`][curvlib.CGResult]'s); NaN for ``"lowrank"`` (not measured: it
        would cost a product).
      converged: CG reached ``max(rtol ||b||, atol)`` on a positive definite
        system; for ``"lowrank"``, the eigenpairs were certified by eigsh (or given)
        and every ``theta_i + lambda > 0``.
      finite: every product (and the result) was finite.
      status: the [`curvlib.Status`][curvlib.Status] code, most serious first: ``NONFINITE``,
        ``NEGATIVE_CURVATURE`` (CG met a direction of non-positive curvature, or a
        low-rank ``theta_i + lambda <= 0``: the system is not positive definite),
        ``STALLED`` (CG's residual stopped decreasing above the tolerance),
        ``MAX_STEPS`` (CG's budget ran out, or for ``"lowrank"`` eigsh's pairs were not
        certified: eigsh's own code where it says why, e.g. ``STALLED``), else
        ``SUCCESS``.
    """

    x: PyTree
    num_matvecs: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    finite: jax.Array
    status: jax.Array = Status.SUCCESS


def _as_partial(f, name):
    # a host-driven operator (a stream) stays itself: wrapped, it hid its flag, and every
    # solve went through a compiled entry that traced the vector it cannot take traced;
    # a callable pytree (a `Partial`, a K-FAC inverse, another InverseMatvec) too: its
    # arrays stay arguments of the compiled solve (as Partial(f) they were constants, and
    # every new K-FAC inverse, one per training step, compiled the whole solve again)
    if f is None or is_pytree_operator(f) or is_host_driven(f):
        return f
    if not callable(f):
        raise TypeError(f"`{name}` must be callable; got {type(f).__name__}.")
    return Partial(f)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(eq=False)  # __init__ from the fields; compared by identity (holds arrays)
class InverseMatvec:
    """The operator ``v -> (C + lambda I)^{-1} v``; build it with `inverse_matvec`.

    A pytree (its arrays are leaves: pass it into jitted code as an argument),
    immutable, with two methods:

    * ``inv(v)``: the product, shaped like ``v`` (``vmap`` it over right-hand
      sides); NaN where the solve failed (see [`solve`][curvlib.InverseMatvec.solve]);
    * ``inv.solve(b, x0=None)``: the same solve with a warm start ``x0`` and an
      [`InverseSolve`][curvlib.InverseSolve] with its diagnostics. Warm starting is functional:
      keep the previous solution and pass it back (for a slowly changing
      right-hand side or operator, as in a training loop).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib import inverse_matvec
      >>> inv = inverse_matvec(lambda v: jax.tree.map(lambda l: 3.0 * l, v), damping=1.0)
      >>> b = {"w": jnp.array([4.0, 8.0])}
      >>> inv(b)["w"].tolist()  # (3 I + I)^{-1} b
      [1.0, 2.0]
      >>> x = jax.jit(lambda op, b: op(b))(inv, b)  # a pytree: an argument of jitted code
      >>> res = inv.solve(b, x0=x)  # warm start at the solution: one product to check it
      >>> int(res.num_matvecs), bool(res.converged), res.x["w"].tolist()
      (1, True, [1.0, 2.0])
    """

    matvec: Callable
    damping: Any
    method: str
    rtol: Any
    atol: Any
    max_steps: Any
    preconditioner: Callable | None
    eigenvalues: jax.Array | None
    eigenvectors: PyTree
    eig_converged: jax.Array | None
    eig_status: jax.Array | None = None  # eigsh's status code, for "lowrank"

    def tree_flatten(self):
        children = (self.matvec, self.damping, self.rtol, self.atol, self.max_steps,
                    self.preconditioner, self.eigenvalues, self.eigenvectors, self.eig_converged,
                    self.eig_status)
        return children, self.method

    @classmethod
    def tree_unflatten(cls, method, children):
        matvec, damping, rtol, atol, max_steps, precond, vals, vecs, conv, code = children
        return cls(matvec, damping, method, rtol, atol, max_steps, precond, vals, vecs, conv,
                   code)

    @property
    def host_driven(self) -> bool:
        """Whether the underlying operator streams data from the host (then so does this one)."""
        return is_host_driven(self.matvec)

    def __repr__(self):
        return f"InverseMatvec(method={self.method!r}, damping={self.damping!r})"

    def solve(self, b: PyTree, x0: PyTree | None = None) -> InverseSolve:
        """``(C + lambda I)^{-1} b`` with an optional warm start, and its diagnostics.

        Args:
          b: the right-hand side, shaped like the operator's vectors.
          x0: a warm start for CG (e.g. the previous solution); ignored by
            ``"lowrank"`` (which needs none).

        Returns:
          An [`InverseSolve`][curvlib.InverseSolve].
        """
        if self.host_driven:  # products stream data from the host: no compiled boundary
            return self._solve(b, x0)
        return _solve_jit(self._traced_operators(b), b, x0)

    def _traced_operators(self, b) -> InverseMatvec:
        """``self`` with a plain function's operator as its program (`as_operator`): equal
        for a new closure over new arrays, so an eager solve compiles once, not per build.
        Traced at this operator's first solve of each vector shape and kept with it (a new
        `inverse_matvec` traces afresh: the function as it computes then);
        ``"lowrank"`` solves use no product: theirs is replaced by one fixed placeholder."""
        if tracing(b):
            return self
        if self.method == "lowrank":  # no product: one program for every operator's pairs
            return dataclasses.replace(self, matvec=_LOWRANK_PRODUCT, preconditioner=None)

        def program(f, name):
            plain = isinstance(f, Partial) and not f.args and not f.keywords
            if not plain or is_pytree_operator(f.func):
                return f
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x),
                                                                 jnp.result_type(x)), b)
            key = (name, jax.tree.structure(shapes), tuple(jax.tree.leaves(shapes)))
            traced = self.__dict__.setdefault("_traced", {})  # (this operator's own)
            if key not in traced:
                traced[key] = as_operator(f.func, b, name, "b")
            return traced[key]

        return dataclasses.replace(self, matvec=program(self.matvec, "matvec"),
                                   preconditioner=program(self.preconditioner, "preconditioner"))

    def _solve(self, b, x0):
        if self.method == "lowrank":
            return self._solve_lowrank(b)
        res = cg(self.matvec, b, x0=x0, damping=self.damping, rtol=self.rtol, atol=self.atol,
                 max_steps=self.max_steps, preconditioner=self.preconditioner)
        ok = res.finite & ~res.negative_curvature
        x = _tree.where(ok, res.x, jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), res.x))
        return InverseSolve(x, res.num_matvecs, res.residual_norm, res.converged & ok,
                            res.finite, status=res.status)

    def _solve_lowrank(self, b):
        U, theta = self.eigenvectors, self.eigenvalues
        _validate.same_structure(b, jax.tree.map(lambda u: u[0], U), "b",
                                 "a row of the eigenvectors")
        lam = jnp.asarray(self.damping, theta.dtype)
        c = _tree.basis_project(U, b)
        coef = (c * (1.0 / (theta + lam) - 1.0 / lam)).astype(theta.dtype)
        x = _tree.add_scale(_tree.basis_combine(U, coef, like=b), 1.0 / lam, b)
        # (C + lambda I) indefinite (pairs traced into the solve; concrete ones were refused
        # when the operator was built): no inverse, NaN as CG's negative curvature gives
        positive = jnp.all(theta + lam > 0) | jnp.any(~jnp.isfinite(theta))
        finite = _tree.all_finite(x)
        x = jax.tree.map(lambda a, r: jnp.where(positive, a, jnp.nan).astype(
            jnp.result_type(r)), x, b)
        converged = finite & self.eig_converged & positive
        status = from_flags(finite=finite, converged=converged,
                            negative_curvature=~positive)
        if self.eig_status is not None:  # why the pairs are not certified (STALLED, ...)
            status = worst(status, self.eig_status)
        return InverseSolve(x, jnp.asarray(0, jnp.int32), jnp.asarray(jnp.nan, theta.dtype),
                            converged, finite, status=status)

    def __call__(self, v: PyTree) -> PyTree:
        return self.solve(v).x


def _unused_product(v):
    raise AssertionError("a low-rank solve takes no product")  # (never called)


_LOWRANK_PRODUCT = Partial(_unused_product)

# compiled at the boundary: eager solves with an equal operator type and shapes reuse the program
_solve_jit = eager_jit(lambda op, b, x0: op._solve(b, x0))



def _given_eigenpairs(eigenpairs, damping):
    """``(eigenvalues, eigenvectors, converged, status)`` of `inverse_matvec`'s ``eigenpairs``,
    checked: a 1-D real spectrum, one orthonormal row per value, ``theta + damping > 0``."""
    if hasattr(eigenpairs, "eigenvalues"):
        vals, vecs = eigenpairs.eigenvalues, eigenpairs.eigenvectors
        conv = jnp.asarray(eigenpairs.converged) & jnp.asarray(eigenpairs.finite)
        code = getattr(eigenpairs, "status", None)
    elif isinstance(eigenpairs, (tuple, list)) and len(eigenpairs) == 2:
        vals, vecs = eigenpairs
        conv, code = jnp.asarray(True), None
    else:
        raise TypeError("`eigenpairs` must be an EigshResult or a pair (eigenvalues, "
                        f"eigenvectors); got {type(eigenpairs).__name__}.")
    if jnp.ndim(vals) != 1 or not jnp.issubdtype(jnp.result_type(vals), jnp.floating):
        raise ValueError("`eigenpairs` eigenvalues must be a 1-D real floating array; got "
                         f"{jnp.result_type(vals)}{tuple(jnp.shape(vals))}.")
    r = jnp.shape(vals)[0]
    for path, leaf in _tree.leaves_with_paths(vecs):
        if jnp.shape(leaf)[:1] != (r,):
            raise ValueError(
                f"`eigenpairs` eigenvectors must carry a leading axis of length {r} (one "
                f"row per eigenvalue); eigenvectors{path} has shape {jnp.shape(leaf)}."
            )
    # the inverse is (U diag(theta) U^T + lambda)^-1 only for orthonormal U and
    # theta + lambda > 0: anything else gave answers of the wrong sign, "converged"
    _validate.basis(vecs, None, "eigenpairs")
    _positive_definite(vals, damping, "`eigenpairs` eigenvalues")
    return vals, vecs, conv, code


def _positive_definite(vals, damping, what: str) -> None:
    """Raise unless ``vals + damping > 0`` (concrete, finite values; traced ones are flagged by
    the solve: `InverseMatvec._solve_lowrank`)."""
    if _compile.tracing(vals, damping) or not np.all(np.isfinite(np.asarray(vals))):
        return
    low = float(np.min(np.asarray(vals) + np.asarray(damping))) if np.size(vals) else 1.0
    if not low > 0:
        raise ValueError(
            f"{what} plus `damping` must be > 0 (the damped operator must be positive "
            f"definite to invert); got min(theta + damping) = {low:.3g}. Use a larger "
            "`damping`, or method='cg', which reports the negative curvature it meets.")


_EIGSH_RENAMES = {"tol": "rtol", "num_matvecs": "basis_size"}
# (`rtol=` here was CG's: it moves into `cg=`, not into `eigsh=`)
_deprecation.register_folded("curvlib.inverse_matvec", "eigsh", Eigsh, _EIGSH_RENAMES,
                             exclude=("rtol",))


@_deprecation.moved_to_solver("curvlib.inverse_matvec", "cg", CG,
                              rtol="rtol", atol="atol", max_steps="max_steps")
def inverse_matvec(
    matvec: Callable,
    *,
    damping,
    method: str = "cg",
    cg: CG | None = None,
    preconditioner: Callable | None = None,
    rank: int | None = None,
    v0: PyTree | None = None,
    eigenpairs=None,
    eigsh: Eigsh | None = None,
    **eigsh_options,
) -> InverseMatvec:
    """The damped inverse ``v -> (C + lambda I)^{-1} v`` of a symmetric operator, as an operator.

    ``method="cg"`` (default): each product runs [`curvlib.cg`][curvlib.cg] on
    ``(C + lambda I) x = v`` to ``||r|| <= max(rtol ||v||, atol)``; ``C + lambda
    I`` must be positive definite (a direction of non-positive curvature makes
    the product NaN and ``solve(...).converged`` false). Cost: one product of
    ``C`` per CG step (about ``sqrt(kappa) log(1/rtol)`` steps for condition
    number ``kappa``); memory: five vectors. [`InverseMatvec.solve`][curvlib.InverseMatvec.solve]
    takes a warm start ``x0``.

    ``method="lowrank"``: with the top-``rank`` eigenpairs ``(theta_i, u_i)`` of
    ``C`` (computed here by [`curvlib.eigsh`][curvlib.eigsh] from ``v0``, or passed as
    ``eigenpairs``), ``C`` is replaced by ``U diag(theta) U^T`` and

        ``(C + lambda I)^{-1} v ~ U diag(1/(theta + lambda) - 1/lambda) U^T v + v / lambda``,

    exact when ``rank(C) <= rank`` (and, for a positive semi-definite ``C``,
    off by at most a factor ``1 + theta_{rank+1} / lambda`` on the complement).
    Cost: the eigsh once, then no product: ``O(rank P)`` per application.
    ``damping > 0`` is required. Differentiable in the vector and ``damping``; through the
    operator's own parameters in forward mode only (``jax.jvp``), as eigsh is: its loop is a
    ``while_loop``, which reverse mode (``jax.grad``) refuses. ``"cg"`` differentiates in
    both modes.

    Args:
      matvec: a symmetric linear operator on pytrees (a Hessian, GGN, Fisher, ...).
      damping: ``lambda`` (traceable scalar): ``>= 0`` for ``"cg"``, ``> 0`` for ``"lowrank"``.
      method: ``"cg"`` or ``"lowrank"``.
      cg: CG's options, a [`curvlib.CG`][curvlib.CG] (default ``CG()``: ``rtol=1e-5``,
        ``atol=0``, ``max_steps`` ``10 * dim``, the defaults of [`curvlib.cg`][curvlib.cg]).
        The former keywords ``rtol``, ``atol`` and ``max_steps`` still work,
        with a warning (the former default ``rtol`` was ``1e-6``). ``"cg"`` only.
      preconditioner: optional SPD ``M^{-1}`` for CG (``"cg"`` only).
      rank: eigenpairs to compute for ``"lowrank"`` (static).
      v0: start vector of that eigsh (e.g. ``jax.random.normal``-filled params).
      eigenpairs: instead of ``rank``/``v0``: an [`EigshResult`][curvlib.EigshResult] or a
        pair ``(eigenvalues (r,), eigenvectors with a leading axis r)`` of ``C``.
      eigsh: the options of that eigsh, a [`curvlib.Eigsh`][curvlib.Eigsh] (default ``Eigsh()``).
      **eigsh_options: the remaining arguments of [`curvlib.eigsh`][curvlib.eigsh]
        (``which``, ``key``); its solver options as keywords (``tol``,
        ``basis_size``, ...) still work, with a warning; ``verify`` is set in ``eigsh=``
        only.

    Returns:
      An [`InverseMatvec`][curvlib.InverseMatvec] ``inv`` with ``inv(v) = (C + lambda I)^{-1} v``.

    Raises:
      ValueError: for an unknown ``method``, a negative (or, for ``"lowrank"``,
        zero) ``damping``, missing/extra low-rank arguments, CG's options or a
        ``preconditioner`` with ``"lowrank"``, or concrete low-rank
        eigenvalues (computed or given) with ``min(theta + damping) <= 0`` (traced
        ones give NaN and ``NEGATIVE_CURVATURE`` in the solve).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import curvlib
      >>> from curvlib import inverse_matvec
      >>> A = jnp.diag(jnp.array([4.0, 2.0, 1.0]))
      >>> inv = inverse_matvec(lambda v: A @ v, damping=1.0, cg=curvlib.CG(rtol=1e-6))
      >>> inv(jnp.array([5.0, 3.0, 2.0])).round(4).tolist()     # (A + I)^{-1} b
      [1.0, 1.0, 1.0]
      >>> res = inv.solve(jnp.array([5.0, 3.0, 2.0]), x0=jnp.ones(3))   # warm start
      >>> int(res.num_matvecs), bool(res.converged)
      (1, True)
      >>> # eigenspace: there the inverse is 1 / damping (exactly 1 / (1 + damping) in A)
      >>> low = inverse_matvec(lambda v: A @ v, damping=1.0, method="lowrank", rank=2,
      ...                      v0=jnp.ones(3))
      >>> low(jnp.array([5.0, 3.0, 2.0])).round(4).tolist()     # e_3 is outside the rank-2
      [1.0, 1.0, 2.0]
    """
    _validate.functions(matvec, "matvec", what="a callable v -> C v")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")
    lowrank = method == "lowrank"  # the complement is inverted as 1 / damping
    _validate.number(damping, "damping", minimum=0, exclusive=lowrank,
                     what="for method='lowrank'" if lowrank else None)
    if lowrank and (cg is not None or preconditioner is not None):
        # (no CG runs: an option of it was ignored, the old `rtol` too, which arrives as `cg`)
        raise ValueError(
            "`cg` (CG's options, also the former `rtol`, `atol` and `max_steps`) and "
            "`preconditioner` apply to method='cg' only; method='lowrank' runs no CG (its "
            "accuracy is eigsh's: `eigsh=curvlib.Eigsh(rtol=...)`)."
        )
    given, matvec = matvec, _as_partial(matvec, "matvec")
    preconditioner = _as_partial(preconditioner, "preconditioner")
    cg = resolve(CG, cg, "cg")
    rtol, atol, max_steps = cg.rtol, cg.atol, cg.max_steps
    if max_steps is not None and not isinstance(max_steps, jax.core.Tracer):
        max_steps = _validate.static_int(max_steps, "max_steps", minimum=1)
    if method == "cg":
        if (rank is not None or v0 is not None or eigenpairs is not None or eigsh_options
                or eigsh is not None):
            raise ValueError(
                "`rank`, `v0`, `eigenpairs` and eigsh options apply to method='lowrank' only."
            )
        return InverseMatvec(matvec, damping, "cg", rtol, atol, max_steps, preconditioner,
                             None, None, None)
    if eigenpairs is None:
        if rank is None or v0 is None:
            raise ValueError(
                "method='lowrank' needs the eigenpairs of `matvec`: pass `rank` and a start "
                "vector `v0` (to compute them with curvlib.eigsh), or `eigenpairs`."
            )
        if eigsh is not None and not isinstance(eigsh, Eigsh):
            raise TypeError(f"`eigsh` must be a curvlib.Eigsh; got {type(eigsh).__name__}.")
        eigsh, rest = _deprecation.fold_options("curvlib.inverse_matvec", "eigsh", Eigsh, eigsh,
                                                eigsh_options, _EIGSH_RENAMES)
        unknown = sorted(set(rest) - {"which", "key"})
        if unknown:  # (`verify` overrode the `eigsh` value; `k`, `solver`: Python's error)
            raise TypeError(
                f"inverse_matvec() got unexpected keyword argument(s) {unknown}: eigsh's "
                "options are fields of `eigsh=curvlib.Eigsh(...)` (`verify` included), its "
                "`k` is `rank`; only `which` and `key` pass as keywords."
            )
        n = _tree.size(v0)
        rank = _validate.static_int(rank, "rank", minimum=1, maximum=n - 1,
                                    what="the dimension of `v0` minus one")
        # (the function as given: eigsh keys a plain function on its program, not identity)
        res = eigen.eigsh(given, v0, rank, solver=eigsh, **rest)
        vals, vecs, conv = res.eigenvalues, res.eigenvectors, res.converged & res.finite
        code = res.status
        _positive_definite(vals, damping, "the eigenvalues eigsh computed (`rank`, `which`)")
    else:
        if rank is not None or v0 is not None or eigsh_options or eigsh is not None:
            raise ValueError("pass either `eigenpairs` or `rank`/`v0` (with eigsh options).")
        vals, vecs, conv, code = _given_eigenpairs(eigenpairs, damping)
    return InverseMatvec(matvec, damping, "lowrank", rtol, atol, max_steps, preconditioner,
                         jnp.asarray(vals), vecs, conv, code)
