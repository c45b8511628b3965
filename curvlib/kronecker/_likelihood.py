r"""Output-space pieces of the Fisher for the likelihoods K-FAC supports.

For one example with model output ``f`` (all axes but the example axis) the
negative log-likelihood ``l(y | f)`` has output Hessian ``H(f)`` (the Fisher
in output space, since these are canonical-link likelihoods):

* ``"categorical"``: softmax over the last axis of ``f``, every other axis an
  independent position, the NLL *averaged* over positions (a mean
  cross-entropy over tokens, as [`curvlib.fisher_matvec`][curvlib.fisher_matvec] defines it);
  ``H = (diag(p) - p p^T) / T`` per position, ``T`` positions per example.
* ``"gaussian"``: ``N(f, variance I)``, ``l = ||f - y||^2 / (2 variance)``;
  ``H = I / variance``.
* ``"bernoulli"``: sigmoid of each entry of ``f`` (binary cross-entropy on
  logits); ``H = diag(s (1 - s))``.

The exact Fisher uses a symmetric factorisation ``H = B B^T`` (the columns of
``B``: one backward pass each); the Monte-Carlo Fisher uses ``grad_f l(y_s |
f)`` for targets ``y_s`` sampled from the model, whose outer product has
expectation ``H``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LIKELIHOODS = ("categorical", "gaussian", "bernoulli")


def check_output(likelihood: str, out_shape: tuple) -> None:
    """Refuse a model output the likelihood cannot read: the categorical one needs a class
    axis after the example axis (``out_shape`` is the output on a batch of one)."""
    if likelihood == "categorical" and len(out_shape) < 2:
        raise ValueError(
            "likelihood='categorical' needs logits with a class axis after the example axis; "
            f"`model_fn` returned shape {tuple(out_shape)} on a batch of one (one number per "
            "example: use likelihood='bernoulli' for one logit, 'gaussian' for a regression).")
    if likelihood == "categorical" and out_shape[-1] == 1:  # softmax of one logit: constant
        raise ValueError(
            "likelihood='categorical' needs at least two classes on the last axis; `model_fn` "
            f"returned shape {tuple(out_shape)} on a batch of one: a softmax over one logit is "
            "constant, so its Fisher (the output factors) is zero. For a binary classifier "
            "with one logit use likelihood='bernoulli'.")


def num_columns(likelihood: str, out_shape: tuple) -> int:
    """Columns of ``B`` for one example: the number of backward passes of the exact Fisher."""
    size = 1
    for d in out_shape:
        size *= d
    return size


def sqrt_hessian(likelihood: str, f: jax.Array, variance=1.0) -> jax.Array:
    """``B`` with ``B B^T = H(f)``, as ``(columns, *f.shape)``."""
    shape = f.shape
    size = f.size
    if likelihood == "gaussian":
        eye = jnp.eye(size, dtype=f.dtype) / jnp.sqrt(jnp.asarray(variance, f.dtype))
        return eye.reshape((size,) + shape)
    if likelihood == "bernoulli":
        s = jax.nn.sigmoid(f).reshape(-1)
        root = jnp.sqrt(s * (1 - s))
        return (jnp.eye(size, dtype=f.dtype) * root[:, None]).reshape((size,) + shape)
    # categorical: per position t, B_t = (diag(sqrt p) - p sqrt(p)^T) / sqrt(T)
    # (column c: sqrt(p_c)(e_c - p)), the NLL being the mean over the T positions
    c = shape[-1]
    p = jax.nn.softmax(f.reshape(-1, c), axis=-1)  # (T, C)
    t = p.shape[0]
    rp = jnp.sqrt(p / t)
    bt = jax.vmap(lambda p, r: jnp.diag(r) - p[:, None] * r[None, :])(p, rp)  # (T, C, C)
    cols = jnp.einsum("ts,trc->tcsr", jnp.eye(t, dtype=f.dtype), bt)  # (T, C_col, T, C_row)
    return cols.reshape((t * c,) + shape)


def sampled_gradients(likelihood: str, f: jax.Array, key, num_samples: int, variance=1.0):
    """``grad_f l(y_s | f)`` for ``y_s ~ p(. | f)``, as ``(num_samples, *f.shape)``."""
    shape = (num_samples,) + f.shape
    if likelihood == "gaussian":
        eps = jax.random.normal(key, shape, f.dtype)
        return eps / jnp.sqrt(jnp.asarray(variance, f.dtype))
    if likelihood == "bernoulli":
        s = jax.nn.sigmoid(f)
        y = jax.random.bernoulli(key, s, shape).astype(f.dtype)
        return s - y
    p = jax.nn.softmax(f, axis=-1)
    y = jax.random.categorical(key, f, axis=-1, shape=shape[:-1])
    positions = f.size // f.shape[-1]
    return (p - jax.nn.one_hot(y, f.shape[-1], dtype=f.dtype)) / jnp.sqrt(positions)


def quadratic(likelihood: str, f: jax.Array, t1: jax.Array, t2: jax.Array, variance=1.0):
    """``sum over examples of t1^T H(f) t2`` for batched outputs ``f`` and tangents ``t1, t2``."""
    if likelihood == "gaussian":
        return jnp.sum(t1 * t2) / variance
    if likelihood == "bernoulli":
        s = jax.nn.sigmoid(f)
        return jnp.sum(s * (1 - s) * t1 * t2)
    p = jax.nn.softmax(f, axis=-1)
    pt1 = jnp.sum(p * t1, axis=-1)
    pt2 = jnp.sum(p * t2, axis=-1)
    positions = f[0].size // f.shape[-1]  # per example
    return (jnp.sum(p * t1 * t2) - jnp.sum(pt1 * pt2)) / positions
