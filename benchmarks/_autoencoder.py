"""The deep autoencoder benchmark at CPU scale, shared by curvlib's side and kfac-jax's side.

The classic K-FAC benchmark (Hinton & Salakhutdinov 2006; Martens 2010; Martens &
Grosse 2015) shrunk to scikit-learn's bundled digits: 8x8 images (pixels scaled
to [0, 1]), a 64-32-16-8-16-32-64 autoencoder with tanh hidden layers and a
linear 8-unit code, trained on the binary cross-entropy of the sigmoid outputs
(summed over pixels, averaged over examples): the Bernoulli negative
log-likelihood, so K-FAC's Fisher is its Gauss-Newton matrix.

This module needs only jax, numpy and scikit-learn (no curvlib), so that
``benchmarks/kfac_jax_ref.py`` can import it inside the separate kfac-jax
environment (jax 0.9.1) and both sides train the same function from the same
initial weights on the same batches.
"""

from __future__ import annotations

import numpy as np

SIZES = (64, 32, 16, 8, 16, 32, 64)
CODE_LAYER = 2  # index of the linear layer producing the 8-unit code
NUM_EXAMPLES = 1792  # digits has 1797 images; 1792 = 4 batches of 448
BATCH_SIZE = 448


def data() -> np.ndarray:
    """The first 1792 digits as float32 ``(1792, 64)`` in [0, 1]."""
    from sklearn.datasets import load_digits

    x = load_digits().data[:NUM_EXAMPLES] / 16.0
    return x.astype(np.float32)


def init_params(seed: int = 0, sizes: tuple = SIZES) -> list:
    """Glorot-normal weights and zero biases, as numpy float32 (a list of ``{"w", "b"}``),
    for the layer widths ``sizes`` (default: the autoencoder's)."""
    rng = np.random.default_rng(seed)
    params = []
    for din, dout in zip(sizes[:-1], sizes[1:], strict=True):
        std = np.sqrt(2.0 / (din + dout))
        params.append({
            "w": (std * rng.standard_normal((din, dout))).astype(np.float32),
            "b": np.zeros((dout,), np.float32),
        })
    return params


def batch_indices(step: int, seed: int = 0) -> np.ndarray:
    """Indices of the mini-batch of ``step``: epochs of a fixed permutation per epoch."""
    per_epoch = NUM_EXAMPLES // BATCH_SIZE
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng(seed + epoch).permutation(NUM_EXAMPLES)
    return perm[i * BATCH_SIZE:(i + 1) * BATCH_SIZE]


def batches(num_steps: int, seed: int = 0) -> np.ndarray:
    """All mini-batch indices of a run, ``(num_steps, BATCH_SIZE)``."""
    return np.stack([batch_indices(s, seed) for s in range(num_steps)])


def model(params, x, jnp):
    """Logits ``(n, 64)``; ``jnp`` is passed in so either JAX installation can run it."""
    h = x
    last = len(params) - 1
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i not in (CODE_LAYER, last):
            h = jnp.tanh(h)
    return h


def bernoulli_nll(logits, x, jnp):
    """Mean over examples of the summed sigmoid cross-entropy (numerically stable)."""
    per = jnp.maximum(logits, 0) - logits * x + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return jnp.mean(jnp.sum(per, axis=-1))
