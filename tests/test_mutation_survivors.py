"""Oracle tests for the mutants that survived run 4 of mutation testing (issue 19).

docs/testing.md ("Run 4") lists the sampled mutants these tests were written against. Each
test pins a kernel to an independent oracle (scipy, dense NumPy, a closed form, or the same
random draws re-evaluated in NumPy) on tiny float64 problems.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import curvlib
from curvlib import landscape as ls
from curvlib.krylov import stochastic


@pytest.mark.parametrize("dof", [1.0, 1.5, 2.0, 7.9, 30.0, 30.99, 31.0, 31.5, 45.0, 400.0])
def test_t975_traced_is_the_floor_table_below_31_and_cornish_fisher_above(dof):
    """``_t975_traced``: ``t_{0.975, floor(dof)}`` below 31 (never narrower), CF above.

    Kills ``_t975_traced__mutmut_70`` (``dof < 31`` -> ``dof < 32``: the table's last
    entry, ``t_{0.975, 30}``, used up to 32 degrees of freedom).
    """
    got = float(stochastic._t975_traced(jnp.asarray(dof)))
    if dof < 31:
        np.testing.assert_allclose(got, scipy.stats.t.ppf(0.975, np.floor(dof)), rtol=1e-11)
        assert got >= scipy.stats.t.ppf(0.975, dof) * (1 - 1e-12)
    else:
        np.testing.assert_allclose(got, scipy.stats.t.ppf(0.975, dof), rtol=1e-4)


def test_t975_traced_keeps_the_dtype_of_dof():
    """A float32 ``dof`` gives a float32 quantile, in both branches (x64 is on in the tests).

    Kills ``_t975_traced__mutmut_16`` (the table built in the default float dtype, float64
    here, promoting the float32 result).
    """
    for dof in (5.0, 50.0):
        out = stochastic._t975_traced(jnp.float32(dof))
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(float(out), scipy.stats.t.ppf(0.975, np.floor(dof) if dof < 31
                                                                 else dof), rtol=1e-4)


def _hutchinson_oracle(A, Z):
    """Estimate and stderr of plain Hutchinson (``B = A``), written out in NumPy (docstring)."""
    g = Z.shape[0]
    BZ = Z @ A  # rows B z_j (A symmetric)
    q = np.einsum("ij,ij->i", Z, BZ)
    fro = np.mean(np.sum(BZ**2, axis=1))
    if g == 1:
        return q.mean(), np.sqrt(2 * fro)
    pairs = g * (g - 1)
    D = Z * BZ
    M = D @ D.T
    diag2 = (M.sum() - np.trace(M)) / pairs
    var = 2 * max(fro - diag2, 0.0)
    C = BZ @ BZ.T
    fro4 = ((C**2).sum() - (np.diag(C) ** 2).sum()) / pairs
    nu = g * fro**2 / fro4
    t = scipy.stats.t.ppf(0.975, np.floor(nu)) if nu < 31 else scipy.stats.t.ppf(0.975, nu)
    return q.mean(), t / scipy.stats.norm.ppf(0.975) * np.sqrt(var / g)


@pytest.mark.parametrize("g", [1, 5])
def test_hutchinson_estimate_and_stderr_are_the_formula_on_its_own_probes(g):
    """``hutchinson_trace(method="hutchinson")`` against NumPy on the very probes it drew.

    Kills ``_rowdots__mutmut_15`` (the sum over no axis: the mean over every coordinate of
    ``z * A z`` instead of over the probes' forms) and ``_quadratic_forms__mutmut_116``
    (``var * g`` for ``var / g`` in the standard error).
    """
    rng = np.random.default_rng(19)
    n = 7
    X = rng.standard_normal((n, n))
    A = X + X.T + np.diag(np.arange(n, dtype=float))
    v = jnp.zeros(n)
    key = jax.random.PRNGKey(3)
    est = curvlib.hutchinson_trace(lambda x: jnp.asarray(A) @ x, v, key, g, method="hutchinson")
    Z = np.asarray(stochastic._probes(key, stochastic.probe_space(v).flatten(v), g))
    assert Z.shape == (g, n) and set(np.unique(Z)) <= {-1.0, 1.0}
    mean, se = _hutchinson_oracle(A, Z)
    np.testing.assert_allclose(float(est.estimate), mean, rtol=1e-12)
    np.testing.assert_allclose(float(est.stderr), se, rtol=1e-9 if g > 1 else 1e-12)
    assert se > 0.1


def test_hutchinson_float32_stays_float32():
    """A float32 operator gives a float32 estimate and stderr (through ``_t975_traced``)."""
    d = jnp.linspace(1.0, 2.0, 8, dtype=jnp.float32)
    M = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.float32)
    A = M + M.T + jnp.diag(d)
    est = curvlib.hutchinson_trace(lambda x: A @ x, jnp.zeros(8, jnp.float32),
                                   jax.random.PRNGKey(0), 6, method="hutchinson")
    assert est.estimate.dtype == jnp.float32 and est.stderr.dtype == jnp.float32


class _HostOperator:
    """A host-driven operator (as a data stream is): NumPy products, float64 out."""

    host_driven = True

    def __init__(self, A):
        self.A = A
        self.calls = 0

    def __call__(self, v):
        self.calls += 1
        return {"a": self.A[:2, :2] @ np.asarray(v["a"], np.float64)
                + self.A[:2, 2:] @ np.asarray(v["b"], np.float64),
                "b": self.A[2:, :2] @ np.asarray(v["a"], np.float64)
                + self.A[2:, 2:] @ np.asarray(v["b"], np.float64)}


class _HostBlockOperator(_HostOperator):
    def matmat(self, V):
        self.calls += 1
        W = np.concatenate([np.asarray(V["a"], np.float64), np.asarray(V["b"], np.float64)], 1)
        out = W @ self.A.T
        return {"a": out[:, :2], "b": out[:, 2:]}


@pytest.mark.parametrize("cls", [_HostOperator, _HostBlockOperator])
def test_block_matvec_of_a_host_driven_operator(cls):
    """The host path of ``_block_matvec``: dense ``V A`` per leaf, in the basis' dtype.

    Kills ``_block_matvec__mutmut_17`` (``matmat(None)``), ``_33`` (the row products not
    stacked) and ``_44`` (the cast of the products).
    """
    rng = np.random.default_rng(1)
    X = rng.standard_normal((5, 5))
    A = X + X.T
    V = {"a": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
         "b": jnp.asarray(rng.standard_normal((3, 3)), jnp.float32)}
    like = jax.tree.map(lambda x: x[0], V)
    op = cls(A)
    out = stochastic._block_matvec(op, V, None, like)
    W = np.concatenate([np.asarray(V["a"], np.float64), np.asarray(V["b"], np.float64)], 1)
    expect = W @ A
    assert out["a"].dtype == jnp.float32 and out["b"].dtype == jnp.float32
    assert out["a"].shape == (3, 2) and out["b"].shape == (3, 3)
    np.testing.assert_allclose(np.asarray(out["a"]), expect[:, :2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["b"]), expect[:, 2:], rtol=1e-5, atol=1e-5)
    assert op.calls == (1 if cls is _HostBlockOperator else 3)


def _lsq():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((12, 3)))
    y = jnp.asarray(rng.standard_normal(12))
    loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
    return loss, jnp.zeros(3), (x, y)


@pytest.mark.parametrize("bad", ["a", "c", "B"])
def test_direct_mc_rejects_each_wrongly_shaped_control_variate_part(bad):
    """Each of ``a``, ``c``, ``B`` alone with a wrong shape raises.

    Kills ``delta2_direct_mc__mutmut_64`` (``or`` -> ``and``: a wrong ``B`` with a right ``c``
    passed).
    """
    loss, w, data = _lsq()
    U = jnp.eye(3)[:2]
    parts = {"a": jnp.asarray(0.0), "c": jnp.zeros(2), "B": jnp.zeros((2, 2))}
    parts[bad] = {"a": jnp.zeros(1), "c": jnp.zeros(3), "B": jnp.zeros((2, 3))}[bad]
    with pytest.raises(ValueError, match=r"`control_variate` must be \(a, c, B\) for the same"):
        ls.delta2_direct_mc(loss, w, data, 4, U, 0.1, key=jax.random.PRNGKey(0), num_samples=2,
                            control_variate=(parts["a"], parts["c"], parts["B"]))


def test_full_mc_of_a_parameter_free_loss_is_the_squared_increment():
    """``delta2_full_mc`` when the loss does not depend on ``params``: no randomness left.

    ``L_j = mean(y_1..y_j)``, so every draw gives ``(L_{k+1} - L_k)^2`` exactly and the
    standard error is 0. Kills ``delta2_full_mc__mutmut_41`` (``loss_fn`` dropped from the
    call: no test in the selection reached the estimator past its checks).
    """
    y = jnp.asarray(np.random.default_rng(4).standard_normal(10))
    loss = lambda w, b: jnp.mean(b) + 0.0 * jnp.sum(w)
    k = 4
    est = ls.delta2_full_mc(loss, jnp.zeros(3), y, k, jnp.asarray([0.1, 1.0]),
                            key=jax.random.PRNGKey(0), num_samples=4)
    yn = np.asarray(y)
    expect = (yn[: k + 1].mean() - yn[:k].mean()) ** 2
    np.testing.assert_allclose(np.asarray(est.estimate), [expect, expect], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(est.stderr), 0.0, atol=1e-12)


def test_check_mean_loss_default_tolerance_is_ten_sqrt_eps():
    """A loss that weights one sample ``1 + 1e-4`` is not a mean at ``10 sqrt(eps)`` (1.5e-7).

    Kills ``check_mean_loss__mutmut_52`` (``10 / sqrt(eps)``: no loss ever failed the check);
    ``rtol=1e-3`` lets the same loss pass, and a sum over the batch fails.
    """
    x = jnp.asarray([0.3, 1.0, 2.0, 3.5, 0.7])
    w = lambda b: jnp.ones(b.shape[0]).at[-1].set(1.0 + 1e-4)
    skewed = lambda p, b: jnp.sum(w(b) * (b - p) ** 2) / b.shape[0]
    match = "`loss_fn` does not behave as a mean over the leading axis of its batch"
    with pytest.raises(ValueError, match=match):
        ls.check_mean_loss(skewed, 0.5, x, 3)
    ls.check_mean_loss(skewed, 0.5, x, 3, rtol=1e-3)
    with pytest.raises(ValueError, match=match):
        ls.check_mean_loss(lambda p, b: jnp.sum((b - p) ** 2), 0.5, x, 3)
    ls.check_mean_loss(lambda p, b: jnp.mean((b - p) ** 2), 0.5, x, 3)


def test_check_mean_loss_names_a_non_finite_loss():
    """A NaN in the first ``k + 1`` samples gives the non-finite message, not a TypeError.

    Kills ``check_mean_loss__mutmut_41`` (an argument dropped from the message's call).
    """
    x = jnp.asarray([0.3, jnp.nan, 2.0, 3.5, 0.7])
    with pytest.raises(ValueError, match=r"the loss is not finite at the probe point .*sample "
                                         r"indices 1\)"):
        ls.check_mean_loss(lambda p, b: jnp.mean((b - p) ** 2), 0.5, x, 3)


def test_increment_coefficients_mode_linearize_is_the_default():
    """``mode="linearize"`` (the documented default) is accepted and equals ``mode=None``
    and the recomputing ``"fwd-rev"`` and ``"rev-rev"`` modes; integer ``params`` are named.

    Kills ``increment_coefficients__mutmut_11`` and ``_12`` (the literal ``"linearize"`` or
    ``"fwd-rev"`` misspelt in the accepted modes: the documented name raised) and ``_22``
    (the argument misnamed in the dtype error).
    """
    loss, w, data = _lsq()
    U = jnp.eye(3)[:2]
    ref = ls.increment_coefficients(loss, w, data, 4, U)
    for mode in ("linearize", "fwd-rev", "rev-rev"):
        got = ls.increment_coefficients(loss, w, data, 4, U, mode=mode)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match=r"^`params` must be a real floating"):
        ls.increment_coefficients(loss, jnp.zeros(3, jnp.int32), data, 4, U)


@pytest.mark.parametrize("atol", [-1.0, float("nan")])
def test_cg_rejects_a_bad_atol_override_eagerly(atol):
    """``cg(..., atol=x)`` checks the override itself, not only the solver's default.

    Kills ``linear._precheck__mutmut_4`` (the eager check read ``atol=None``, i.e. the
    default of `curvlib.CG`, so a negative or NaN ``atol`` ran, flagged nothing or stopped at
    step 0). A valid override still solves the system (dense ``np.linalg.solve``).
    """
    A = np.diag([1.0, 2.0, 4.0]) + 0.1
    b = np.array([1.0, -1.0, 0.5])
    with pytest.raises(ValueError, match=r"^`atol` must be (finite and )?>= 0"):
        curvlib.cg(lambda v: jnp.asarray(A) @ v, jnp.asarray(b), atol=atol)
    res = curvlib.cg(lambda v: jnp.asarray(A) @ v, jnp.asarray(b), atol=1e-13, rtol=0.0)
    np.testing.assert_allclose(np.asarray(res.x), np.linalg.solve(A, b), rtol=1e-10)
