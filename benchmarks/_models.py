"""Benchmark models, written twice: in JAX and in PyTorch, over one parameter dict.

Both sides take the *same* flat ``dict[str, array]`` of float32 weights, so porting
is ``torch.from_numpy`` per leaf and both compute the same function (checked by
``check_port``). Two architectures:

* ``mlp``: tanh MLP classifier on scikit-learn's bundled digits (offline data).
* ``transformer``: a small pre-LayerNorm decoder-only transformer (GPT-style,
  causal self-attention, GELU MLP, untied output head) trained for a few Adam
  steps on character-level text taken from the Python standard library's own
  source (offline, deterministic). The default size has ~0.5M parameters.

``curvlib.demo.models`` (another engineer's module) is preferred when it exists,
but the benchmark keeps this functional pair because the torch reference needs
exactly the same architecture and weights.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LN_EPS = 1e-5
NEG_INF = -1e9


class Problem(NamedTuple):
    """One curvature problem: ``loss(params, *batch)`` and its split ``model_fn``/``loss_fn``."""

    name: str
    params: dict
    batch: tuple  # (inputs, targets) as jax arrays
    loss: object  # loss(params, inputs, targets) -> scalar
    model_fn: object  # model_fn(params, inputs) -> logits
    loss_fn: object  # loss_fn(logits, targets) -> scalar
    config: dict


def num_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------- data


def text_tokens(n_chars: int = 200_000) -> np.ndarray:
    """Character-level tokens (ASCII codes < 128) of stdlib source text, deterministic."""
    import argparse
    import collections
    import json
    import textwrap

    text = "".join(inspect.getsource(m) for m in (argparse, collections, json, textwrap))
    codes = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8).astype(np.int32)
    codes = np.minimum(codes, 127)
    reps = int(np.ceil(n_chars / len(codes)))
    return np.tile(codes, reps)[:n_chars]


def text_batch(batch_size: int, seq_len: int, seed: int = 0):
    toks = text_tokens()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(toks) - seq_len - 1, size=batch_size)
    x = np.stack([toks[s : s + seq_len] for s in starts])
    y = np.stack([toks[s + 1 : s + seq_len + 1] for s in starts])
    return x.astype(np.int32), y.astype(np.int32)


def digits_batch(n: int = 512):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data[:n] / 16.0).astype(np.float32)
    y = d.target[:n].astype(np.int32)
    return x, y


# ------------------------------------------------------------------------ MLP


def mlp_init(key, sizes) -> dict:
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a)
        params[f"b{i}"] = jnp.full((b,), 0.01, jnp.float32)
    return params


def mlp_apply(params, x):
    n = len(params) // 2
    h = x
    for i in range(n):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            h = jnp.tanh(h)
    return h


def cross_entropy(logits, y):
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    return -jnp.mean(picked)


def make_mlp(width: int = 256, depth: int = 2, n: int = 512, seed: int = 0, in_dim=None) -> Problem:
    """A tanh MLP on the digits data (``in_dim`` other than 64 pads/tiles the inputs)."""
    x, y = digits_batch(n)
    if in_dim is not None and in_dim != x.shape[1]:
        reps = int(np.ceil(in_dim / x.shape[1]))
        x = np.tile(x, (1, reps))[:, :in_dim]
    sizes = [x.shape[1]] + [width] * depth + [10]
    params = mlp_init(jax.random.PRNGKey(seed), sizes)
    loss = lambda p, xb, yb: cross_entropy(mlp_apply(p, xb), yb)
    return Problem(
        "mlp", params, (jnp.asarray(x), jnp.asarray(y)), loss, mlp_apply, cross_entropy,
        {"sizes": sizes, "batch": n, "data": "sklearn digits"},
    )


# ---------------------------------------------------------------- transformer


def transformer_init(key, *, vocab=128, d=128, layers=2, heads=4, seq_len=64, mlp_mult=4):
    ks = iter(jax.random.split(key, 4 + 4 * layers))
    nrm = lambda shape, s: jax.random.normal(next(ks), shape, jnp.float32) * s
    p = {
        "tok_emb": nrm((vocab, d), 0.02),
        "pos_emb": nrm((seq_len, d), 0.02),
    }
    for i in range(layers):
        p[f"l{i}.ln1_g"] = jnp.ones((d,), jnp.float32)
        p[f"l{i}.ln1_b"] = jnp.zeros((d,), jnp.float32)
        p[f"l{i}.wqkv"] = nrm((d, 3 * d), d**-0.5)
        p[f"l{i}.wo"] = nrm((d, d), (2 * layers * d) ** -0.5)
        p[f"l{i}.ln2_g"] = jnp.ones((d,), jnp.float32)
        p[f"l{i}.ln2_b"] = jnp.zeros((d,), jnp.float32)
        p[f"l{i}.w1"] = nrm((d, mlp_mult * d), d**-0.5)
        p[f"l{i}.b1"] = jnp.zeros((mlp_mult * d,), jnp.float32)
        p[f"l{i}.w2"] = nrm((mlp_mult * d, d), (2 * layers * mlp_mult * d) ** -0.5)
        p[f"l{i}.b2"] = jnp.zeros((d,), jnp.float32)
    p["lnf_g"] = jnp.ones((d,), jnp.float32)
    p["lnf_b"] = jnp.zeros((d,), jnp.float32)
    p["head"] = nrm((d, vocab), d**-0.5)
    return p


def _layer_norm(x, g, b):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + LN_EPS) * g + b


def transformer_apply(params, tokens, *, heads=4):
    layers = sum(1 for k in params if k.endswith(".wqkv"))
    B, T = tokens.shape
    h = params["tok_emb"][tokens] + params["pos_emb"][:T]
    d = h.shape[-1]
    hd = d // heads
    causal = jnp.tril(jnp.ones((T, T), bool))
    for i in range(layers):
        a = _layer_norm(h, params[f"l{i}.ln1_g"], params[f"l{i}.ln1_b"])
        qkv = a @ params[f"l{i}.wqkv"]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k, v = (t.reshape(B, T, heads, hd).transpose(0, 2, 1, 3) for t in (q, k, v))
        s = (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(hd)
        s = jnp.where(causal, s, NEG_INF)
        att = jax.nn.softmax(s, axis=-1) @ v
        att = att.transpose(0, 2, 1, 3).reshape(B, T, d)
        h = h + att @ params[f"l{i}.wo"]
        a = _layer_norm(h, params[f"l{i}.ln2_g"], params[f"l{i}.ln2_b"])
        m = jax.nn.gelu(a @ params[f"l{i}.w1"] + params[f"l{i}.b1"], approximate=True)
        h = h + m @ params[f"l{i}.w2"] + params[f"l{i}.b2"]
    h = _layer_norm(h, params["lnf_g"], params["lnf_b"])
    return h @ params["head"]


def make_transformer(
    *, d=128, layers=2, heads=4, seq_len=64, batch_size=16, vocab=256, train_steps=60,
    seed=0,
) -> Problem:
    """The ~0.5M-parameter decoder-only transformer, briefly trained (Hessian not at init)."""
    import optax

    params = transformer_init(
        jax.random.PRNGKey(seed), vocab=vocab, d=d, layers=layers, heads=heads, seq_len=seq_len
    )
    apply = lambda p, x: transformer_apply(p, x, heads=heads)
    loss = lambda p, x, y: cross_entropy(apply(p, x), y)
    if train_steps:
        opt = optax.adam(3e-3)
        state = opt.init(params)

        @jax.jit
        def step(p, s, x, y):
            g = jax.grad(loss)(p, x, y)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        for t in range(train_steps):
            x, y = text_batch(batch_size, seq_len, seed=1000 + t)
            params, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
        params = jax.tree.map(lambda a: a.block_until_ready(), params)
    x, y = text_batch(batch_size, seq_len, seed=seed)
    cfg = dict(d=d, layers=layers, heads=heads, seq_len=seq_len, batch=batch_size, vocab=vocab,
               train_steps=train_steps, data="stdlib source, char-level")
    return Problem("transformer", params, (jnp.asarray(x), jnp.asarray(y)), loss, apply,
                   cross_entropy, cfg)


# ---------------------------------------------------------------------- torch


def torch_port(problem: Problem):
    """The same model in PyTorch: ``(params, loss_fn(params) -> scalar)`` with the same weights."""
    import torch

    tp = {k: torch.from_numpy(np.array(v)).requires_grad_(True) for k, v in problem.params.items()}
    x, y = (torch.from_numpy(np.array(a)).long() if a.dtype.kind == "i"
            else torch.from_numpy(np.array(a)) for a in problem.batch)
    f = torch_forward(problem)
    return tp, lambda p: f(p, x, y)


def torch_forward(problem: Problem):
    """``f(params, x, y) -> mean loss``: the problem's architecture in PyTorch."""
    import torch
    import torch.nn.functional as F

    if problem.name == "mlp":

        def forward(p, x, y):
            n = len(p) // 2
            h = x
            for i in range(n):
                h = h @ p[f"w{i}"] + p[f"b{i}"]
                if i < n - 1:
                    h = torch.tanh(h)
            return F.cross_entropy(h, y)

        return forward

    heads = problem.config["heads"]
    layers = problem.config["layers"]

    def ln(h, g, b):
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + LN_EPS) * g + b

    def forward(p, x, y):
        B, T = x.shape
        h = p["tok_emb"][x] + p["pos_emb"][:T]
        d = h.shape[-1]
        hd = d // heads
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
        for i in range(layers):
            a = ln(h, p[f"l{i}.ln1_g"], p[f"l{i}.ln1_b"])
            q, k, v = (a @ p[f"l{i}.wqkv"]).split(d, dim=-1)
            q, k, v = (t.reshape(B, T, heads, hd).transpose(1, 2) for t in (q, k, v))
            s = (q @ k.transpose(-1, -2)) / np.sqrt(hd)
            s = torch.where(causal, s, torch.tensor(NEG_INF))
            att = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, d)
            h = h + att @ p[f"l{i}.wo"]
            a = ln(h, p[f"l{i}.ln2_g"], p[f"l{i}.ln2_b"])
            m = F.gelu(a @ p[f"l{i}.w1"] + p[f"l{i}.b1"], approximate="tanh")
            h = h + m @ p[f"l{i}.w2"] + p[f"l{i}.b2"]
        h = ln(h, p["lnf_g"], p["lnf_b"])
        logits = h @ p["head"]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    return forward


def check_port(problem: Problem) -> float:
    """Relative difference of the loss between the JAX and torch implementations."""
    tp, forward = torch_port(problem)
    lt = float(forward(tp).detach())
    lj = float(problem.loss(problem.params, *problem.batch))
    return abs(lt - lj) / max(abs(lj), 1e-12)
