"""``spectral_density``: stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _compile, _space, _tree, _validate, _xp
from curvlib._status import Status, from_flags
from curvlib._xp import xp
from curvlib.krylov import _driver, tridiag

PyTree = Any


class SpectralDensity(NamedTuple):
    """Output of [`spectral_density`][curvlib.spectral_density].

    Attributes:
      grid: evaluation points ``t`` (shape ``(num_points,)``).
      density: Gaussian-broadened spectral density on ``grid``; integrates to ~1.
        NaN if a product was not finite.
      nodes: Ritz values per probe (shape ``(num_probes, num_matvecs)``). A probe whose
        Krylov space stopped growing (an invariant subspace) has fewer: its other slots
        hold zero-weight nodes, which count nowhere.
      weights: Gauss quadrature weights per probe (rows sum to 1).
      sigma: broadening width used; default ``(max - min) / 100`` of the weighted nodes,
        with ``max - min`` at least ``16 max(num_points, 200) eps max(|min|, |max|)`` (what
        a grid of 16 ulps a step resolves: a single eigenvalue ``c != 0`` gets a bump the
        grid can integrate), and ``1`` when every node is 0.
      finite: every product was finite, and ``sigma`` is a positive finite number (a
        traced ``sigma`` is not checked on the call); if not, ``density``, ``nodes`` and
        ``weights`` are NaN.
      num_matvecs: products used (``num_probes * num_matvecs``; int32).
      converged: the quadrature was computed (``finite``): stochastic Lanczos
        quadrature has no tolerance, and a probe whose chain meets an invariant
        subspace gives an exact quadrature of that subspace, not a failure. False
        for a non-zero operator of norm below ``tiny / eps`` (``STALLED``).
      status: the [`curvlib.Status`][curvlib.Status] code: ``NONFINITE``, ``STALLED``
        (a non-zero ``||A||`` below ``tiny / eps``, about ``1e-31`` in float32: the
        products' subnormal parts are flushed to zero and the nodes are not the
        operator's, as in [`lanczos`][curvlib.lanczos]) or ``SUCCESS``.
    """

    grid: jax.Array
    density: jax.Array
    nodes: jax.Array
    weights: jax.Array
    sigma: jax.Array
    finite: Any = True
    num_matvecs: Any = 0
    converged: Any = True
    status: Any = Status.SUCCESS


def _quadrature(cfg, matvec, v):
    """Nodes and weights of one probe: ``m`` Lanczos steps, a broken chain continues with zeros.

    After a breakdown at step ``j`` the quadrature on ``j`` nodes is already
    exact; the zero continuation adds nodes with zero weight, and the loop has
    no branch (so a ``vmap`` over probes runs no discarded work).
    """
    state = tridiag.run(cfg, matvec, tridiag.setup(cfg, v, None))
    T, _ = tridiag.tridiagonal(cfg, state)
    theta, Y = jnp.linalg.eigh(T)
    return theta, Y[0] ** 2, state.band.finite, tridiag.resolved_scale(state)


def _density(nodes, weights, finite, resolved, sigma, grid, num_points):
    # the range of the nodes that carry weight: a probe whose Krylov space stopped growing
    # fills its unused slots with zero-weight nodes at 0, which set the width and the grid
    # (two atoms at 100 and 101 merged into one bump on a grid from -5 to 106)
    held = weights > 0
    lo = xp.min(xp.where(held, nodes, xp.inf))
    hi = xp.max(xp.where(held, nodes, -xp.inf))
    lo, hi = xp.where(xp.any(held), lo, xp.min(nodes)), xp.where(xp.any(held), hi, xp.max(nodes))
    # relative to the nodes' own scale (an absolute floor merged two atoms of an operator
    # of norm 1e-10), and at least what a grid of 16 ulps a step resolves (a floor of one
    # ulp made c I's grid one repeated point and its density a spike that integrated to
    # 0); 1 only for the zero operator, whose nodes are all 0
    ulp = 16 * xp.finfo(nodes.dtype).eps * xp.maximum(xp.abs(lo), xp.abs(hi))
    width = xp.maximum(hi - lo, max(num_points, 200) * ulp)  # sigma >= 2 ulp-steps
    width = xp.where(width > 0, width, xp.ones((), nodes.dtype))
    s = width / 100.0 if sigma is None else xp.asarray(sigma, nodes.dtype)
    if grid is None:  # the nodes and 5 sigma beyond, or the least span of distinct points
        half = xp.maximum((hi - lo) / 2 + 5 * s, (num_points - 1) * ulp / 2)
        grid = xp.linspace((lo + hi) / 2 - half, (lo + hi) / 2 + half, num_points)
    grid = xp.asarray(grid, nodes.dtype)
    z = (grid[:, None, None] - nodes[None]) / s
    # (the constant in the nodes' dtype: NumPy's float64 pi promoted the host path's density)
    kern = xp.exp(-0.5 * z**2) / (s * xp.asarray(np.sqrt(2 * np.pi), nodes.dtype))
    density = xp.sum(kern * weights[None], axis=(1, 2)) / nodes.shape[0]
    # a given sigma that is traced is not checked: one that is not a positive finite number
    # (0 made the density NaN, -1 negative, with status SUCCESS) fails the result too
    ok = xp.all(finite) & xp.isfinite(s) & (s > 0)
    nan = lambda x: xp.where(ok, x, xp.nan)
    # an operator below tiny / eps: the nodes are not its projection's (`tridiag.lanczos`)
    resolved = xp.all(resolved)
    return SpectralDensity(grid, nan(density), nan(nodes), nan(weights), s, ok,
                           num_matvecs=xp.asarray(nodes.size, xp.int32),
                           converged=ok & resolved,
                           status=from_flags(finite=ok, stalled=~resolved))


def _solve(cfg, num_probes, num_points, matvec, v_like, key, sigma, grid):
    keys = jax.random.split(key, num_probes)
    probes = jax.vmap(lambda k: _tree.normal_like(k, v_like))(keys)
    nodes, weights, finite, resolved = jax.vmap(lambda v: _quadrature(cfg, matvec, v))(probes)
    return _density(nodes, weights, finite, resolved, sigma, grid, num_points)


def _solve_now(cfg, num_probes, num_points, matvec, v_like, key, sigma, grid):
    """`_solve` answered without compiling it: the probes' Lanczos chains driven from the host
    together (one product of all probes per step, as the fused program's ``vmap``), each on
    one flat vector, with steps of the size, dtype, depth and probe count only and the
    model's product compiled alone; the same probes and arithmetic as the fused program."""
    flat = cfg._replace(layout="identity")
    if _driver.on_host_ok(v_like, num_probes * (cfg.m + 3)):
        return _solve_on_host(flat, num_probes, num_points, matvec, v_like, key, sigma, grid)
    X = _flat_probes(key, v_like, num_probes)
    product = functools.partial(_space.flat_products, matvec, v_like)
    state = _driver._jitted(_setup_all, flat, True)(X)
    state = _driver.run_host(_request_all, _update_all, _running_all, flat, product, state,
                             quick=True)
    nodes, weights, finite, resolved = _driver._jitted(_nodes_all, flat, True)(state)
    return _density_now(nodes, weights, finite, resolved, sigma, grid, num_points)


def _solve_on_host(cfg, num_probes, num_points, matvec, v_like, key, sigma, grid):
    """`_solve_now` with the probes' Lanczos steps run on NumPy (`curvlib._xp`): nothing
    compiles but the probes' draw (the fused program's numbers) and the model's product,
    the latter on the ahead thread while the former compiles here."""
    rows = jax.ShapeDtypeStruct((num_probes, _tree.size(v_like)), _tree.dtype(v_like))
    ready = _driver.ahead().submit(_driver.precompile, _space.flat_products, matvec, v_like,
                                   rows)
    X = np.asarray(_flat_probes(key, v_like, num_probes))
    sigma, grid = (None if a is None else np.asarray(a) for a in (sigma, grid))
    _driver.HOST_STEPS[0] += 1
    with _xp.host():
        states = [tridiag.setup(cfg, x, None) for x in X]
    ready.result()
    for _ in range(cfg.m):  # (every probe runs the depth: `_running` is steps < depth)
        with _xp.host():
            V = np.stack([tridiag._request(cfg, t) for t in states])
        W = np.asarray(_space.flat_products(matvec, v_like, V))
        _driver.HOST_STEPS[0] += 1
        with _xp.host():
            states = [tridiag._update(cfg, t, w) for t, w in zip(states, W, strict=True)]
    with _xp.host():
        nodes, weights, finite, resolved = (np.stack(x) for x in zip(
            *[_probe_nodes(cfg, t) for t in states], strict=True))
        res = _density(nodes, weights, finite, resolved, sigma, grid, num_points)
    return _driver.to_device(res, like=v_like, operator=matvec)


@_driver.quick_jit(static_argnames="num_probes")
def _flat_probes(key, v_like, num_probes):
    """The fused program's probes, each ravelled into one vector (the rows of one array)."""
    keys = jax.random.split(key, num_probes)
    probes = jax.vmap(lambda k: _tree.normal_like(k, v_like))(keys)
    return _space.Space(v_like, "concat").flatten_basis(probes)


# the Lanczos steps of every probe at once (module-level: their programs are cached)
def _setup_all(cfg, X):
    return jax.vmap(lambda x: tridiag.setup(cfg, x, None))(X)


def _request_all(cfg, s):
    return jax.vmap(lambda t: tridiag._request(cfg, t))(s)


def _update_all(cfg, s, W):
    return jax.vmap(lambda t, w: tridiag._update(cfg, t, w))(s, W)


def _running_all(cfg, s):
    return jnp.any(jax.vmap(lambda t: tridiag._running(cfg, t))(s))


def _nodes_all(cfg, s):
    return jax.vmap(lambda t: _probe_nodes(cfg, t))(s)


_density_now = _driver.quick_jit(_density, static_argnames="num_points")

_compiled = _compile.entry(
    static=("cfg", "num_probes", "num_points"), operators={"matvec": "v_like"}, now=_solve_now,
    now_when=lambda cfg, v_like, **_: _driver.answers_now(cfg.layout, v_like))(_solve)


def spectral_density(
    matvec,
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
    broadened to a Gaussian of width ``sigma``; probes are averaged. A probe
    whose Krylov space is invariant before ``m`` steps (an operator with few
    distinct eigenvalues) gives its exact quadrature on fewer nodes; the rest
    get zero weight.

    Cost: ``num_probes * num_matvecs`` products, the probes run as one ``vmap``
    (one compiled program; the product appears once in it); memory
    ``num_probes * (num_matvecs + 2)`` vectors. With a host-driven operator
    (data streamed from the host) the probes run one after another.

    Derivatives: forward mode (``jax.jvp``) only, as for [`lanczos`][curvlib.lanczos].

    Args:
      matvec: symmetric operator on pytrees shaped like ``v_like``.
      v_like: pytree with the operator's shapes.
      key: PRNG key for the probes.
      num_matvecs: Lanczos depth per probe (static, ``1 <= num_matvecs <= dim``).
      num_probes: number of probes (static, ``>= 1``).
      num_points: size of the default grid (static): the weighted Ritz values' range and
        5 ``sigma`` beyond, at least ``16 (num_points - 1)`` ulps of their scale wide.
      sigma: broadening; default ``(max - min) / 100`` of the Ritz values' range (see
        [`SpectralDensity`][curvlib.SpectralDensity] for its floor).
      grid: explicit evaluation points (overrides ``num_points``).

    Returns:
      [`SpectralDensity`][curvlib.SpectralDensity].

    Raises:
      ValueError: if ``num_probes < 1``, ``num_matvecs`` is not in ``[1, dim]``, or
        a concrete ``sigma`` is not a positive finite scalar.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import curvlib
      >>> d = jnp.concatenate([jnp.zeros(50), jnp.full(50, 4.0)])  # two atoms
      >>> sd = curvlib.spectral_density(lambda v: d * v, jnp.zeros(100), jax.random.PRNGKey(0),
      ...                               num_matvecs=8, num_probes=4, sigma=0.1)
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
    num_probes = _validate.static_int(num_probes, "num_probes", minimum=1)
    num_points = _validate.static_int(num_points, "num_points", minimum=1)
    _validate.number(sigma, "sigma", minimum=0, exclusive=True, optional=True, scalar=True)
    _validate.prng_key(key)
    if grid is not None and jnp.ndim(grid) != 1:
        raise ValueError(f"`grid` must be a 1-D array of points; got shape {jnp.shape(grid)}.")
    _validate.float_leaves(v_like, "v_like")
    n = _tree.size(v_like)
    m = _validate.static_int(num_matvecs, "num_matvecs", minimum=1, maximum=n,
                             what=f"the dimension of v_like is {n}")
    cfg = tridiag._Cfg(m=m, layout=_space.choose_layout(v_like), basis_dtype=None,
                       restart=False)
    if _driver.is_host_driven(matvec):
        return _host(cfg, num_probes, num_points, matvec, v_like, key, sigma, grid)
    _validate.operator(matvec, v_like, "matvec", "v_like")
    return _compiled(cfg, num_probes, num_points, matvec, v_like, key, sigma, grid)


def _host(cfg, num_probes, num_points, matvec, v_like, key, sigma, grid):
    """Probes one after another, each a host-driven Lanczos run (streamed data)."""
    keys = jax.random.split(key, num_probes)
    setup = _driver._jitted(tridiag.setup, cfg)
    finish = _driver._jitted(_probe_nodes, cfg)
    out = []
    for i in range(num_probes):
        v = _tree.normal_like(keys[i], v_like)
        state = setup(v, None)
        state = _driver.run_host(tridiag._request, tridiag._update, tridiag._running, cfg,
                                 matvec, state)
        out.append(finish(state))
    nodes, weights, finite, resolved = (jnp.stack(x) for x in zip(*out, strict=True))
    return _density(nodes, weights, finite, resolved, sigma, grid, num_points)


def _probe_nodes(cfg, state):
    T, _ = tridiag.tridiagonal(cfg, state)
    theta, Y = xp.linalg.eigh(T)
    return theta, Y[0] ** 2, state.band.finite, tridiag.resolved_scale(state)
