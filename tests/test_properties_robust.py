"""Property tests (hypothesis) for robustness: random pytrees, spectra, scales and poisons.

Operators are diagonal on random pytrees (nested dicts/tuples/lists of leaves of
random shapes, including scalars and size-0 leaves), so the spectrum is known
exactly: the concatenated diagonal. Properties:

* structure: every output vector has the input's tree structure, shapes and dtypes;
* scale invariance: eigsh, lanczos and cg behave the same for ``s A`` with ``s``
  from ``1e-30`` to ``1e30`` (float64) -- no absolute thresholds hidden inside;
* poison: a NaN or Inf placed anywhere in the start vector or the operator's
  output is always reported (``finite=False``) and never leaks into the vectors;
* symmetry check: symmetric random matrices pass, perturbed ones fail;
* serialisation: results on random pytrees round-trip through ``flax.serialization``.

Examples are derandomised (fixed database-free seeds) so the suite is reproducible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import curvlib

SETTINGS = settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

class _Shape:
    """A leaf of a skeleton (not a pytree node, unlike a tuple)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __repr__(self):
        return f"_Shape({self.shape})"


SHAPES = st.sampled_from([(), (1,), (3,), (2, 3), (0,), (4, 1), (2, 0, 3), (5,)]).map(_Shape)


@st.composite
def pytrees(draw, min_size=6):
    """A random nested pytree skeleton (leaves are shapes) with at least ``min_size`` entries."""
    leaf = SHAPES
    tree = draw(
        st.recursive(
            leaf,
            lambda children: st.one_of(
                st.dictionaries(st.sampled_from("abcde"), children, min_size=1, max_size=3),
                st.tuples(children, children),
                st.lists(children, min_size=1, max_size=2),
            ),
            max_leaves=5,
        )
    )
    # guarantee enough entries for k < m <= dim
    return {"main": tree, "pad": _Shape((min_size,))}


def _materialise(skeleton, seed, lo=0.5, hi=10.0):
    """(diagonal pytree with distinct entries, start vector) from a skeleton of shapes."""
    leaves, treedef = jax.tree.flatten(skeleton)
    shapes = [leaf.shape for leaf in leaves]
    n = int(sum(np.prod(s, dtype=int) for s in shapes))
    rng = np.random.default_rng(seed)
    diag = rng.permutation(np.linspace(lo, hi, n)) * rng.choice([-1.0, 1.0], n)
    start = rng.standard_normal(n) + 0.1
    def split(flat):
        out, i = [], 0
        for s in shapes:
            size = int(np.prod(s, dtype=int))
            out.append(jnp.asarray(flat[i : i + size].reshape(s)))
            i += size
        return jax.tree.unflatten(treedef, out)
    return split(diag), split(start), np.sort(diag)


def _same_layout(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype


@SETTINGS
@given(pytrees(), st.integers(0, 2**16), st.sampled_from([1e-30, 1e-8, 1.0, 1e8, 1e30]))
def test_eigsh_on_random_pytrees_and_scales(skeleton, seed, scale):
    d, v0, spectrum = _materialise(skeleton, seed)
    mv = lambda v: jax.tree.map(lambda a, b: scale * a * b, d, v)
    k = 2
    e = curvlib.eigsh(mv, v0, k, which="LA", basis_size=min(spectrum.size, 12),
                      max_restarts=100)
    assert bool(e.finite)
    assert bool(e.converged)
    np.testing.assert_allclose(e.eigenvalues / scale, spectrum[::-1][:k], rtol=1e-7)
    vec0 = jax.tree.map(lambda x: x[0], e.eigenvectors)
    _same_layout(vec0, v0)


@SETTINGS
@given(pytrees(), st.integers(0, 2**16), st.sampled_from([1e-30, 1e-8, 1.0, 1e8, 1e30]))
def test_lanczos_and_cg_are_scale_invariant(skeleton, seed, scale):
    d, v0, spectrum = _materialise(skeleton, seed, lo=0.5, hi=4.0)
    absd = jax.tree.map(jnp.abs, d)  # SPD for cg
    mv1 = lambda v: jax.tree.map(lambda a, b: a * b, absd, v)
    mvs = lambda v: jax.tree.map(lambda a, b: scale * a * b, absd, v)
    m = min(spectrum.size, 6)
    l1, ls = curvlib.lanczos(mv1, v0, m), curvlib.lanczos(mvs, v0, m)
    np.testing.assert_allclose(ls.alphas / scale, l1.alphas, rtol=1e-9, atol=1e-12)
    assert bool(ls.breakdown) == bool(l1.breakdown)
    c1 = curvlib.cg(mv1, v0, rtol=1e-10)
    cs = curvlib.cg(mvs, v0, rtol=1e-10)
    assert bool(cs.converged) and bool(c1.converged)
    for a, b in zip(jax.tree.leaves(cs.x), jax.tree.leaves(c1.x), strict=True):
        np.testing.assert_allclose(a * scale, b, rtol=1e-7, atol=1e-12 * (1 + float(jnp.max(
            jnp.abs(b), initial=0.0))))
    _same_layout(cs.x, v0)


@SETTINGS
@given(pytrees(), st.integers(0, 2**16), st.sampled_from([np.nan, np.inf, -np.inf]),
       st.sampled_from(["start", "product"]))
def test_poison_anywhere_is_reported_never_leaked(skeleton, seed, bad, where):
    d, v0, spectrum = _materialise(skeleton, seed)
    leaves, treedef = jax.tree.flatten(v0)
    sizes = [x.size for x in leaves]
    rng = np.random.default_rng(seed)
    li = int(rng.choice([i for i, s in enumerate(sizes) if s > 0]))
    pos = int(rng.integers(sizes[li]))
    masks = [np.zeros(x.shape, bool) for x in leaves]
    masks[li].reshape(-1)[pos] = True
    mask = jax.tree.unflatten(treedef, [jnp.asarray(m) for m in masks])
    if where == "start":
        v0 = jax.tree.map(lambda x, m: jnp.where(m, bad, x), v0, mask)
        mv = lambda v: jax.tree.map(lambda a, b: a * b, d, v)
    else:
        mv = lambda v: jax.tree.map(lambda a, b, m: jnp.where(m, bad, a * b), d, v, mask)
    e = curvlib.eigsh(mv, v0, 1, basis_size=min(spectrum.size, 6), max_restarts=3)
    c = curvlib.cg(mv, v0, max_steps=5)
    assert not bool(e.finite) and not bool(e.converged)
    assert not bool(c.finite) and not bool(c.converged)
    for tree in (e.eigenvectors, c.x):
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))
    # reported, never leaked as plausible numbers: NaN eigenvalues and residuals
    assert bool(jnp.all(jnp.isnan(e.eigenvalues))) and bool(jnp.all(jnp.isnan(e.residual_norms)))


@SETTINGS
@given(st.integers(2, 24), st.integers(0, 2**16), st.floats(1e-3, 1.0))
def test_check_symmetric_separates_symmetric_from_not(n, seed, eps):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    S = jnp.asarray(A + A.T)
    N = S + eps * jnp.asarray(A - A.T) * float(jnp.linalg.norm(S)) / (
        float(np.linalg.norm(A - A.T)) + 1e-300)
    key = jax.random.PRNGKey(seed)
    assert bool(curvlib.check_symmetric(lambda v: S @ v, jnp.zeros(n), key).symmetric)
    assert not bool(
        curvlib.check_symmetric(lambda v: N @ v, jnp.zeros(n), key, num_pairs=2).symmetric
    )


@SETTINGS
@given(pytrees(), st.integers(0, 2**16))
def test_results_on_random_pytrees_round_trip(skeleton, seed):
    d, v0, _ = _materialise(skeleton, seed)
    mv = lambda v: jax.tree.map(lambda a, b: a * b, d, v)
    for r in (curvlib.lanczos(mv, v0, 3), curvlib.cg(mv, v0, max_steps=3)):
        back = serialization.from_bytes(r, serialization.to_bytes(r))
        assert jax.tree.structure(back) == jax.tree.structure(r)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(r), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_mixed_leaf_dtypes_are_kept(dtype):
    """A pytree mixing float32 and float64 leaves keeps each leaf's dtype in every output."""
    v0 = {"a": jnp.linspace(1.0, 2.0, 6, dtype=dtype), "b": jnp.ones(4, jnp.float32)}
    d = {"a": jnp.arange(1.0, 7.0, dtype=dtype), "b": jnp.arange(7.0, 11.0, dtype=jnp.float32)}
    mv = lambda v: jax.tree.map(lambda a, b: a * b, d, v)
    e = curvlib.eigsh(mv, v0, 2, basis_size=8)
    assert e.eigenvectors["a"].dtype == dtype and e.eigenvectors["b"].dtype == jnp.float32
    np.testing.assert_allclose(e.eigenvalues, [10.0, 9.0], rtol=1e-4)
    c = curvlib.cg(mv, v0, rtol=1e-6)
    assert c.x["a"].dtype == dtype and c.x["b"].dtype == jnp.float32
