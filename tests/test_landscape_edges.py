"""Edge inputs of `curvlib.landscape` as a user drives it: the k-curve and its reports.

Oracles: a dense quadratic loss (every criterion known in closed form from `numpy.linalg`),
and the values a hand-built curve was given.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvlib.landscape as ls

N = 6


def _quadratic(n, seed=0):
    """``l_i(w) = w^T A_i w / 2 + g_i^T w + c_i`` over nested-dict params, dict data."""
    r = np.random.default_rng(seed)
    G = r.normal(size=(n, N, N))
    A = np.einsum("nij,nkj->nik", G, G) / N + np.diag(np.arange(N, 0, -1.0))
    data = {"A": jnp.asarray(A), "g": jnp.asarray(r.normal(size=(n, N))),
            "c": jnp.asarray(r.normal(size=n))}
    params = {"layer": {"w": jnp.asarray(r.normal(size=2)), "b": jnp.asarray(r.normal())},
              "v": jnp.asarray(r.normal(size=3))}
    return params, data


def _loss(p, batch):
    th = ravel_pytree(p)[0]
    per = 0.5 * jnp.einsum("i,nij,j->n", th, batch["A"], th) + batch["g"] @ th + batch["c"]
    return jnp.mean(per)


def _oracle(params, data, k, D, sigma):
    """``(Delta_1, Delta_2^(D) closed form, top-D eigenvalues of H^(k))`` from dense algebra."""
    th = np.asarray(ravel_pytree(params)[0])
    A, g, c = (np.asarray(data[x]) for x in "Agc")
    l = 0.5 * np.einsum("i,nij,j->n", th, A, th) + g @ th + c
    grad = np.einsum("nij,j->ni", A, th) + g
    lam, V = np.linalg.eigh(A[:k].mean(0))
    U = V[:, ::-1][:, :D].T
    a = l[: k + 1].mean() - l[:k].mean()
    cc = U @ (grad[: k + 1].mean(0) - grad[:k].mean(0))
    B = U @ (A[: k + 1].mean(0) - A[:k].mean(0)) @ U.T
    s2 = sigma**2
    gm = a * a + s2 * (a * np.trace(B) + cc @ cc) + s2 * s2 / 4 * (2 * np.sum(B * B)
                                                                  + np.trace(B) ** 2)
    return abs(a), gm, lam[::-1][:D]


def _hand_curve(ks, delta1, closed_form):
    """A one-D, one-sigma KCurve holding the given values (nothing else computed)."""
    K = len(ks)
    nan3, nan2 = np.full((K, 1, 1), np.nan), np.full((K, 1), np.nan)
    cf = np.asarray(closed_form, float).reshape(K, 1, 1)
    return ls.KCurve(np.asarray(ks), np.array([1]), np.array([1e-2]), np.asarray(delta1, float),
                     cf, nan3, nan3, nan3, nan3, nan3, nan3, nan2, nan2, nan2, nan2, nan2,
                     np.ones(K, bool), {})


def test_k_curve_edges_match_the_dense_oracle():
    """k = 1 and k = n - 1, D = 1, a one-point sigma grid, nested-dict params, dict data, an
    odd sample count with microbatches that do not divide it: every value is the oracle's."""
    params, data = _quadratic(7)
    ks, sigma = [1, 6], 0.05
    c = ls.k_curve(_loss, params, data, ks, dims=[1], sigmas=sigma, key=jax.random.PRNGKey(0),
                   microbatch_size=2, progress=False)
    for i, k in enumerate(ks):
        d1, gm, lam = _oracle(params, data, k, 1, sigma)
        np.testing.assert_allclose(c.delta1[i], d1, rtol=1e-9)
        np.testing.assert_allclose(c.closed_form[i, 0, 0], gm, rtol=1e-8)
        np.testing.assert_allclose(c.eigenvalues[i], lam, rtol=1e-8)
    assert np.isnan(c.eigenvalues_next[1]).all()  # k + 2 > n: no H^(k+1)
    assert c.finite.all()


def test_plot_curve_refuses_an_empty_curve_by_name():
    """A curve with no points raised IndexError (index 0 of `ks`)."""
    pytest.importorskip("matplotlib")
    c = _hand_curve([], [], [])
    with pytest.raises(ValueError, match="no points"):
        ls.plot_curve(c, path="unused.png")


def test_plot_curve_joins_the_points_in_increasing_k(tmp_path):
    """`ks` in the order asked ([8, 2, 4]) drew zigzag lines (8 -> 2 -> 4) and started the
    reference slopes at k = 8 from the value at k = 2."""
    pytest.importorskip("matplotlib")
    ks = np.array([8, 2, 4])
    d1 = 1.0 / ks
    c = _hand_curve(ks, d1, 0.1 / ks**2)
    fig = ls.plot_curve(c, path=tmp_path / "c.png")
    lines = {line.get_label().split(" ")[0]: line for line in fig.axes[0].get_lines()}
    order = np.argsort(ks)
    np.testing.assert_array_equal(lines["Delta1^2"].get_xdata(), ks[order])
    np.testing.assert_allclose(lines["Delta1^2"].get_ydata(), d1[order] ** 2)
    np.testing.assert_allclose(lines["Delta2(D=1)"].get_ydata(), 0.1 / ks[order] ** 2)
    # k^-2 from the largest Delta_1^2 (at k = 2, the smallest k)
    ref = np.max(d1**2) * (ks[order] / 2.0) ** -2.0
    np.testing.assert_allclose(lines["k^-2"].get_ydata(), ref)


def test_plot_curve_references_show_where_delta1_is_zero(tmp_path):
    """At an interpolating point (every l_i(w*) = 0) Delta_1 is 0 for every k: the k^-1 and
    k^-2 references were drawn at 0, invisible on the log axis."""
    pytest.importorskip("matplotlib")
    ks = np.array([2, 4, 8])
    gm = 3e-3 / ks.astype(float) ** 2
    c = _hand_curve(ks, np.zeros(3), gm)
    fig = ls.plot_curve(c, path=tmp_path / "c.png")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    for p in (1.0, 2.0):
        np.testing.assert_allclose(lines[f"k^-{p:.0f}"].get_ydata(),
                                   gm.max() * (ks / 2.0) ** -p)


def test_curve_json_is_strict_and_round_trips_its_types(tmp_path):
    """`ks`, `dims` and `num_matvecs` came back from JSON as floats, so a curve rebuilt from
    the file printed `GM D=1.0` and slope keys `delta2_D1.0_closed_form`."""
    params, data = _quadratic(7)
    c = ls.k_curve(_loss, params, data, [2, 4], dims=[1, 2], sigmas=[1e-2, 0.1],
                   key=jax.random.PRNGKey(0), progress=False, next_subspace=False)
    c = c._replace(closed_form=c.closed_form.copy())
    c.closed_form[0, 0, 0] = np.inf  # strict JSON has no Infinity either
    path = tmp_path / "curve.json"
    ls.save_curve_json(c, path)

    def refuse(name):
        raise AssertionError(f"non-strict JSON literal {name}")

    d = json.loads(path.read_text(), parse_constant=refuse)
    assert d["ks"] == [2, 4] and d["dims"] == [1, 2]
    assert all(type(v) is int for v in d["ks"] + d["dims"] + d["num_matvecs"] + d["status"])
    assert d["closed_form"][0][0][0] is None and d["max_angle"] == [[None, None]] * 2

    def back(name, value):
        if name in ("timings", "slopes") or value is None:
            return value
        a = np.asarray(value)
        if a.dtype != object:  # (no null in it: its own type)
            return a
        return np.where(a == None, np.nan, a).astype(float)  # noqa: E711

    loaded = ls.KCurve(**{f: back(f, d[f]) for f in ls.KCurve._fields})
    for f in ("ks", "dims", "num_matvecs", "status", "converged", "finite", "unique"):
        assert np.asarray(getattr(loaded, f)).dtype.kind == np.asarray(getattr(c, f)).dtype.kind
    np.testing.assert_array_equal(loaded.closed_form[1], c.closed_form[1])
    assert ls.curve_table(loaded, 0.1) == ls.curve_table(c, 0.1)
    assert ls.curve_slopes(loaded).keys() == ls.curve_slopes(c).keys()


def test_k_curve_takes_the_products_for_a_basis_stored_coarser_than_the_parameters():
    """Ritz pairs of a bfloat16-stored basis hold ``U H U^T = diag(theta)`` only to bfloat16's
    rounding: the coefficients' single-sample route (which assumes it) differs from the exact
    one on the same basis; k_curve passes the Ritz values only where they are exact."""
    from types import SimpleNamespace

    from curvlib import Eigsh
    from curvlib.landscape import curve

    r = np.random.RandomState(3)
    x, y = jnp.asarray(r.randn(40, 6)), jnp.asarray(np.sin(r.randn(40, 1)))
    params = {"W1": jnp.asarray(0.7 * r.randn(6, 16)), "W2": jnp.asarray(0.7 * r.randn(16, 1))}
    data = {"x": x, "y": y}

    def loss(p, b):
        return jnp.mean((jnp.tanh(b["x"] @ p["W1"]) @ p["W2"] - b["y"]) ** 2)

    for basis, exact in ((jnp.bfloat16, False), (None, True)):
        sub = ls.curvature_subspace(loss, params, data, 30, 4, key=jax.random.PRNGKey(0),
                                           eigsh=Eigsh(basis_dtype=basis))
        ritz = ls.increment_coefficients(loss, params, data, 30, sub.eigenvectors,
                                                eigenvalues=sub.eigenvalues)
        full = ls.increment_coefficients(loss, params, data, 30, sub.eigenvectors)
        gap = float(np.max(np.abs(np.asarray(ritz.B) - np.asarray(full.B))))
        assert (gap < 1e-10) == exact, (basis, gap)
        plan = SimpleNamespace(config=SimpleNamespace(eigsh=Eigsh(basis_dtype=basis)))
        chosen = curve._ritz_values(sub, plan, params)
        assert (chosen is sub.eigenvalues) == exact
