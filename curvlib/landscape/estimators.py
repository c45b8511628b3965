"""Estimators of ``Delta_1``, ``Delta_2`` and ``Delta_2^(D)`` (Kiselev & Grabovoy 2026).

``Delta_p(k+1) = E_{w ~ q} |L_{k+1}(w) - L_k(w)|^p`` for three probing laws:

=====================  ===  =============================================
criterion              p    probe ``w``
=====================  ===  =============================================
``delta1``             1    ``w*`` (point mass)
``delta2_full_mc``     2    ``w* + e``, ``e ~ N(0, sigma^2 I_N)``
``delta2_*`` (D)       2    ``w* + U_D^T z``, ``z ~ N(0, sigma^2 I_D)``
=====================  ===  =============================================

Every estimator accepts a grid of ``sigma`` values and evaluates it in one
compiled program; Monte Carlo draws are shared across the grid (common random
numbers) and, by default, used in antithetic pairs ``(z, -z)``, which removes the
odd (``a c^T z``) part of the variance without bias. Subspace draws are made
coordinate by coordinate (``z_i`` from ``fold_in(key, i)``), so the same ``key``
gives the same ``z`` prefix for every ``D``: the quadratic and the direct Monte
Carlo estimators see identical samples, and nested ``D`` are nested draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _deprecation, _space, _tree, _validate, _xp
from curvlib._compile import eager_jit, quick_jit
from curvlib._xp import xp
from curvlib.krylov.stochastic import MonteCarloEstimate, monte_carlo_estimate
from curvlib.landscape import _common
from curvlib.landscape.coefficients import IncrementCoefficients, _cast_basis, mean_check

PyTree = Any


class ClosedFormTerms(NamedTuple):
    """The Gaussian-moment value as a polynomial in ``sigma^2``; the three terms add up to it.

    Attributes:
      constant: ``a^2`` (``= Delta_1^2``; what the value tends to as ``sigma -> 0``).
      sigma2: ``sigma^2 (a tr B + ||c||^2)`` (may be negative through ``a tr B``).
      sigma4: ``sigma^4 (2 tr B^2 + (tr B)^2) / 4`` (the curvature part, >= 0).
    """

    constant: jax.Array
    sigma2: jax.Array
    sigma4: jax.Array

    def total(self):
        """``constant + sigma2 + sigma4``: ``Delta_2^(D)`` (`closed_form_total`)."""
        return closed_form_total(self.constant, self.sigma2, self.sigma4, np if isinstance(
            self.constant, np.ndarray) else jnp)


def closed_form_total(constant, sigma2, sigma4, xp=jnp):
    """The sum of the three terms; ``+inf`` where ``sigma2`` overflowed to ``-inf`` beside an
    infinite ``sigma4`` (the plain sum was NaN): the value, at least ``sigma^4 tr(B^2) / 2``,
    is then within a factor ``D / 2 + 1`` of the dtype's range or past it."""
    total = constant + sigma2 + sigma4
    return xp.where(xp.isneginf(sigma2) & xp.isposinf(sigma4), xp.inf, total)


# ------------------------------------------------------------ closed form


def _scale(x):
    """The largest magnitude of ``x``, or 1 where it is 0 or not finite (a divisor)."""
    m = xp.max(xp.abs(x))
    return xp.where((m > 0) & xp.isfinite(m), m, 1.0).astype(m.dtype)


def _terms(a, c, B, sigma):
    B = 0.5 * (B + B.T)  # the quadratic form's matrix: only its symmetric part counts
    trB = xp.trace(B)
    constant = xp.broadcast_to(a * a, sigma.shape)
    # Each product is formed with sigma already in it, and the squares of B and c of their
    # entries over the largest (sqrt(2 tr B^2 + (tr B)^2) is of degree one in B): a square,
    # or sigma^2 and sigma^4, alone overflow or underflow where the terms fit (float32:
    # sigma = 1e12, tr B^2 = 1e-30: sigma^4 is 1e48, the term 7.5e17; B = 1e20 I and
    # sigma = 1e-15: tr B^2 is 2e40, the term 2e-20; B = 1e-30 I, sigma = 1e20: tr B^2 is 0)
    sb, sc = _scale(B), _scale(c)
    Bn, cn = B / sb, c / sc
    # (an exact zero factor stays 0 beside a sigma^2 that overflows: no 0 * inf)
    sigma2 = (xp.where((a == 0) | (trB == 0), 0.0, (sigma * a) * (sigma * trB))
              + (sigma * sc) * ((sigma * sc) * xp.dot(cn, cn)))
    root = sb * xp.sqrt((2.0 * xp.sum(Bn * Bn) + xp.trace(Bn) ** 2) / 4.0)
    sigma4 = (sigma * (sigma * root)) ** 2
    return ClosedFormTerms(constant, sigma2, sigma4)


_traced_terms = eager_jit(_terms)


def _check_coefficients(a, c, B):
    a, c, B = jnp.asarray(a), jnp.asarray(c), jnp.asarray(B)
    if c.ndim != 1 or B.shape != (c.shape[0], c.shape[0]) or a.ndim != 0:
        raise ValueError(
            f"`a`, `c`, `B`: expected coefficients a (scalar), c of shape (D,) and B of shape "
            f"(D, D); got "
            f"{a.shape}, {c.shape}, {B.shape}."
        )
    dt = jnp.result_type(a, c, B)
    if not jnp.issubdtype(dt, jnp.floating):
        dt = jnp.result_type(float)
    return a.astype(dt), c.astype(dt), B.astype(dt)


def delta2_closed_form_terms(a, c, B, sigma) -> ClosedFormTerms:
    """The three ``sigma``-terms of `delta2_closed_form`, each shaped like ``sigma``.

    ``a^2``, ``sigma^2 (a tr B + ||c||^2)`` and ``sigma^4 (2 tr B^2 + (tr B)^2) / 4``.
    Near ``sigma -> 0`` the sum tends to ``a^2``, which hides the curvature
    part unless the terms are shown on their own. Concrete arguments on one device
    are summed on NumPy (nothing compiles); others in one small program.

    Args:
      a: scalar ``L_{k+1}(w*) - L_k(w*)`` (from
        [`increment_coefficients`][curvlib.landscape.increment_coefficients]).
      c: ``(D,)`` projected gradient increment.
      B: ``(D, D)`` projected, symmetrised Hessian increment.
      sigma: scalar or 1-D grid (> 0).

    Returns:
      [`ClosedFormTerms`][curvlib.landscape.ClosedFormTerms], each term shaped like ``sigma``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.landscape import delta2_closed_form_terms
      >>> t = delta2_closed_form_terms(0.5, jnp.ones(2), jnp.eye(2), 0.1)
      >>> [round(float(x), 6) for x in t]  # a^2, s^2 (a trB + |c|^2), s^4 (2*2 + 2^2)/4
      [0.25, 0.03, 0.0002]
    """
    a, c, B = _check_coefficients(a, c, B)
    s = _validate.number(sigma, "sigma", minimum=0, exclusive=True, grid=True, dtype=a.dtype,
                         what=_common.SIGMA)
    if not _space.on_one_device(a, c, B, s):  # traced, or placed on several devices
        return _traced_terms(a, c, B, s)
    with _xp.host():  # O(D^2) on concrete numbers: NumPy, no compile
        t = _terms(*(np.asarray(x) for x in (a, c, B, s)))
    return ClosedFormTerms(*jax.device_put(tuple(np.asarray(x, a.dtype) for x in t)))


def delta2_closed_form(a, c, B, sigma) -> jax.Array:
    """Gaussian-moment closed form of ``Delta_2^(D)``: the exact mean of the quadratic surrogate.

    For ``q(z) = a + c^T z + 1/2 z^T B z`` and ``z ~ N(0, sigma^2 I_D)``
    (Isserlis' theorem):

        E q^2 = a^2 + sigma^2 (a tr B + ||c||^2) + sigma^4 (2 tr B^2 + (tr B)^2) / 4

    Cost ``O(D^2)`` once ``(a, c, B)`` exist
    ([`increment_coefficients`][curvlib.landscape.increment_coefficients]); a ``sigma`` grid is one
    vectorised call. Nested ``D``: pass ``c[:D]``, ``B[:D, :D]``
    ([`IncrementCoefficients.prefix`][curvlib.landscape.IncrementCoefficients.prefix]).

    Args:
      a: scalar ``L_{k+1}(w*) - L_k(w*)``.
      c: ``(D,)`` projected gradient increment.
      B: ``(D, D)`` projected, symmetrised Hessian increment.
      sigma: scalar or 1-D grid of per-coordinate standard deviations (> 0).

    Returns:
      ``Delta_2^(D)`` shaped like ``sigma``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.landscape import delta2_closed_form
      >>> float(delta2_closed_form(0.0, jnp.zeros(2), jnp.eye(2), 1.0))  # (2*2 + 2^2)/4
      2.0
      >>> delta2_closed_form(0.0, jnp.zeros(2), jnp.eye(2), jnp.array([1.0, 2.0])).tolist()
      [2.0, 32.0]

    References:
      N. Kiselev and A. Grabovoy, *Curvature-Aligned Probing for Local
      Loss-Landscape Stabilization*, arXiv:2604.14870 (2026).
    """
    return delta2_closed_form_terms(a, c, B, sigma).total()


def delta2_spectral(eigenvalues_k, eigenvalues_k1, sigma) -> jax.Array:
    """The spectral corollary ``sigma^4/4 (2 sum delta_i^2 + (sum delta_i)^2)``.

    ``delta_i = lambda_i^(k+1) - lambda_i^(k)`` for the top-``D`` eigenvalues of the
    two Hessians. Exact for ``Delta_2^(D)`` when both Hessians share those
    eigenvectors and ``a = 0``, ``c = 0`` (e.g. at a common minimiser of a
    commuting family); otherwise a curvature-only approximation.

    Args:
      eigenvalues_k: ``(D,)`` eigenvalues of ``H^(k)``.
      eigenvalues_k1: ``(D,)`` eigenvalues of ``H^(k+1)``, matched index by index.
      sigma: scalar or 1-D grid (> 0).

    Returns:
      An array shaped like ``sigma``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.landscape import delta2_spectral
      >>> # delta = (1, 1): sigma^4 / 4 (2 * 2 + 2^2) = 2 at sigma = 1
      >>> float(delta2_spectral(jnp.array([3.0, 2.0]), jnp.array([4.0, 3.0]), 1.0))
      2.0
    """
    lk = _validate.real_vector(eigenvalues_k, "eigenvalues_k", what="real eigenvalues")
    lk1 = _validate.real_vector(eigenvalues_k1, "eigenvalues_k1", what="real eigenvalues")
    if lk.shape != lk1.shape:
        raise ValueError(
            f"`eigenvalues_k`, `eigenvalues_k1`: eigenvalue vectors must be 1-D of equal "
            f"length; got {lk.shape} and {lk1.shape}."
        )
    d = lk1 - lk
    s2 = _validate.number(sigma, "sigma", minimum=0, exclusive=True, grid=True, dtype=d.dtype,
                          what=_common.SIGMA) ** 2
    return s2 * s2 / 4.0 * (2.0 * jnp.sum(d * d) + jnp.sum(d) ** 2)


@_deprecation.renamed("curvlib.landscape.delta2_bound", k="num_examples")
def delta2_bound(num_examples, sigma, dim, max_loss, max_grad, max_hess) -> jax.Array:
    """The theorem's bound ``(12 M_l^2 + 3 sigma^2 M_g^2 + 3 sigma^4 (D^2 + 2D) M_H^2) / (k+1)^2``.

    Holds for the quadratic model under the Gaussian probe when
    ``|l_i(w*)| <= M_l`` for every sample, ``||H_i(w*)||_2 <= M_H`` for every sample
    and ``||grad l_{k+1}(w*) - g^(k)(w*)|| <= M_g`` (the per-sample gradient when
    ``w*`` is stationary for ``L_k``; ``2 max_i ||grad l_i(w*)||`` always works).

    Args:
      num_examples: ``k``, the number of examples averaged in ``L_k`` (the paper's sample count)
        (scalar or array).
      sigma: scalar or grid.
      dim: subspace dimension ``D``.
      max_loss: ``M_l`` (bounds ``|l_i(w*)|``).
      max_grad: ``M_g`` (bounds the gradient increment, see above).
      max_hess: ``M_H`` (bounds ``||H_i(w*)||_2``).

    Returns:
      The bound, ``k`` and ``sigma`` broadcast together as NumPy arrays are: two grids of
      equal length pair up entry by entry; for a table of every ``k`` with every
      ``sigma`` pass ``k`` as a column (``np.asarray(ks)[:, None]``).

    Raises:
      ValueError: for ``num_examples`` or ``dim`` not an integer ``>= 1``, a bound that is
        negative or not finite, or a ``sigma`` that is not positive and finite.

    Examples:
      >>> from curvlib.landscape import delta2_bound
      >>> float(delta2_bound(1, 1.0, 1, max_loss=1.0, max_grad=0.0, max_hess=0.0))  # 12 / 2^2
      3.0
      >>> import numpy as np
      >>> delta2_bound(np.array([1, 3])[:, None], [1.0, 2.0], 1, max_loss=1.0, max_grad=1.0,
      ...              max_hess=0.0).tolist()  # (12 + 3 sigma^2) / (k + 1)^2, k by sigma
      [[3.75, 6.0], [0.9375, 1.5]]
    """
    k = _validate.number(num_examples, "num_examples", minimum=1, integer=True)  # paper's k
    s2 = _validate.number(sigma, "sigma", minimum=0, exclusive=True, grid=True,
                          what=_common.SIGMA) ** 2
    _validate.number(dim, "dim", minimum=1, integer=True)
    for name, bound in (("max_loss", max_loss), ("max_grad", max_grad),
                        ("max_hess", max_hess)):
        _validate.number(bound, name, minimum=0)
    k = jnp.asarray(k)
    num = 12 * max_loss**2 + 3 * s2 * max_grad**2 + 3 * s2 * s2 * (dim**2 + 2 * dim) * max_hess**2
    try:
        np.broadcast_shapes(k.shape, jnp.shape(s2))
    except ValueError:
        raise ValueError(
            f"`num_examples` (shape {k.shape}) and `sigma` (shape {jnp.shape(s2)}) must "
            "broadcast together; for a table of every k with every sigma pass k as a "
            "column, e.g. np.asarray(ks)[:, None]."
        ) from None
    return num / (k + 1.0) ** 2


# -------------------------------------------------------- sampling helpers


def subspace_normals(key: jax.Array, num_samples: int, dim: int, dtype=jnp.float32) -> jax.Array:
    """Standard normal draws ``(num_samples, dim)``, column ``i`` from ``fold_in(key, i)``.

    Prefix-consistent: the first ``d`` columns do not depend on ``dim >= d``,
    so nested subspaces see nested draws.

    Args:
      key: PRNG key.
      num_samples: rows (Monte-Carlo samples).
      dim: columns (subspace dimension).
      dtype: the draws' dtype.

    Returns:
      The ``(num_samples, dim)`` draws.

    Examples:
      >>> import jax, numpy as np
      >>> from curvlib.landscape import subspace_normals
      >>> z4 = subspace_normals(jax.random.PRNGKey(0), 5, 4)
      >>> z2 = subspace_normals(jax.random.PRNGKey(0), 5, 2)
      >>> z4.shape, bool(np.array_equal(z4[:, :2], z2))
      ((5, 4), True)
    """
    _validate.prng_key(key)
    num_samples = _validate.static_int(num_samples, "num_samples", minimum=1)
    dtype = _validate.float_dtype(dtype, "dtype")
    return _normals(key, num_samples, _validate.static_int(dim, "dim", minimum=1), dtype)


def _normals(key, num_samples: int, dim: int, dtype):
    """`subspace_normals` of checked arguments (the estimators' own draws)."""
    cols = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (num_samples,), dtype))(
        jnp.arange(dim)
    )
    return cols.T


def _signs(antithetic: bool, dtype):
    return jnp.asarray([1.0, -1.0] if antithetic else [1.0], dtype)


def _summarise(vals, num_samples):
    """``vals`` (G, S, P): average the P antithetic partners, then mean/stderr over S.

    Each grid point's draws are divided by their largest magnitude first: at a large
    ``sigma`` the squares inside the standard deviation (and the sums inside the means)
    of finite draws overflowed to a NaN estimate where the mean is representable.
    """
    c = jnp.max(jnp.abs(vals), axis=(-2, -1))
    c = jnp.where((c > 0) & jnp.isfinite(c), c, 1.0)
    per = jnp.mean(vals / c[..., None, None], axis=-1)
    mean = c * jnp.mean(per, axis=-1)
    std = c * jnp.std(per, axis=-1, ddof=1)
    return mean, std / math.sqrt(num_samples)  # a Python float: keeps std's dtype


def _no_overflow(mean, stderr):
    """``(mean, stderr)`` with NaN for an entry either of which is not finite: an overflowed
    entry (inf) is no estimate (`MonteCarloEstimate`, as Hutchinson's). Inside each
    estimator's program (eager `jnp` ops after it would compile one program each)."""
    ok = jnp.isfinite(mean) & jnp.isfinite(stderr)
    return jnp.where(ok, mean, jnp.nan), jnp.where(ok, stderr, jnp.nan)


def _grid(sigma, dtype):
    s = _validate.number(sigma, "sigma", minimum=0, exclusive=True, grid=True, dtype=dtype,
                         what=_common.SIGMA)
    return s, jnp.atleast_1d(s)


def _estimate(mean, stderr, sigma, num_samples, antithetic) -> MonteCarloEstimate:
    """Package grid results as a `MonteCarloEstimate` shaped like ``sigma`` (the plain
    standard error over ``num_samples`` draws: ``num_samples - 1`` degrees of freedom)."""
    P = 2 if antithetic else 1
    finite = jnp.all(jnp.isfinite(mean)) & jnp.all(jnp.isfinite(stderr))
    return monte_carlo_estimate(
        mean.reshape(sigma.shape), stderr.reshape(sigma.shape), num_samples=num_samples,
        num_evaluations=num_samples * P, num_matvecs=0, finite=finite,
    )


class _SampledSetup(NamedTuple):
    k: int
    loss_fn: Callable  # keyed by its program (`_common.check_problem`)
    microbatch_size: int | None
    num_samples: int
    sample_batch_size: int | None
    dtype: Any
    sigma: jax.Array  # as given (scalar or 1-D): the output shape
    grid: jax.Array  # 1-D


def _check_sampled(loss_fn, params, data, k, sigma, key, num_samples, microbatch_size,
                   sample_batch_size) -> _SampledSetup:
    """Input checks shared by the loss-sampling estimators (direct and full-space MC)."""
    k, loss_fn = _common.check_problem(loss_fn, params, data, k)
    mb = _validate.static_int(microbatch_size, "microbatch_size", minimum=1, optional=True)
    S = _validate.static_int(num_samples, "num_samples", minimum=2, what=_common.TWO_DRAWS)
    _validate.prng_key(key)
    sample_batch_size = _validate.static_int(sample_batch_size, "sample_batch_size", minimum=1,
                                             optional=True)
    # sigma and the draws in the coefficients' dtype (at least float32): the same key draws
    # the same numbers as `delta2_quadratic_mc` for bfloat16 / float16 parameters too
    dt = _common.weight_dtype(params)
    s0, sig = _grid(sigma, dt)
    return _SampledSetup(k, loss_fn, mb, S, sample_batch_size, dt, s0, sig)


# ------------------------------------------------------------ quadratic MC


# O(S D^2) arithmetic: compiled with less backend optimisation (a third of the compile time)
@quick_jit(static_argnames=("num_samples", "antithetic"))
def _quadratic_mc(a, c, B, sig, key, num_samples, antithetic):
    dt = jnp.result_type(a, c, B)
    z = _normals(key, num_samples, c.shape[0], dt)  # (S, D)
    lin = z @ c  # (S,)
    quad = jnp.einsum("si,ij,sj->s", z, B, z)  # (S,)
    sg = _signs(antithetic, dt)  # (P,)
    s = sig[:, None, None]
    q = a + s * sg[None, None, :] * lin[None, :, None] + 0.5 * s * s * quad[None, :, None]
    return _no_overflow(*_summarise(q * q, num_samples))


def delta2_quadratic_mc(
    a, c, B, sigma, *, key: jax.Array, num_samples: int, antithetic: bool = True
) -> MonteCarloEstimate:
    """Monte Carlo mean of ``(a + c^T z + 1/2 z^T B z)^2``, ``z ~ N(0, sigma^2 I_D)``.

    Converges to [`delta2_closed_form`][curvlib.landscape.delta2_closed_form] at rate
    ``num_samples^-1/2``; useful as a check of the closed form and as the quadratic model's share of
    [`delta2_direct_mc`][curvlib.landscape.delta2_direct_mc] (same ``key`` = same draws). One
    compiled program for the whole ``sigma`` grid; cost ``O(S D^2)``.

    Args:
      a: scalar ``L_{k+1}(w*) - L_k(w*)`` (from
        [`increment_coefficients`][curvlib.landscape.increment_coefficients]).
      c: ``(D,)`` projected gradient increment.
      B: ``(D, D)`` projected, symmetrised Hessian increment.
      sigma: scalar or 1-D grid (> 0).
      key: PRNG key.
      num_samples: independent draws ``S`` (antithetic pairs when ``antithetic``).
      antithetic: evaluate each draw at ``z`` and ``-z``.

    Returns:
      [`MonteCarloEstimate`][curvlib.landscape.MonteCarloEstimate] shaped like ``sigma``, with
      the plain standard error of the ``S`` draws (skewed: at small ``S`` its intervals
      cover less than their nominal rate, *Error bars* in `docs/landscape.md`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib.landscape import delta2_closed_form, delta2_quadratic_mc
      >>> a, c, B = 0.1, jnp.array([1.0, 0.5]), jnp.eye(2)
      >>> est = delta2_quadratic_mc(a, c, B, 0.5, key=jax.random.PRNGKey(0), num_samples=20_000)
      >>> gm = delta2_closed_form(a, c, B, 0.5)
      >>> bool(abs(est.estimate - gm) < 4 * est.stderr), est.num_evaluations
      (True, 40000)
    """
    a, c, B = _check_coefficients(a, c, B)
    S = _validate.static_int(num_samples, "num_samples", minimum=2, what=_common.TWO_DRAWS)
    _validate.prng_key(key)
    s0, sig = _grid(sigma, a.dtype)
    mean, se = _quadratic_mc(a, c, B, sig, key, S, bool(antithetic))
    return _estimate(mean, se, s0, S, antithetic)


# --------------------------------------------------------------- direct MC


def _evaluate(f, xs, sample_batch_size):
    if sample_batch_size is None:
        return jax.vmap(f)(xs)
    return jax.lax.map(f, xs, batch_size=sample_batch_size)


@eager_jit(
    static_argnames=("loss_fn", "num_samples", "antithetic", "microbatch_size",
                     "sample_batch_size"),
)
def _direct_mc(loss_fn, params, data, k, U, dim, sig, key, num_samples, antithetic,
               microbatch_size, sample_batch_size, control=None):
    dt = _common.weight_dtype(params)  # `delta2_quadratic_mc`'s draws (`_check_sampled`)
    D = _tree.basis_size(U)
    z = _normals(key, num_samples, D, dt)
    z = jnp.where(jnp.arange(D)[None, :] < dim, z, 0.0)
    sg = _signs(antithetic, dt)
    G, P = sig.shape[0], sg.shape[0]
    # flatten (sigma, sample, sign) so one map covers the whole grid
    coef = (sig[:, None, None] * sg[None, None, :])[..., None] * z[None, :, None, :]
    coef = coef.reshape(G * num_samples * P, D)
    inc = _common.increment_fn(loss_fn, data, k, microbatch_size, _common.weight_dtype(params))

    def one(zc):
        w = jax.tree.map(jnp.add, params, _tree.basis_combine(U, zc, like=params))
        f = inc(w) ** 2
        if control is None:
            return f
        a, c, B = control
        q = a + jnp.dot(c, zc) + 0.5 * jnp.dot(zc, B @ zc)
        return f - q * q

    vals = _evaluate(one, coef, sample_batch_size).reshape(G, num_samples, P)
    mean, se = _summarise(vals, num_samples)
    if control is not None:
        a, c, B = control
        m = (jnp.arange(D) < dim).astype(c.dtype)
        t = delta2_closed_form_terms(a, c * m, B * m[:, None] * m[None, :], sig)
        mean = mean + t.total()
    return _no_overflow(mean, se)


@_deprecation.renamed("curvlib.landscape.delta2_direct_mc", k="num_examples")
def delta2_direct_mc(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    num_examples: int,
    eigenvectors: PyTree,
    sigma,
    *,
    key: jax.Array,
    num_samples: int,
    dim: int | None = None,
    antithetic: bool = True,
    microbatch_size: int | None = None,
    sample_batch_size: int | None = None,
    control_variate=None,
    check_mean: bool = True,
) -> MonteCarloEstimate:
    """Direct subspace Monte Carlo ``Delta_2^(D)``: the reference, with no quadratic assumption.

    ``(1/S) sum_s (L_{k+1}(w_s) - L_k(w_s))^2`` with ``w_s = w* + U^T z_s``,
    ``z_s ~ N(0, sigma^2 I_D)``. Every (``sigma``, draw, sign) evaluation runs in
    one compiled program: ``vmap`` over all of them, or ``lax.map`` in chunks of
    ``sample_batch_size`` to bound memory; the ``k``-sample mean is microbatched
    when ``microbatch_size`` is set. Each increment is one weighted sum of per-sample
    losses (the mean identity): ``n`` per-sample forward passes (all of ``data``, those
    past ``k + 1`` at zero weight), or ``ceil((k + 1) / m) * m`` with ``microbatch_size =
    m``. The total is ``len(sigma) * S * (2 if antithetic else 1)`` increments.

    Args:
      loss_fn: ``loss_fn(params, batch)``, the mean loss over the batch's leading axis.
      params: the point ``w*``.
      data: ordered samples.
      num_examples: ``k``, the number of examples averaged in ``L_k``, ``1 <= k < n``.
      eigenvectors: orthonormal basis (leading axis ``Dmax``), e.g.
        ``curvature_subspace(...).eigenvectors``.
      sigma: scalar or 1-D grid (> 0).
      key: PRNG key; the same key as [`delta2_quadratic_mc`][curvlib.landscape.delta2_quadratic_mc]
        gives the same draws.
      num_samples: independent draws ``S``.
      dim: use only the first ``dim`` vectors (nested subspaces share one compiled
        program; under ``jax.jit`` it may be traced); default all.
      antithetic: evaluate each draw at ``z`` and ``-z``.
      microbatch_size: chunk size over the ``k`` samples.
      sample_batch_size: evaluations per vectorised chunk (default: all at once).
      control_variate: optional ``(a, c, B)`` of the same basis
        ([`increment_coefficients`][curvlib.landscape.increment_coefficients]). The quadratic model
        is then a control
        variate: the estimate is ``GM + mean_s (f(z_s) - q(z_s)^2)``, still
        unbiased for the direct value, but its standard error measures only the
        quadratic model's error on the draws, not the spread of ``q^2`` itself
        (orders of magnitude smaller wherever the model is good).
      check_mean: verify that ``loss_fn`` is a mean at ``params`` first
        ([`check_mean_loss`][curvlib.landscape.check_mean_loss]).

    Returns:
      [`MonteCarloEstimate`][curvlib.landscape.MonteCarloEstimate] shaped like ``sigma``;
      ``stderr`` as in [`delta2_quadratic_mc`][curvlib.landscape.delta2_quadratic_mc].

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib.landscape import delta2_direct_mc, delta2_quadratic_mc
      >>> from curvlib.landscape import increment_coefficients
      >>> loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)  # exactly quadratic
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (6, 3)); data = (x, x @ jnp.ones(3))
      >>> w, U = jnp.zeros(3), jnp.eye(3)[:2]
      >>> key = jax.random.PRNGKey(1)
      >>> est = delta2_direct_mc(loss, w, data, 4, U, 0.1, key=key, num_samples=64)
      >>> quad = delta2_quadratic_mc(*increment_coefficients(loss, w, data, 4, U), 0.1,
      ...                            key=key, num_samples=64)  # the same draws
      >>> bool(jnp.allclose(est.estimate, quad.estimate, rtol=1e-4))
      True
    """
    st = _check_sampled(loss_fn, params, data, num_examples, sigma, key, num_samples,
                        microbatch_size,
                        sample_batch_size)
    loss_fn = st.loss_fn
    Dmax = _validate.basis(eigenvectors, params)
    if dim is None:
        dim = Dmax
    if isinstance(dim, jax.core.Tracer):
        if dim.ndim or not jnp.issubdtype(dim.dtype, jnp.integer):
            raise ValueError(
                f"`dim` must be an integer scalar; got a traced {dim.dtype}{dim.shape}."
            )
    elif isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= Dmax:
        raise ValueError(
            f"`dim` (the nested subspace dimension) must be an int in [1, D] with D = {Dmax} "
            f"the number of `eigenvectors`; got {dim!r}."
        )
    if check_mean:
        mean_check(loss_fn, params, data, st.k, st.microbatch_size)
    U = _cast_basis(eigenvectors, params)
    control = None
    if control_variate is not None:
        if not (isinstance(control_variate, (tuple, list)) and len(control_variate) == 3
                or hasattr(control_variate, "B")):
            raise TypeError("`control_variate` must be (a, c, B) (an IncrementCoefficients); "
                            f"got {control_variate!r}.")
        a, c, B = (jnp.asarray(x, st.dtype) for x in control_variate)
        if a.shape != () or c.shape != (Dmax,) or B.shape != (Dmax, Dmax):
            raise ValueError(
                f"`control_variate` must be (a, c, B) for the same {Dmax}-vector basis; got "
                f"shapes {a.shape}, {c.shape}, {B.shape}."
            )
        control = (a, c, B)
    mean, se = _direct_mc(loss_fn, params, data, st.k, U, jnp.asarray(dim), st.grid, key,
                          st.num_samples, bool(antithetic), st.microbatch_size,
                          st.sample_batch_size, control)
    return _estimate(mean, se, st.sigma, st.num_samples, antithetic)


# ------------------------------------------------------------- full space


@eager_jit(
    static_argnames=("loss_fn", "num_samples", "antithetic", "microbatch_size",
                     "sample_batch_size"),
)
def _full_mc(loss_fn, params, data, k, sig, key, num_samples, antithetic, microbatch_size,
             sample_batch_size):
    dt = _tree.dtype(params)
    sg = _signs(antithetic, dt)
    G, P = sig.shape[0], sg.shape[0]
    keys = jax.random.split(key, num_samples)
    gi, si, pi = jnp.meshgrid(jnp.arange(G), jnp.arange(num_samples), jnp.arange(P),
                              indexing="ij")
    scale = (sig[gi] * sg[pi]).reshape(-1)
    ks = keys[si.reshape(-1)]
    inc = _common.increment_fn(loss_fn, data, k, microbatch_size, _common.weight_dtype(params))

    def one(x):
        s, kk = x
        e = _tree.flat_normal_like(kk, params)
        w = jax.tree.map(lambda p, n: p + (s * n).astype(p.dtype), params, e)
        return inc(w) ** 2

    vals = _evaluate(one, (scale, ks), sample_batch_size).reshape(G, num_samples, P)
    return _no_overflow(*_summarise(vals, num_samples))


@_deprecation.renamed("curvlib.landscape.delta2_full_mc", k="num_examples")
def delta2_full_mc(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    num_examples: int,
    sigma,
    *,
    key: jax.Array,
    num_samples: int,
    antithetic: bool = True,
    microbatch_size: int | None = None,
    sample_batch_size: int | None = None,
    check_mean: bool = True,
) -> MonteCarloEstimate:
    """Full-space Monte Carlo ``Delta_2``: isotropic probe ``w* + e``, ``e ~ N(0, sigma^2 I_N)``.

    ``E ||w - w*||^2 = N sigma^2`` (versus ``D sigma^2`` in a subspace). The
    baseline that ``Delta_2^(D)`` is compared with. One compiled program for the
    grid; each draw regenerates its ``N`` normals from its own key (no ``S x N``
    buffer). Cost as [`delta2_direct_mc`][curvlib.landscape.delta2_direct_mc].

    Args:
      loss_fn: as [`delta2_direct_mc`][curvlib.landscape.delta2_direct_mc].
      params: as [`delta2_direct_mc`][curvlib.landscape.delta2_direct_mc].
      data: as [`delta2_direct_mc`][curvlib.landscape.delta2_direct_mc].
      num_examples: ``k``, as [`delta2_direct_mc`][curvlib.landscape.delta2_direct_mc].
      sigma: scalar or 1-D grid (> 0).
      key: PRNG key.
      num_samples: independent draws ``S``.
      antithetic: evaluate each draw at ``e`` and ``-e``.
      microbatch_size: as [`delta2_direct_mc`][curvlib.landscape.delta2_direct_mc].
      sample_batch_size: as [`delta2_direct_mc`][curvlib.landscape.delta2_direct_mc].
      check_mean: as [`delta2_direct_mc`][curvlib.landscape.delta2_direct_mc].

    Returns:
      [`MonteCarloEstimate`][curvlib.landscape.MonteCarloEstimate] shaped like ``sigma``;
      ``stderr`` as in [`delta2_quadratic_mc`][curvlib.landscape.delta2_quadratic_mc].

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib.landscape import delta2_closed_form, delta2_full_mc, increment_coefficients
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
      >>> loss = lambda w, xb: jnp.mean((xb @ w - 1.0) ** 2)  # exactly quadratic in w
      >>> est = delta2_full_mc(loss, jnp.zeros(3), x, 4, 0.1, key=jax.random.PRNGKey(1),
      ...                      num_samples=2000)
      >>> coef = increment_coefficients(loss, jnp.zeros(3), x, 4, jnp.eye(3))  # D = N = 3
      >>> gm = delta2_closed_form(*coef, 0.1)
      >>> bool(abs(est.estimate - gm) < 4 * est.stderr)  # D = N: the full-space value
      True
    """
    st = _check_sampled(loss_fn, params, data, num_examples, sigma, key, num_samples,
                        microbatch_size,
                        sample_batch_size)
    loss_fn = st.loss_fn
    if check_mean:
        mean_check(loss_fn, params, data, st.k, st.microbatch_size)
    mean, se = _full_mc(loss_fn, params, data, st.k, st.grid, key, st.num_samples,
                        bool(antithetic), st.microbatch_size, st.sample_batch_size)
    return _estimate(mean, se, st.sigma, st.num_samples, antithetic)


# --------------------------------------------------------------- pointwise


@_deprecation.renamed("curvlib.landscape.delta1", k="num_examples")
def delta1(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    num_examples: int,
    *,
    microbatch_size: int | None = None,
    check_mean: bool = True,
) -> jax.Array:
    """Pointwise criterion ``Delta_1(k+1) = |L_{k+1}(params) - L_k(params)|``.

    Cost: ``k + 1`` per-sample forward passes (the mean identity,
    [`loss_increment`][curvlib.landscape.loss_increment]; all ``n`` samples of ``data`` without
    microbatching). Its square is the ``sigma -> 0`` limit of every
    ``Delta_2`` variant. One compiled program for every ``k``.

    Args:
      loss_fn: ``loss_fn(params, batch)``, the mean loss over the batch's leading axis.
      params: the point ``w*``.
      data: ordered samples.
      num_examples: ``k``, the number of examples averaged in ``L_k`` (the paper's sample count),
        ``1 <= k < n``.
      microbatch_size: chunk size over the samples.
      check_mean: verify that ``loss_fn`` is a mean at ``params`` first.

    Returns:
      A non-negative scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.landscape import delta1
      >>> loss = lambda w, x: jnp.mean((x - w) ** 2)
      >>> round(float(delta1(loss, 0.0, jnp.array([2.0, 1.0, 0.0]), 2)), 4)  # |5/3 - 5/2|
      0.8333
    """
    k = num_examples  # the paper's k
    from curvlib.landscape.coefficients import _loss_increment

    k, loss_fn = _common.check_problem(loss_fn, params, data, k)
    mb = _validate.static_int(microbatch_size, "microbatch_size", minimum=1, optional=True)
    if check_mean:
        mean_check(loss_fn, params, data, k, mb)
    return jnp.abs(_loss_increment(loss_fn, params, data, k, mb))


# ----------------------------------------------------------- k_curve's step
# (the inputs were checked once, by `curvlib.landscape.k_curve`; ``plan`` is its validated
# grid and options, ``plan.data`` the samples it uses)

@eager_jit(static_argnames=("dims",))
def _closed_form_grid(a, c, B, sig, dims):
    """``(nD, nS)`` arrays of the three closed-form terms for every nested ``D``."""
    terms = [delta2_closed_form_terms(a, c[:d], B[:d, :d], sig) for d in dims]
    return tuple(jnp.stack([getattr(t, f) for t in terms]) for f in ("constant", "sigma2",
                                                                       "sigma4"))


@eager_jit(static_argnames=("dims",))
def _spectral_grid(lam_k, lam_k1, sig, dims):
    return jnp.stack([delta2_spectral(lam_k[:d], lam_k1[:d], sig) for d in dims])


def closed_form_step(coef: IncrementCoefficients, plan, eigenvalues, eigenvalues_next):
    """The closed form's three terms ``(3, nD, nS)`` and the spectral corollary ``(nD, nS)``
    (``eigenvalues_next``: those of ``H^(k+1)`` matched to ``H^(k)``'s vectors, `_match`)."""
    sig = jnp.asarray(plan.sigmas, coef.c.dtype)
    dims = tuple(plan.dims)
    terms = np.asarray(jax.block_until_ready(_closed_form_grid(coef.a, coef.c, coef.B, sig,
                                                               dims)))
    spectral = np.full(terms.shape[1:], np.nan)
    if np.all(np.isfinite(eigenvalues_next)):
        spectral = np.asarray(_spectral_grid(jnp.asarray(eigenvalues), jnp.asarray(
            eigenvalues_next), sig, dims))
    return terms, spectral


def direct_mc_step(loss_fn, params, plan, k: int, U: PyTree, key):
    """Direct subspace MC on the whole ``sigma`` grid for each nested ``D`` of the ``Dmax``
    basis ``U`` (in the parameters' dtypes): ``(2, nD, nS)``."""
    c = plan.config
    out = np.full((2, len(plan.dims), len(plan.sigmas)), np.nan)
    grid = jnp.asarray(plan.sigmas, _common.weight_dtype(params))  # (checked by plan_curve)
    for j, d in enumerate(plan.dims):
        mean, se = jax.block_until_ready(_direct_mc(
            loss_fn, params, plan.data, k, U, jnp.asarray(d), grid, key, c.num_samples,
            bool(c.antithetic), c.microbatch_size, c.sample_batch_size, None))
        est = _estimate(mean, se, grid, c.num_samples, c.antithetic)
        out[:, j] = np.asarray(est.estimate), np.asarray(est.stderr)
    return out


def full_mc_step(loss_fn, params, plan, k: int, key):
    """Full-space ``Delta_2`` on the ``sigma`` grid: ``(2, nS)``."""
    c = plan.config
    grid = jnp.asarray(plan.sigmas, _common.weight_dtype(params))  # (checked by plan_curve)
    mean, se = jax.block_until_ready(_full_mc(
        loss_fn, params, plan.data, k, grid, key, c.full_samples, bool(c.antithetic),
        c.microbatch_size, c.sample_batch_size))
    est = _estimate(mean, se, grid, c.full_samples, c.antithetic)
    return np.stack([np.asarray(est.estimate), np.asarray(est.stderr)])
