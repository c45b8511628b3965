"""Edge cases of multi-device placement on JAX's own runtime (8 host devices).

The pytest process has one CPU device, so the checks run once, in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the code below):

* a model committed to one device that is not the default one (``jax.devices()[3]``):
  an eager call's first answer (compile-behind's answer-now path, computed on the host)
  must come back on that device, as the compiled program's answer does, not on device 0;
* a microbatched product of a batch split over an ``Auto`` mesh (data parallelism): the
  chunks must stay split over the devices (no all-gather of the batch, each device
  evaluating 1/8 of every chunk), and the product must equal the unsharded one;
* a microbatched batch whose inputs are split over the devices and whose labels are
  replicated (Auto and Explicit meshes): chunk ``c`` must hold the same samples in both;
* K-FAC's ``init`` on replicated parameters (placed on the mesh): no two state leaves may
  share a buffer, so ``jax.jit(step, donate_argnums=(0, 1))`` runs and matches one device.
"""

import textwrap

import pytest

WORKER = textwrap.dedent('''
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import curvlib
    from curvlib import landscape

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": jax.random.normal(k[0], (6, 12)) / 3,
              "w2": jax.random.normal(k[1], (12, 3)) / 4}
    x = jax.random.normal(k[2], (64, 6))
    y = jax.random.normal(k[3], (64, 3))
    loss = lambda p, x, y: 0.5 * jnp.mean(jnp.sum((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2, -1))
    v0 = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), params)
    out = {}

    # 1. everything committed to device 3; eager calls answer now (compile behind on)
    curvlib.compile_behind(True)
    dev = jax.devices()[3]
    p3, v3, x3, y3 = jax.device_put((params, v0, x, y), dev)
    hv = curvlib.hessian_matvec(loss, p3, x3, y3)
    key = jax.random.PRNGKey(1)
    where = lambda t: sorted({d.id for a in jax.tree.leaves(t) for d in a.devices()})
    out["devices"] = {
        "eigsh": where(curvlib.eigsh(hv, v3, 2)),
        "lanczos": where(curvlib.lanczos(hv, v3, 5)),
        "cg": where(curvlib.cg(hv, v3, damping=1.0)),
        "power_iteration": where(curvlib.power_iteration(hv, v3, 1, max_matvecs=50)),
        "spectral_density": where(curvlib.spectral_density(hv, v3, key, num_matvecs=5,
                                                           num_probes=2)),
        "curvature_subspace": where(landscape.curvature_subspace(
            lambda p, b: loss(p, *b), p3, (x3, y3), 16, 2, key=key).eigenvectors),
    }
    curvlib.compile_behind(False)

    # 2. a microbatched product of a batch split 8 ways (parameters replicated)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sp, sv = jax.device_put((params, v0), rep)
    sx, sy = jax.device_put((x, y), split)
    ref = curvlib.hessian_matvec(loss, params, x, y)(v0)
    mb = curvlib.hessian_matvec(lambda p, b: loss(p, *b), sp, (sx, sy), microbatch_size=16)
    apply = jax.jit(lambda mv, v: mv(v))
    got = apply(mb, sv)
    hlo = apply.lower(mb, sv).compile().as_text()
    out["microbatch"] = {
        "err": max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                   for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got))),
        "gathers": re.findall(r"(\\S+) (?:all-gather|all-to-all)\\(", hlo),
        "tanh": sorted(set(re.findall(r"f64\\[([0-9,]*)\\]\\S* tanh\\(", hlo))),
    }

    # 3. inputs split over the devices, labels replicated, on Auto and Explicit meshes
    err = lambda r, g: max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                           for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(g)))
    lb = lambda p, b: loss(p, *b)
    grad = jax.grad(lb)(params, (x, y))
    out["labels_replicated"] = {}
    for kind in ("Auto", "Explicit"):
        m = jax.make_mesh((8,), ("data",), axis_types=(getattr(AxisType, kind),))
        r, s = NamedSharding(m, P()), NamedSharding(m, P("data"))
        with jax.set_mesh(m):
            mp, mv, mx, my = jax.device_put((params, v0, x, y), (r, r, s, r))
            h = apply(curvlib.hessian_matvec(lb, mp, (mx, my), microbatch_size=16), mv)
            g = curvlib.gradient(lb, mp, (mx, my), microbatch_size=16)[1]
        out["labels_replicated"][kind] = {"hvp": err(ref, h), "gradient": err(grad, g)}

    # 4. K-FAC on replicated parameters (data parallelism), stepped with donated state
    import optax
    model = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    tx = curvlib.kfac(model_fn=model, example_inputs={"x": x}, likelihood="gaussian",
                      damping=0.5, inverse_every=2)

    def step(p, s, x, y):
        value, g = jax.value_and_grad(loss)(p, x, y)
        u, s = tx.update(g, s, p, value=value, value_fn=loss, x=x, y=y)
        return optax.apply_updates(p, u), s

    def shared(state):  # pairs of state leaves holding one buffer on some device
        seen, pairs = {}, []
        for i, a in enumerate(jax.tree.leaves(state)):
            for b in {s.data.unsafe_buffer_pointer() for s in a.addressable_shards}:
                if b in seen:
                    pairs.append((seen[b], i))
                seen[b] = i
        return pairs

    def run(p, x, y):
        s = tx.init(p)
        pairs = shared(s)
        if pairs:  # (donating them crashes the process: the other checks would be lost)
            return pairs, None
        f = jax.jit(step, donate_argnums=(0, 1))
        for _ in range(2):
            p, s = f(p, s, x, y)
        return pairs, p

    _, p1 = run(jax.tree.map(jnp.copy, params), x, y)
    pairs, p8 = run(jax.device_put(params, rep), sx, sy)
    out["kfac_donated"] = {"shared": pairs, "err": None if p8 is None else err(p1, p8)}
    json.dump(out, open(sys.argv[1], "w"))
''')


@pytest.fixture(scope="module")
def report(tmp_path_factory, on_eight_devices):
    return on_eight_devices(WORKER, tmp_path_factory.mktemp("sharding_edges") / "out.json",
                            timeout=900)


def test_eager_answers_stay_on_the_models_device(report):
    # before: the answer-now results were put on the default device (0)
    assert report["devices"] == {name: [3] for name in report["devices"]}, report["devices"]


def test_microbatches_of_a_split_batch_stay_split(report):
    res = report["microbatch"]
    assert res["err"] < 1e-12, res
    # before: half the batch all-gathered onto every device ([4,8,6]) and each chunk of 16
    # evaluated 8 samples per device (four copies of the work); now 16 / 8 = 2 per device
    assert res["gathers"] == [], res
    assert res["tanh"] == ["2,12"], res


def test_microbatches_pair_split_inputs_with_replicated_labels(report):
    # before (Explicit mesh): the inputs were chunked strided and the labels contiguously,
    # so chunk c paired the wrong labels: the product was off by 137%, the gradient by 87%
    for kind, res in report["labels_replicated"].items():
        assert res["hvp"] < 1e-12 and res["gradient"] < 1e-12, (kind, res)


def test_kfac_state_on_a_mesh_can_be_donated(report):
    # before: `init` placed one array into several leaves (damping, info.loss, ...) whose
    # shards then shared buffers; the first donated step failed with "Attempt to donate
    # the same buffer twice" and the process died with a segmentation fault
    res = report["kfac_donated"]
    assert res["shared"] == [], res
    assert res["err"] < 1e-12, res
