"""The digits classifier benchmark at CPU scale, shared by curvlib's side and kfac-jax's side.

scikit-learn's bundled digits (8x8 images, pixels scaled to [0, 1], ten classes),
a 64-128-64-10 MLP with tanh hidden layers and linear logits, trained on the
softmax cross-entropy averaged over examples: the categorical negative
log-likelihood, so K-FAC's Fisher is its Gauss-Newton matrix. Full batch of the
first 1792 images (deterministic), float32, one set of initial weights for every
optimiser.

Like ``benchmarks/_autoencoder.py``, this module needs only jax, numpy and
scikit-learn (no curvlib), so that ``benchmarks/kfac_jax_ref.py`` can import it
inside the separate kfac-jax environment (jax 0.9.1).
"""

from __future__ import annotations

import numpy as np

from . import _autoencoder

SIZES = (64, 128, 64, 10)
NUM_EXAMPLES = 1792  # digits has 1797 images; the autoencoder's 1792
NUM_CLASSES = 10


def data() -> tuple[np.ndarray, np.ndarray]:
    """The first 1792 digits: float32 ``(1792, 64)`` in [0, 1] and int32 labels ``(1792,)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data[:NUM_EXAMPLES] / 16.0).astype(np.float32)
    y = d.target[:NUM_EXAMPLES].astype(np.int32)
    return x, y


def init_params(seed: int = 0) -> list:
    """Glorot-normal weights and zero biases for `SIZES` (`_autoencoder.init_params`)."""
    return _autoencoder.init_params(seed, SIZES)


def model(params, x, jnp):
    """Logits ``(n, 10)``; ``jnp`` is passed in so either JAX installation can run it."""
    h = x
    last = len(params) - 1
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i != last:
            h = jnp.tanh(h)
    return h


def softmax_xent(logits, y, jnp):
    """Mean over examples of the softmax cross-entropy with integer labels ``y``."""
    z = logits - jnp.max(logits, axis=-1, keepdims=True)
    logp = z - jnp.log(jnp.sum(jnp.exp(z), axis=-1, keepdims=True))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
