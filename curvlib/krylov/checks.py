"""Cheap diagnostics for a matvec before trusting a symmetric solver with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _compile, _tree, _validate
from curvlib._status import Status, from_flags

PyTree = Any


class SymmetryCheck(NamedTuple):
    """Output of [`check_symmetric`][curvlib.check_symmetric].

    Attributes:
      asymmetry: ``max_i |<u_i, A v_i> - <v_i, A u_i>|`` over the probe pairs.
      relative: the same, each term divided by ``||u_i|| ||A v_i|| + ||v_i|| ||A u_i||``
        (``0`` for the zero operator); scale-free, in ``[0, 1]``. ``asymmetry`` and
        ``relative`` are NaN when a product was not finite.
      symmetric: ``relative <= rtol`` and every product finite.
      finite: every product was finite.
      num_matvecs: products used (``2 * num_pairs``; int32).
      converged: the check reached its verdict (``== finite``). An asymmetric
        operator is a verdict (``symmetric=False``), not a failure of the check.
      status: the [`curvlib.Status`][curvlib.Status] code: ``NONFINITE`` or ``SUCCESS``
        (read ``symmetric`` for the verdict).
    """

    asymmetry: jax.Array
    relative: jax.Array
    symmetric: jax.Array
    finite: jax.Array
    num_matvecs: jax.Array
    converged: jax.Array = True
    status: jax.Array = Status.SUCCESS


def _precheck(matvec, v_like, key, num_pairs, rtol):
    _validate.prng_key(key)
    if rtol is not None and not isinstance(rtol, jax.Array):
        _validate.number(rtol, "rtol", minimum=0)


@_compile.function(static=("num_pairs",), operators={"matvec": "v_like"}, precheck=_precheck)
def check_symmetric(
    matvec: Callable[[PyTree], PyTree],
    v_like: PyTree,
    key: jax.Array,
    *,
    num_pairs: int = 1,
    rtol: float | None = None,
) -> SymmetryCheck:
    """Test ``<u, A v> = <v, A u>`` on random Gaussian pairs: a symmetric-operator smoke test.

    Every algorithm in [`curvlib.krylov`][curvlib.krylov] assumes ``A = A^T``. A Hessian or
    Gauss-Newton product is symmetric up to rounding, but a hand-written matvec
    (a transposed Jacobian product applied the wrong way round, a
    non-symmetric preconditioned operator, a stochastic product that redraws
    its batch on every call) is not, and Lanczos then returns plausible-looking
    wrong numbers. For a non-symmetric ``A`` and independent Gaussian ``u, v``,
    ``<u, (A - A^T) v>`` has standard deviation ``||A - A^T||_F``, so one pair
    detects any asymmetry that is not tiny against ``||A||``.

    Cost: ``2 * num_pairs`` products (one ``vmap``-ed block); no extra memory
    beyond ``4 * num_pairs`` vectors. Jit-compatible (``num_pairs`` static).

    Args:
      matvec: the linear operator on pytrees shaped like ``v_like``.
      v_like: any pytree with the operator's shapes and float dtypes.
      key: PRNG key for the probes (explicit; no default key).
      num_pairs: number of independent ``(u, v)`` pairs (static, ``>= 1``).
      rtol: tolerance on the relative asymmetry; default ``sqrt(eps)`` of the
        accumulation dtype (``1.5e-8`` in float64, ``3.5e-4`` in float32 and
        bfloat16), far above the rounding of a symmetric product.

    Returns:
      A [`SymmetryCheck`][curvlib.SymmetryCheck].

    Raises:
      ValueError: if ``num_pairs`` is not an int ``>= 1`` (``np.int64`` is
        accepted, ``True`` is not), ``rtol`` is a negative Python/NumPy number,
        ``v_like`` is empty, or the matvec's output is not shaped like its input.
      TypeError: for non-float leaves.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib import check_symmetric
      >>> A = jnp.array([[2.0, 1.0], [0.0, 3.0]])
      >>> chk = check_symmetric(lambda v: A @ v, jnp.zeros(2), jax.random.PRNGKey(0))
      >>> bool(chk.symmetric)
      False
      >>> S = A + A.T
      >>> bool(check_symmetric(lambda v: S @ v, jnp.zeros(2), jax.random.PRNGKey(0)).symmetric)
      True
    """
    _validate.float_leaves(v_like, "v_like")
    num_pairs = _validate.static_int(num_pairs, "num_pairs", minimum=1)
    if rtol is not None and not isinstance(rtol, jax.Array):
        _validate.number(rtol, "rtol", minimum=0)
    acc = _tree.acc_dtype(*jax.tree.leaves(v_like))
    if rtol is None:
        rtol = float(np.sqrt(np.finfo(acc).eps))
    keys = jax.random.split(key, 2 * num_pairs)
    probes = jax.vmap(lambda k: _tree.normal_like(k, v_like))(keys)

    def product(v):
        out = matvec(v)
        # checked at the operator's (only) trace
        _validate.same_structure(v_like, out, "v_like", "matvec(v_like)")
        return jax.tree.map(lambda y, x: jnp.asarray(y).astype(x.dtype), out, v)

    if _compile.is_host_driven(matvec):  # streamed data: one pass for the whole block
        products = matvec.matmat(probes) if hasattr(matvec, "matmat") else jax.tree.map(
            lambda *r: jnp.stack(r),
            *[matvec(jax.tree.map(lambda x, i=i: x[i], probes)) for i in range(2 * num_pairs)])
        products = jax.tree.map(lambda y, x: jnp.asarray(y).astype(x.dtype), products, probes)
    else:
        products = jax.vmap(product)(probes)
    U = jax.tree.map(lambda x: x[:num_pairs], probes)
    V = jax.tree.map(lambda x: x[num_pairs:], probes)
    AU = jax.tree.map(lambda x: x[:num_pairs], products)
    AV = jax.tree.map(lambda x: x[num_pairs:], products)
    # the products scaled to entries of order one (every form below is linear in them):
    # their squared norms overflowed for an operator of norm 1e18 in float32, and the
    # relative asymmetry read 0 for any operator there
    c = _tree.max_abs(products, acc)
    c = jnp.where((c > 0) & jnp.isfinite(c), c, 1.0)
    AU, AV = _tree.scale(1.0 / c, AU), _tree.scale(1.0 / c, AV)
    uav = jnp.diagonal(_tree.basis_gram(U, AV, acc))
    vau = jnp.diagonal(_tree.basis_gram(V, AU, acc))
    nrm = lambda X: jnp.sqrt(jnp.diagonal(_tree.basis_gram(X, X, acc)))
    scale = nrm(U) * nrm(AV) + nrm(V) * nrm(AU)
    diff = jnp.abs(uav - vau)
    rel = jnp.where(scale > 0, diff / jnp.where(scale > 0, scale, 1.0), 0.0)
    finite = _tree.all_finite(products) & jnp.all(jnp.isfinite(uav)) & jnp.all(jnp.isfinite(vau))
    asym = c * jnp.max(diff)
    rel_max = jnp.max(rel)
    return SymmetryCheck(
        asymmetry=jnp.where(finite, asym, jnp.nan),
        relative=jnp.where(finite, rel_max, jnp.nan),
        symmetric=finite & (rel_max <= rtol),
        finite=finite,
        num_matvecs=jnp.asarray(2 * num_pairs, jnp.int32),
        converged=finite,
        status=from_flags(finite=finite),
    )
