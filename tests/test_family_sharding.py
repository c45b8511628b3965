"""The family on 8 devices (FSDP: parameters and batch split over one mesh axis).

The pytest process has one CPU device, so the check runs once, in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the code below). Every
parameter-shaped result (Fisher, empirical Fisher, ``J^T u``, a restricted block, a
streamed product, a CG inverse) must equal the single-device value and keep the
parameters' ``PartitionSpec``, so no device holds more than its shard.
"""

import textwrap

import pytest

WORKER = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import curvlib
    from jax.sharding import NamedSharding, PartitionSpec as P

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": jax.random.normal(k[0], (8, 16)) / 3,
              "w2": jax.random.normal(k[1], (16, 8)) / 4}
    x = jax.random.normal(k[2], (32, 8))
    y = jax.random.randint(k[3], (32,), 0, 8)
    model = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    per_example = lambda p, ex: -jax.nn.log_softmax(model(p, ex[0][None])[0])[ex[1]]
    loss = lambda p, b: jnp.mean(jax.vmap(per_example, (None, 0))(p, b))
    v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), params)
    u = jnp.sin(jnp.arange(32 * 8.0)).reshape(32, 8)
    host = [(np.asarray(x[i:i + 16]), np.asarray(y[i:i + 16])) for i in (0, 16)]

    def compute(params, x, y, v, u, sharding=None):
        F = curvlib.fisher_matvec(model, params, x)
        EF = curvlib.empirical_fisher_matvec(per_example, params, (x, y))
        JT = curvlib.jacobian_transpose_matvec(model, params, x)
        Hb = curvlib.restrict(curvlib.hessian_matvec(loss, params, (x, y)), params,
                              {"w1": False, "w2": True})
        S = curvlib.stream_matvec(lambda p, b: curvlib.fisher_matvec(model, p, b[0]), params,
                                  host, sharding=sharding)
        inv = curvlib.inverse_matvec(F, damping=0.1, cg=curvlib.CG(rtol=1e-12))
        apply = jax.jit(lambda mv, a: mv(a))
        return {"fisher": apply(F, v), "empirical_fisher": apply(EF, v), "jt_u": apply(JT, u),
                "restricted": {"w2": apply(Hb, {"w1": None, "w2": v["w2"]})["w2"]},
                "streamed": S(v), "inverse": apply(inv, v)}

    ref = compute(params, x, y, v, u)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    pshard = {"w1": NamedSharding(mesh, P("fsdp", None)),
              "w2": NamedSharding(mesh, P(None, "fsdp"))}
    data = NamedSharding(mesh, P("fsdp"))
    sp = jax.device_put(params, pshard)
    got = compute(sp, jax.device_put(x, data), jax.device_put(y, data),
                  jax.device_put(v, pshard), jax.device_put(u, data), sharding=data)
    out = {}
    for name in ref:
        r, g = ref[name], got[name]
        err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(r)))
        pad = lambda a: tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
        specs = {key: [str(s) for s in pad(a)] for key, a in g.items()}
        out[name] = {"err": err, "specs": specs}

    # block spectra called eagerly as a user does (compile behind on): on one device the
    # blocks are solved one at a time; over eight the program keeps the layout
    def blocks(params):
        was = curvlib.compile_behind(True)
        try:
            return curvlib.block_eigsh(curvlib.hessian_matvec(loss, params, (x, y)), params, 2,
                                       key=jax.random.PRNGKey(1))
        finally:
            curvlib.compile_behind(was)

    ref, got = blocks(params), blocks(sp)
    out["block_eigsh"] = {
        "err": max(float(jnp.max(jnp.abs(got[b].eigenvalues - ref[b].eigenvalues)
                                 / jnp.max(jnp.abs(ref[b].eigenvalues)))) for b in ref),
        "specs": {b: [str(s) for s in got[b].eigenvectors[b].sharding.spec] for b in got}}
    json.dump(out, open(sys.argv[1], "w"))
''')


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, on_eight_devices):
    return on_eight_devices(WORKER, tmp_path_factory.mktemp("family_sharding") / "out.json")


@pytest.mark.parametrize(
    "name", ["fisher", "empirical_fisher", "jt_u", "restricted", "streamed", "inverse"])
def test_family_keeps_the_parameters_sharding(sharded, name):
    res = sharded[name]
    assert res["err"] < 1e-10, res
    want = {"w1": ["fsdp", "None"], "w2": ["None", "fsdp"]}
    for key, spec in res["specs"].items():
        assert spec == want[key], (name, key, spec)


def test_eager_block_spectra_keep_the_parameters_sharding(sharded):
    res = sharded["block_eigsh"]
    assert res["err"] < 1e-10, res
    assert res["specs"] == {"w1": ["None", "fsdp"], "w2": ["None", "None", "fsdp"]}, res
