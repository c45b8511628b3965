"""Small flax models for the demos: a decoder-only transformer and an MLP classifier.

Both are plain ``flax.linen`` modules, so their parameters are an ordinary
pytree and every curvlib operator applies to ``model.apply`` directly. The loss
functions follow [`curvlib.landscape`][curvlib.landscape]'s convention: ``loss_fn(params, batch)``
is the *mean* loss over the batch's leading axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclass(frozen=True)
class TransformerConfig:
    """Size of `DecoderLM` (defaults: ~0.1M parameters, trains in a minute on 2 cores)."""

    vocab_size: int = 96
    seq_len: int = 64
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention and a GELU MLP."""

    d_model: int
    num_heads: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, x):
        T = x.shape[-2]
        mask = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
        del T
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.d_model, use_bias=False
        )(h, h, mask=mask)
        x = x + h
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.mlp_ratio * self.d_model)(h)
        h = nn.gelu(h)
        h = nn.Dense(self.d_model)(h)
        return x + h


class DecoderLM(nn.Module):
    """A decoder-only (GPT-style) character language model.

    Token and learned position embeddings, ``num_layers`` pre-LN blocks, a final
    LayerNorm and an untied output projection. Input ``(..., T)`` int tokens,
    output ``(..., T, vocab_size)`` logits.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        T = tokens.shape[-1]
        x = nn.Embed(c.vocab_size, c.d_model, name="embed")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (c.seq_len, c.d_model),
                         jnp.float32)
        x = x + pos[:T]
        for i in range(c.num_layers):
            x = Block(c.d_model, c.num_heads, c.mlp_ratio, name=f"block{i}")(x)
        x = nn.LayerNorm(name="ln_f")(x)
        return nn.Dense(c.vocab_size, name="head")(x)


def init_transformer(config: TransformerConfig, key: jax.Array):
    """``(model, params)`` for a `DecoderLM` of the given size."""
    model = DecoderLM(config)
    params = model.init(key, jnp.zeros((1, config.seq_len), jnp.int32))["params"]
    return model, params


def lm_loss_fn(model: DecoderLM):
    """Mean next-token cross-entropy; a batch is ``(n, T + 1)`` token sequences.

    Every sequence has the same length, so the mean over tokens equals the mean
    over sequences of each sequence's mean token loss: one sample = one sequence.
    """

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    return loss_fn


class MLP(nn.Module):
    """A small tanh MLP classifier (smooth, so its Hessian is well defined everywhere)."""

    hidden: tuple = (32,)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = jnp.tanh(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)


def classifier_loss_fn(model: nn.Module):
    """Mean softmax cross-entropy; a batch is ``(x, y)``."""

    def loss_fn(params, batch):
        x, y = batch
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


def train(loss_fn, params, sample_batch, *, key, num_steps: int, learning_rate: float = 3e-3,
          weight_decay: float = 0.0):
    """Adam(W) training as one compiled ``lax.scan``; returns ``(params, losses)``.

    Args:
      loss_fn: ``loss_fn(params, batch)``.
      params: initial parameters.
      sample_batch: ``sample_batch(key) -> batch`` (jax-traceable).
      key: PRNG key for the batches.
      num_steps: optimisation steps.
      learning_rate: peak rate of a warmup-cosine schedule.
      weight_decay: AdamW decoupled weight decay.
    """
    sched = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, num_steps // 20), max(2, num_steps), learning_rate / 20
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, weight_decay=weight_decay))

    @jax.jit
    def run(params, key):
        def step(carry, k):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p, sample_batch(k))
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (p, _), losses = jax.lax.scan(step, (params, opt.init(params)),
                                      jax.random.split(key, num_steps))
        return p, losses

    return run(params, key)
