"""Randomised estimators: Hutchinson / Hutch++ trace and diagonal, stochastic Lanczos quadrature."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _tree

# the package re-exports the *function* ``lanczos`` under the submodule's name, so
# ``from curvlib.krylov import lanczos`` may yield the function: import the module itself.
_lz = importlib.import_module("curvlib.krylov.lanczos")

PyTree = Any


class StochasticEstimate(NamedTuple):
    """A Monte Carlo estimate with its standard error.

    Attributes:
      estimate: the estimate (scalar for a trace, pytree for a diagonal).
      stderr: its standard error (same structure as ``estimate``).
      num_matvecs: products used.
      finite: every product was finite (if not, the estimate is not meaningful).
    """

    estimate: Any
    stderr: Any
    num_matvecs: int
    finite: Any = True


class SpectralDensity(NamedTuple):
    """Output of :func:`spectral_density`.

    Attributes:
      grid: evaluation points ``t`` (shape ``(num_points,)``).
      density: Gaussian-broadened spectral density on ``grid``; integrates to ~1.
      nodes: Ritz values per probe (shape ``(num_probes, num_matvecs)``).
      weights: Gauss quadrature weights per probe (rows sum to 1).
      sigma: broadening width used.
      finite: every product was finite (if not, the Lanczos runs stopped at the
        first non-finite product and the density is not meaningful).
    """

    grid: jax.Array
    density: jax.Array
    nodes: jax.Array
    weights: jax.Array
    sigma: jax.Array
    finite: Any = True


def _check_probes(num_probes):
    if not isinstance(num_probes, int) or num_probes <= 0:
        raise ValueError(f"`num_probes` must be a positive int; got {num_probes!r}.")


def _check_sigma(sigma):
    """A concrete ``sigma`` must be a positive finite scalar (a traced one is taken as is)."""
    if sigma is None or isinstance(sigma, jax.core.Tracer):
        return
    s = np.asarray(sigma)
    if s.ndim != 0 or not np.isfinite(s) or not s > 0:
        raise ValueError(f"`sigma` must be a positive, finite scalar; got {sigma!r}.")


def _block_matvec(matvec, V, batch_size):
    if batch_size is None:
        return jax.vmap(matvec)(V)
    return jax.lax.map(matvec, V, batch_size=batch_size)


def _rowdots(P, Q, acc):
    """``(p_i . q_i)_i`` for two bases with the same leading axis: ``O(s N)``, no Gram matrix."""
    # sum over every non-leading axis (no reshape: explicitly sharded axes stay put)
    parts = [
        jnp.sum(a * b, axis=tuple(range(1, jnp.ndim(a))), dtype=acc)
        for a, b in zip(jax.tree.leaves(P), jax.tree.leaves(Q), strict=True)
    ]
    return sum(parts[1:], parts[0])


def _probes(key, v_like, num):
    keys = jax.random.split(key, num)
    return jax.vmap(lambda k: _tree.rademacher_like(k, v_like))(keys)


def hutchinson_trace(
    matvec: Callable[[PyTree], PyTree],
    v_like: PyTree,
    key: jax.Array,
    num_probes: int,
    *,
    method: str | None = None,
    batch_size: int | None = None,
    deflate: PyTree | None = None,
    deflate_trace: jax.Array | None = None,
) -> StochasticEstimate:
    """Unbiased estimate of ``tr(A)`` from matrix-vector products.

    ``"hutchinson"``: ``tr(A) ~ (1/s) sum_i z_i^T A z_i`` with Rademacher ``z_i``
    (Hutchinson 1989); variance ``2 (||A||_F^2 - sum_i A_ii^2) / s``.

    ``"hutch++"`` (default): spend a third of the products on a sketch
    ``Y = A S``, orthonormalise it (Cholesky-QR, twice), take the trace on its
    range exactly, ``tr(Q^T A Q)``, and Hutchinson on the deflated remainder
    ``(I - QQ^T) A (I - QQ^T)`` (Meyer et al. 2021). For matrices with decaying
    spectra, such as neural-network Hessians, the error falls like ``1/s``
    instead of ``1/sqrt(s)``. The standard error reported is that of the
    Hutchinson part (the exact part has none).

    Deflated (``deflate=Q`` given, orthonormal rows ``q_1 .. q_d``, e.g. the
    eigenvectors from :func:`curvlib.eigsh`): ``tr(A) = tr(Q A Q^T) +
    tr(P A P)`` with ``P = I - Q^T Q`` exactly, so
    ``tr(A) ~ tr(Q A Q^T) + (1/s) sum_i (P z_i)^T A (P z_i)`` is unbiased for
    any orthonormal ``Q``; all ``num_probes`` products go to the remainder.
    ``tr(Q A Q^T)`` is ``deflate_trace`` when known (for Ritz vectors it is the
    sum of their Ritz values, so the sketch costs nothing), else ``d`` more
    products. This is Hutch++ with a sketch that a top-eigenspace computation
    has already paid for.

    Cost: ``num_probes`` products, evaluated as one ``vmap``-ed block (or
    ``lax.map`` chunks of ``batch_size``); memory ``num_probes`` vectors.

    Args:
      matvec: symmetric operator on pytrees shaped like ``v_like``.
      v_like: any pytree with the operator's shapes and dtypes.
      key: PRNG key for the probes.
      num_probes: total products (``>= 3`` for Hutch++).
      method: ``"hutch++"`` (default without ``deflate``) or ``"hutchinson"``
        (the only choice with ``deflate``).
      batch_size: optional chunking of the block product.
      deflate: optional orthonormal basis (pytree shaped like ``v_like`` with a
        leading axis ``d``) whose span is traced exactly.
      deflate_trace: optional known ``tr(Q A Q^T)`` for ``deflate``.

    Returns:
      :class:`StochasticEstimate` with scalar ``estimate`` and ``stderr``.

    Raises:
      ValueError: if ``num_probes <= 0``, ``method`` is unknown, ``"hutch++"``
        is asked for together with ``deflate``, or ``deflate`` does not match
        ``v_like``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> d = jnp.linspace(0.0, 2.0, 100)  # tr = 100
      >>> key = jax.random.PRNGKey(0)
      >>> est = hutchinson_trace(lambda v: d * v, jnp.zeros(100), key, 30)  # Hutch++
      >>> bool(abs(est.estimate - 100.0) < 4 * est.stderr)
      True
      >>> plain = hutchinson_trace(lambda v: d * v, jnp.zeros(100), key, 4, method="hutchinson")
      >>> round(float(plain.estimate), 3)  # Rademacher z^T D z = tr D exactly
      100.0

    References:
      M. F. Hutchinson, *A stochastic estimator of the trace of the influence
      matrix for Laplacian smoothing splines*, 1989; R. A. Meyer, C. Musco,
      C. Musco and D. P. Woodruff, *Hutch++: optimal stochastic trace
      estimation*, SOSA 2021.
    """
    _check_probes(num_probes)
    _tree.check_float_tree(v_like, "v_like")
    _tree.check_matvec(matvec, v_like, "v_like")
    if method not in (None, "hutch++", "hutchinson"):
        raise ValueError(f"`method` must be 'hutch++' or 'hutchinson'; got {method!r}.")
    acc = jnp.promote_types(_tree.dtype(v_like), jnp.float32)
    if deflate is not None:
        if method == "hutch++":
            raise ValueError(
                "`deflate` replaces the Hutch++ sketch: use method='hutchinson' (or leave "
                "`method` unset) with `deflate`."
            )
        return _deflated_trace(matvec, v_like, key, num_probes, deflate, deflate_trace,
                               batch_size, acc)
    method = method or "hutch++"
    if method == "hutchinson" or num_probes < 3:
        Z = _probes(key, v_like, num_probes)
        AZ = _block_matvec(matvec, Z, batch_size)
        samples = _rowdots(Z, AZ, acc)
        est = jnp.mean(samples)
        se = jnp.std(samples, ddof=1) / jnp.sqrt(num_probes) if num_probes > 1 else jnp.inf
        return StochasticEstimate(est, jnp.asarray(se, acc), num_probes, _tree.all_finite(AZ))
    s = num_probes // 3
    g = num_probes - 2 * s
    k1, k2 = jax.random.split(key)
    S = _probes(k1, v_like, s)
    Y = _block_matvec(matvec, S, batch_size)
    Q = _orthonormal_rows(Y, acc)
    AQ = _block_matvec(matvec, Q, batch_size)
    exact = jnp.trace(_tree.basis_gram(Q, AQ, acc))
    G = _probes(k2, v_like, g)
    G = _tree.sub(G, _tree.basis_matmul(_tree.basis_gram(G, Q, acc), Q))
    AG = _block_matvec(matvec, G, batch_size)
    samples = _rowdots(G, AG, acc)
    est = exact + jnp.mean(samples)
    se = jnp.std(samples, ddof=1) / jnp.sqrt(g) if g > 1 else jnp.asarray(jnp.inf, acc)
    finite = _tree.all_finite(Y) & _tree.all_finite(AQ) & _tree.all_finite(AG)
    return StochasticEstimate(est, se, num_probes, finite)


def _deflated_trace(matvec, v_like, key, num_probes, Q, exact, batch_size, acc):
    """``tr(Q A Q^T)`` plus Hutchinson on ``P A P``, ``P = I - Q^T Q`` (``hutchinson_trace``)."""
    lv, lq = jax.tree.structure(v_like), jax.tree.structure(Q)
    if lv != lq:
        raise ValueError(
            f"`deflate` must have the structure of `v_like` ({lv}) with a leading axis; got {lq}."
        )
    for x, q in zip(jax.tree.leaves(v_like), jax.tree.leaves(Q), strict=True):
        if jnp.shape(q)[1:] != jnp.shape(x):
            raise ValueError(
                "`deflate` leaves must be `v_like` leaves with a leading axis; got shape "
                f"{jnp.shape(q)} for a leaf of shape {jnp.shape(x)}."
            )
    finite = jnp.asarray(True)
    used = num_probes
    if exact is None:
        used += int(jax.tree.leaves(Q)[0].shape[0])
        AQ = _block_matvec(matvec, Q, batch_size)
        exact = jnp.trace(_tree.basis_gram(Q, AQ, acc))
        finite = _tree.all_finite(AQ)
    G = _probes(key, v_like, num_probes)
    G = _tree.sub(G, _tree.basis_matmul(_tree.basis_gram(G, Q, acc), Q))
    AG = _block_matvec(matvec, G, batch_size)
    samples = _rowdots(G, AG, acc)
    est = jnp.asarray(exact, acc) + jnp.mean(samples)
    se = (jnp.std(samples, ddof=1) / jnp.sqrt(num_probes) if num_probes > 1
          else jnp.asarray(jnp.inf, acc))
    return StochasticEstimate(est, jnp.asarray(se, acc), used, finite & _tree.all_finite(AG))


def _orthonormal_rows(Y, acc):
    """Orthonormalise the rows of a basis by Cholesky-QR applied twice (rank-safe)."""
    def chol_qr(Y):
        G = _tree.basis_gram(Y, Y, acc)
        scale = jnp.trace(G) / G.shape[0]
        G = G + jnp.eye(G.shape[0], dtype=acc) * jnp.finfo(acc).eps * 10 * (scale + 1e-30)
        L = jnp.linalg.cholesky(G)
        Linv = jax.scipy.linalg.solve_triangular(L, jnp.eye(G.shape[0], dtype=acc), lower=True)
        return _tree.basis_matmul(Linv, Y)

    return chol_qr(chol_qr(Y))


def hutchinson_diag(
    matvec: Callable[[PyTree], PyTree],
    v_like: PyTree,
    key: jax.Array,
    num_probes: int,
    *,
    batch_size: int | None = None,
) -> StochasticEstimate:
    """Unbiased estimate of ``diag(A)`` as a pytree: ``(1/s) sum_i z_i * (A z_i)``.

    With Rademacher probes, entry ``j`` has variance ``sum_{l != j} A_jl^2 / s``
    (Bekas, Kokiopoulou & Saad 2007); the per-entry standard error is returned.
    No ``N x N`` matrix is ever formed. Cost: ``num_probes`` products.

    Args:
      matvec: symmetric operator on pytrees shaped like ``v_like``.
      v_like: pytree with the operator's shapes.
      key: PRNG key.
      num_probes: number of probes (``>= 1``; ``>= 2`` for a standard error).
      batch_size: optional chunking of the block product.

    Returns:
      :class:`StochasticEstimate` whose ``estimate`` and ``stderr`` are pytrees.

    Raises:
      ValueError: if ``num_probes <= 0``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> A = jnp.array([[2.0, 1.0], [1.0, 3.0]])
      >>> est = hutchinson_diag(lambda v: A @ v, jnp.zeros(2), jax.random.PRNGKey(0), 2000)
      >>> bool(jnp.all(jnp.abs(est.estimate - jnp.diag(A)) < 5 * est.stderr))
      True

    References:
      C. Bekas, E. Kokiopoulou and Y. Saad, *An estimator for the diagonal of a
      matrix*, Appl. Numer. Math. 2007.
    """
    _check_probes(num_probes)
    _tree.check_float_tree(v_like, "v_like")
    _tree.check_matvec(matvec, v_like, "v_like")
    Z = _probes(key, v_like, num_probes)
    AZ = _block_matvec(matvec, Z, batch_size)
    prod = jax.tree.map(jnp.multiply, Z, AZ)
    est = jax.tree.map(lambda x: jnp.mean(x, axis=0), prod)
    if num_probes > 1:
        se = jax.tree.map(lambda x: jnp.std(x, axis=0, ddof=1) / jnp.sqrt(num_probes), prod)
    else:
        se = jax.tree.map(lambda x: jnp.full(x.shape[1:], jnp.inf, x.dtype), prod)
    return StochasticEstimate(est, se, num_probes, _tree.all_finite(AZ))


def spectral_density(
    matvec: Callable[[PyTree], PyTree],
    v_like: PyTree,
    key: jax.Array,
    *,
    num_matvecs: int,
    num_probes: int,
    num_points: int = 512,
    sigma: float | None = None,
    grid: jax.Array | None = None,
) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    For each Gaussian probe ``v`` (normalised), ``m`` Lanczos steps give
    ``T = Y diag(theta) Y^T``; the nodes ``theta_j`` with weights ``Y_{0j}^2``
    form an ``m``-point Gauss quadrature of the measure ``v^T delta(t - A) v``,
    whose expectation is the spectral density ``(1/N) sum_i delta(t - lambda_i)``
    (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019). Each delta is
    broadened to a Gaussian of width ``sigma``; probes are averaged.

    Cost: ``num_probes * num_matvecs`` products, the probes run as one ``vmap``;
    memory ``num_probes * (num_matvecs + 2)`` vectors. Where ``v_like`` has
    explicit sharding types (a mesh with ``AxisType.Explicit`` axes), the probes
    run one after another (``lax.map``) instead: same results, memory
    ``num_matvecs + 2`` vectors.

    Args:
      matvec: symmetric operator on pytrees shaped like ``v_like``.
      v_like: pytree with the operator's shapes.
      key: PRNG key for the probes.
      num_matvecs: Lanczos depth per probe.
      num_probes: number of probes.
      num_points: size of the default grid.
      sigma: broadening; default ``(max - min) / 100`` of the Ritz values' range.
      grid: explicit evaluation points (overrides ``num_points``).

    Returns:
      :class:`SpectralDensity`.

    Raises:
      ValueError: if ``num_probes <= 0``, ``num_matvecs`` is not in ``[1, dim]``, or
        a concrete ``sigma`` is not a positive finite scalar.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> d = jnp.concatenate([jnp.zeros(50), jnp.full(50, 4.0)])  # two atoms
      >>> sd = spectral_density(lambda v: d * v, jnp.zeros(100), jax.random.PRNGKey(0),
      ...                       num_matvecs=8, num_probes=4, sigma=0.1)
      >>> dt = sd.grid[1] - sd.grid[0]
      >>> round(float(jnp.sum(sd.density) * dt), 3)  # integrates to one
      1.0
      >>> round(float(jnp.sum(jnp.where(sd.grid > 2.0, sd.density, 0.0)) * dt), 1)
      0.5

    References:
      L. Lin, Y. Saad and C. Yang, *Approximating spectral densities of large
      matrices*, SIAM Review 2016; B. Ghorbani, S. Krishnan and Y. Xiao, *An
      investigation into neural net optimization via Hessian eigenvalue
      density*, ICML 2019.
    """
    _check_probes(num_probes)
    _check_sigma(sigma)
    _tree.check_float_tree(v_like, "v_like")
    _tree.check_matvec(matvec, v_like, "v_like")
    n = _tree.size(v_like)
    if not isinstance(num_matvecs, int) or not 1 <= num_matvecs <= n:
        raise ValueError(f"`num_matvecs` must be an int in [1, {n}]; got {num_matvecs!r}.")
    keys = jax.random.split(key, num_probes)

    def one(k):
        v = _tree.normal_like(k, v_like)
        res = _lz.lanczos(matvec, v, num_matvecs)
        T = jnp.diag(res.alphas) + jnp.diag(res.betas, 1) + jnp.diag(res.betas, -1)
        theta, Y = jnp.linalg.eigh(T)
        return theta, Y[0] ** 2, res.finite

    if any(_tree.explicit_sharding(x) is not None for x in jax.tree.leaves(v_like)):
        # explicit sharding types: ``vmap`` of Lanczos's breakdown ``lax.cond`` (a batched
        # predicate on explicitly sharded operands) does not type-check in JAX (0.10.2);
        # run the probes one after another instead (same results, one probe's memory)
        nodes, weights, finite = jax.lax.map(one, keys)
    else:
        nodes, weights, finite = jax.vmap(one)(keys)
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    width = jnp.maximum(hi - lo, jnp.finfo(nodes.dtype).eps * (1 + jnp.abs(hi)))
    s = width / 100.0 if sigma is None else jnp.asarray(sigma, nodes.dtype)
    if grid is None:
        grid = jnp.linspace(lo - 5 * s, hi + 5 * s, num_points)
    grid = jnp.asarray(grid, nodes.dtype)
    z = (grid[:, None, None] - nodes[None]) / s
    kern = jnp.exp(-0.5 * z**2) / (s * jnp.sqrt(2 * jnp.pi))
    density = jnp.sum(kern * weights[None], axis=(1, 2)) / num_probes
    return SpectralDensity(grid, density, nodes, weights, s, jnp.all(finite))
