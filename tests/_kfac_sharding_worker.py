"""Multi-device K-FAC checks run in a fresh process by ``tests/test_kfac_sharding.py``.

``python tests/_kfac_sharding_worker.py OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``: the K-FAC factors and
products (``kfac_curvature``) and three jitted ``kfac`` steps (Monte Carlo,
adaptive step and damping) on a tanh MLP, single device vs data-parallel, FSDP
and a 2-D mesh; records the errors, the layouts of the updates and of the
state's factors, and the number of traces of the jitted step. Nothing runs on
import (pytest's doctest collection imports this module).
"""

from __future__ import annotations

import json
import sys

import numpy as np


def _setup():
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(0), 5)
    d, h, o, n = 8, 16, 8, 64
    params = {
        "w1": jax.random.normal(k1, (d, h)) / 3,
        "b1": 0.1 * jax.random.normal(k5, (h,)),
        "w2": jax.random.normal(k2, (h, o)) / 4,
    }
    x = jax.random.normal(k3, (n, d))
    y = jax.random.normal(k4, (n, o))

    def model(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    def loss(p, x, y):
        return 0.5 * jnp.mean(jnp.sum((model(p, x) - y) ** 2, axis=-1))

    return params, x, y, model, loss


def _run(params, x, y, model, loss):
    import jax
    import optax

    from curvlib import kronecker

    curv = kronecker.kfac_curvature(model, params, x, likelihood="gaussian")
    v = jax.tree.map(lambda p: jax.numpy.cos(jax.numpy.arange(p.size, dtype=p.dtype))
                     .reshape(p.shape), params)
    v = jax.tree.map(lambda a, p: jax.device_put(a, p.sharding), v, params)
    out = {
        "factors": curv.factors,
        "matvec": curv.matvec(v),
        "inverse_exact": curv.inverse_matvec(0.1)(v),
        "inverse_factored": curv.inverse_matvec(0.1, method="factored")(v),
    }
    tx = kronecker.kfac(model_fn=model, example_inputs={"x": x}, likelihood="gaussian",
                        key=jax.random.PRNGKey(1), damping=0.5, damping_every=2,
                        inverse_every=2)
    traces = []

    @jax.jit
    def step(p, s, x, y):
        traces.append(1)
        value, g = jax.value_and_grad(loss)(p, x, y)
        u, s = tx.update(g, s, p, value=value, value_fn=loss, x=x, y=y)
        return optax.apply_updates(p, u), s, u

    state = tx.init(params)
    init_layout = [_spec(a) for a in jax.tree.leaves(state[0].factors)]
    p = params
    for _ in range(3):
        p, state, u = step(p, state, x, y)
    out["update"] = u
    out["params_after"] = p
    out["state_factors"] = state[0].factors
    meta = {
        "traces": len(traces),
        "factor_layout_init": init_layout,
        "factor_layout_after": [_spec(a) for a in jax.tree.leaves(state[0].factors)],
        "skipped": bool(state[0].info.skipped),
    }
    return out, meta


def _shared_transform(params, plain, x, y, model, loss):
    """One transform, two ``init`` calls (sharded ``params``, then unsharded ``plain``): the
    sharded state stepped by that transform and by a rebuilt one that never saw ``init``
    (as after a restart) keeps its factors' layout and traces once."""
    import jax
    import optax

    from curvlib import kronecker

    def make():
        return kronecker.kfac(model_fn=model, example_inputs={"x": x}, likelihood="gaussian",
                              key=jax.random.PRNGKey(1), damping=0.5, damping_every=2,
                              inverse_every=2)

    tx = make()
    state = tx.init(params)
    tx.init(plain)  # a second init must not change how the first state is placed
    out = {}
    for name, t in (("same", tx), ("rebuilt", make())):
        traces = []

        @jax.jit
        def step(p, s, x, y, t=t, traces=traces):
            traces.append(1)
            value, g = jax.value_and_grad(loss)(p, x, y)
            u, s = t.update(g, s, p, value=value, value_fn=loss, x=x, y=y)
            return optax.apply_updates(p, u), s

        p, s = params, state
        for _ in range(3):
            p, s = step(p, s, x, y)
        out[name] = {"traces": len(traces),
                     "factor_layout_after": [_spec(a) for a in jax.tree.leaves(s[0].factors)]}
    return out


def _spec(a):
    s = getattr(a, "sharding", None)
    spec = getattr(s, "spec", None)
    return "single" if spec is None else str(tuple(spec))


def _compare(ref, got):
    import jax

    errs = []
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        errs.append(float(np.max(np.abs(r - g)) / max(float(np.max(np.abs(r))), 1e-300)))
    return max(errs)


def _layout(tree, specs):
    import jax

    recs = []
    for leaf, want in zip(jax.tree.leaves(tree), specs, strict=True):
        spec = tuple(leaf.sharding.spec)
        trim = lambda s: tuple(s[: max([i + 1 for i, a in enumerate(s) if a is not None] or [0])])
        shard = max(int(np.prod(s.data.shape)) for s in leaf.addressable_shards)
        recs.append({"spec": str(spec), "matches": trim(spec) == trim(tuple(want)),
                     "max_shard_fraction": shard / max(1, leaf.size)})
    return recs


def main(path):
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    params, x, y, model, loss = _setup()
    ref, ref_meta = _run(params, x, y, model, loss)
    ref = jax.tree.map(np.asarray, ref)
    mesh1 = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    mesh2 = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    layouts = {
        "data_parallel": (mesh1, P("data"), {"w1": P(), "b1": P(), "w2": P()}),
        "fsdp": (mesh1, P("data"), {"w1": P(None, "data"), "b1": P("data"), "w2": P("data")}),
        "data_x_model": (mesh2, P("data"),
                         {"w1": P(None, "model"), "b1": P("model"), "w2": P("model")}),
    }
    result = {"devices": jax.device_count(), "reference": ref_meta, "layouts": {}}
    for name, (mesh, bspec, pspecs) in layouts.items():
        sp = jax.device_put(params, {k: NamedSharding(mesh, s) for k, s in pspecs.items()})
        sx = jax.device_put(x, NamedSharding(mesh, bspec))
        sy = jax.device_put(y, NamedSharding(mesh, bspec))
        got, meta = _run(sp, sx, sy, model, loss)
        specs = [pspecs[k] for k in sorted(pspecs)]
        rec = {key: {"err": _compare(ref[key], got[key])} for key in got}
        for key in ("matvec", "inverse_exact", "inverse_factored", "update", "params_after"):
            rec[key]["layout"] = _layout(got[key], specs)
        meta["shared_transform"] = _shared_transform(sp, params, sx, sy, model, loss)
        rec["meta"] = meta
        result["layouts"][name] = rec
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
