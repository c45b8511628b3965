"""Multi-device checks run in a fresh process by ``tests/test_sharding.py``.

The main pytest process has already initialised JAX with one CPU device, so
the sharded runs live here: ``python tests/_sharding_worker.py OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Each check compares a
sharded run with the single-device answer and records the output layouts; the
test file asserts on the JSON. Nothing runs on import (pytest's doctest
collection imports this module).
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
    d, h, n = 8, 16, 64
    params = {
        "w1": jax.random.normal(k1, (d, h)) / 3,
        "b1": 0.1 * jax.random.normal(k5, (h,)),
        "w2": jax.random.normal(k2, (h, 8)) / 4,
    }
    x = jax.random.normal(k3, (n, d))
    y = jax.random.normal(k4, (n, 8))

    def model(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    def out_loss(o, y):
        return 0.5 * jnp.mean(jnp.sum((o - y) ** 2, axis=-1))

    def loss(p, x, y):
        return out_loss(model(p, x), y)

    v0 = jax.tree.map(lambda p: jnp.ones_like(p) + 0.01 * jnp.arange(p.size).reshape(p.shape),
                      params)
    b = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape),
                     params)
    return params, x, y, model, out_loss, loss, v0, b


def _computations(params, x, y, model, out_loss, loss, v0, b):
    """Every quantity compared between layouts: name -> (value pytree, kind)."""
    out = _products(params, x, y, model, out_loss, loss, v0)
    hv, gv = _operators(params, x, y, model, out_loss, loss)
    out.update(_solvers(hv, gv, v0, b))
    out.update(_stochastic(hv, v0))
    out.update(_optional_uses(params, x, y, loss, hv))
    out.update(_eager_and_streamed(params, x, y, loss, hv, v0))
    return out


def _eager_and_streamed(params, x, y, loss, hv, v0):
    """Eager ``eigsh`` (answer-now path where it applies), a streamed block product and the
    microbatched landscape, ``k_curve`` with the angles between subspaces included."""
    import jax
    import jax.numpy as jnp

    import curvlib
    from curvlib import landscape

    out = {}
    e = curvlib.eigsh(hv, v0, 3, solver=curvlib.Eigsh(basis_size=20, max_restarts=50))
    out["eager_eigsh_vectors"] = e.eigenvectors
    # a stream of four batches placed like the batch; a block of two vectors in one pass
    s = getattr(x, "sharding", None)
    split = s if s is not None and len(s.device_set) > 1 else None
    xh, yh = np.asarray(x), np.asarray(y)  # a stream comes from the host
    batches = [(xh[i:i + 16], yh[i:i + 16]) for i in range(0, 64, 16)]
    S = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, *b), params,
                              batches, sharding=split)
    V = jax.tree.map(lambda a, b: jnp.stack([a, 2.0 * b]), v0, v0)
    out["stream_matmat"] = S.matmat(V)
    # batches of 24, 20, 12 and 8 rows: where the batch is split 8 ways, 20 and 12 rows do
    # not split and are placed replicated (the (2, 4) mesh splits them 2 ways)
    ragged = [(xh[a:b], yh[a:b]) for a, b in ((0, 24), (24, 44), (44, 56), (56, 64))]
    R = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, *b), params,
                              ragged, sharding=split)
    out["stream_ragged_product"] = R(v0)
    out["stream_ragged_gradient"] = curvlib.stream_gradient(
        lambda p, b: loss(p, *b), params, ragged, sharding=split)[1]
    try:
        loss_b = lambda p, b: loss(p, *b)
        # (its microbatched subspace is `curvature_subspace(..., microbatch_size=8)`'s)
        curve = landscape.k_curve(loss_b, params, (x, y), [40], dims=[3], sigmas=[1e-3],
                                  key=jax.random.PRNGKey(2), microbatch_size=8,
                                  progress=False)
        out["landscape_mb_eigenvalues"] = curve.eigenvalues
        out["landscape_curve_closed_form"] = curve.closed_form
        out["landscape_curve_angle"] = curve.max_angle
    except Exception as e:  # recorded; the test names it
        out["landscape_mb_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    return out


def _operators(params, x, y, model, out_loss, loss):
    """The Hessian and GGN operators of the test problem."""
    import curvlib

    hv = curvlib.hessian_matvec(loss, params, x, y)
    gv = curvlib.ggn_matvec(model, out_loss, params, x, loss_args=(y,))
    return hv, gv


def _products(params, x, y, model, out_loss, loss, v0):
    """Hessian (linearize, fwd-rev, microbatched; eager and jitted) and GGN products."""
    import jax

    import curvlib

    hv, gv = _operators(params, x, y, model, out_loss, loss)
    hv_fr = curvlib.hessian_matvec(loss, params, x, y, mode="fwd-rev")
    hv_mb = curvlib.hessian_matvec(
        lambda p, batch: loss(p, *batch), params, (x, y), microbatch_size=16
    )
    jit_apply = jax.jit(lambda mv, v: mv(v))
    return {
        "hvp_linearize": hv(v0),
        "hvp_linearize_jit": jit_apply(hv, v0),
        "hvp_fwd_rev": hv_fr(v0),
        "hvp_microbatched": hv_mb(v0),
        "ggn": gv(v0),
        "ggn_jit": jit_apply(gv, v0),
    }


def _solvers(hv, gv, v0, b):
    """Jitted ``eigsh`` and ``lanczos`` on the Hessian, a damped ``cg`` solve on the GGN."""
    import jax

    import curvlib

    eig = jax.jit(lambda mv, v: curvlib.eigsh(mv, v, 3, basis_size=20, max_restarts=50))
    lz = jax.jit(lambda mv, v: curvlib.lanczos(mv, v, 12))
    cg = jax.jit(lambda mv, b: curvlib.cg(mv, b, damping=0.5, rtol=1e-10))
    out = {}
    e = eig(hv, v0)
    out["eigsh_values"] = e.eigenvalues
    out["eigsh_vectors"] = e.eigenvectors
    out["eigsh_converged"] = e.converged
    l = lz(hv, v0)
    out["lanczos_alphas"] = l.alphas
    out["lanczos_basis"] = l.basis
    c = cg(gv, b)
    out["cg_x"] = c.x
    out["cg_converged"] = c.converged
    return out


def _stochastic(hv, v0):
    """The randomised estimators: Hutchinson / Hutch++ trace, diagonal, SLQ density."""
    import jax

    import curvlib

    key = jax.random.PRNGKey(1)

    @jax.jit
    def run(mv, v):
        tr = curvlib.hutchinson_trace(mv, v, key, 6, method="hutchinson")
        pp = curvlib.hutchinson_trace(mv, v, key, 9)  # Hutch++
        dg = curvlib.hutchinson_diag(mv, v, key, 4)
        sd = curvlib.spectral_density(mv, v, key, num_matvecs=8, num_probes=2)
        return tr, pp, dg, sd

    tr, pp, dg, sd = run(hv, v0)
    return {
        "hutchinson_trace": tr.estimate,
        "hutchpp_trace": pp.estimate,
        "hutchinson_diag": dg.estimate,
        "slq_nodes": sd.nodes,
        "slq_density": sd.density,
    }


def _optional_uses(params, x, y, loss, hv):
    """The use layer: one jitted Newton-CG step and the Delta2(D) pipeline."""
    out = _newton_cg(params, x, y, loss)
    try:
        out.update(_landscape(params, x, y, loss))
    except Exception as e:  # recorded; test_sharding.py decides which layouts may fail
        out["landscape_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    return out


def _newton_cg(params, x, y, loss):
    """One jitted ``scale_by_newton_cg`` step."""
    import jax

    import curvlib
    from curvlib import optim

    tx = optim.scale_by_newton_cg(damping=0.1, cg=curvlib.CG(max_steps=10))

    @jax.jit
    def step(p, s, x, y):
        return tx.update(jax.grad(loss)(p, x, y), s, p, value_fn=loss, x=x, y=y)

    u, s = step(params, tx.init(params), x, y)
    return {
        "newton_cg_update": u,
        "newton_cg_solution": s.solution,
        "newton_cg_accepted": s.info.accepted,
    }


def _landscape(params, x, y, loss):
    import jax

    from curvlib import landscape

    loss_b = lambda p, b: loss(p, *b)
    data = (x, y)
    sub = landscape.curvature_subspace(loss_b, params, data, 40, 3, key=jax.random.PRNGKey(0))
    co = landscape.increment_coefficients(loss_b, params, data, 40, sub.eigenvectors)
    return {
        "landscape_eigenvalues": sub.eigenvalues,
        "landscape_eigenvectors": sub.eigenvectors,
        "landscape_converged": sub.converged,
        # c = U b and B = U A U^T depend on the eigenvectors' signs; |c|, |B| do not
        "landscape_c": abs(co.c),
        "landscape_B": abs(co.B),
        "landscape_delta2": landscape.delta2_closed_form(co.a, co.c, co.B, 1e-3),
    }


def _explicit_errors(loss, params, x, y, v_unsharded):
    """On an Explicit mesh: the messages of the documented ``ValueError``s."""
    import jax

    import curvlib
    from curvlib import landscape

    out = {}
    hv = curvlib.hessian_matvec(loss, params, x, y)
    try:  # a tangent without the params' sharding type
        hv(v_unsharded)
        out["tangent_type_error"] = ""
    except ValueError as e:
        out["tangent_type_error"] = str(e)
    try:  # 64 samples split 8 ways cannot be cut into chunks of 12
        curvlib.hessian_matvec(
            lambda p, batch: loss(p, *batch), params, (x, y), microbatch_size=12
        )(params)
        out["microbatch_error"] = ""
    except ValueError as e:
        out["microbatch_error"] = str(e)
    try:  # the ravelled eigensolver cannot ravel explicitly sharded params
        landscape.curvature_subspace(
            lambda p, batch: loss(p, *batch), params, (x, y), 40, 3,
            key=jax.random.PRNGKey(0), flatten=True,
        )
        out["flatten_error"] = ""
    except ValueError as e:
        out["flatten_error"] = str(e)
    return out


def _explicit_slices(x_sharded, x):
    """On an Explicit mesh: sample slices of the batch (64 samples split 8 ways).

    ``landscape._common.take`` keeps a slice split when its length splits evenly
    and otherwise gathers the smallest evenly-splitting window (which, for a
    slice near the end, starts before it).
    """
    import jax
    import numpy as np

    from curvlib.landscape import _common

    out = {}
    for start, stop in ((0, 40), (0, 41), (40, 41), (59, 62)):
        got = _common.take(x_sharded, start, stop)
        out[f"{start}:{stop}"] = {
            "err": float(np.max(np.abs(np.asarray(got) - np.asarray(x)[start:stop]))),
            "type": jax.typeof(got).str_short(),
        }
    return {"explicit_take": out}


def _compare(ref, got):
    import jax
    import numpy as np

    errs = []
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        r = np.asarray(r, np.float64)
        g = np.asarray(g, np.float64)
        errs.append(float(np.max(np.abs(r - g)) / max(float(np.max(np.abs(r))), 1e-300)))
    return max(errs)


def _layout(tree, param_specs, basis):
    """Record each leaf's spec and whether it matches the parameter layout and is split."""
    import jax
    from jax.sharding import PartitionSpec as P

    recs = []
    for leaf, want in zip(jax.tree.leaves(tree), param_specs, strict=True):
        spec = tuple(leaf.sharding.spec)
        want = tuple(P(None, *want)) if basis else tuple(want)
        # trailing Nones are equivalent
        trim = lambda s: tuple(s[: max([i + 1 for i, a in enumerate(s) if a is not None] or [0])])
        shard_elems = max(int(np.prod(s.data.shape)) for s in leaf.addressable_shards)
        recs.append(
            {
                "spec": str(leaf.sharding.spec),
                "matches": trim(spec) == trim(want),
                "max_shard_fraction": shard_elems / max(1, leaf.size),
            }
        )
    return recs



def main(path):
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    params, x, y, model, out_loss, loss, v0, b = _setup()
    ref = _computations(params, x, y, model, out_loss, loss, v0, b)
    ref = jax.tree.map(np.asarray, ref)

    mesh1 = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    mesh2 = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    mesh_x = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    fsdp_specs = {"w1": P(None, "data"), "b1": P("data"), "w2": P("data")}
    layouts = {
        # batch split over all devices, parameters replicated
        # (replicated leaves annotated per leaf, as flax's partitioning writes them)
        "data_parallel": (mesh1, P("data"), {"w1": P(None, None), "b1": P(None), "w2": P()}),
        # FSDP: batch and parameters split over the same axis
        "fsdp": (mesh1, P("data"), fsdp_specs),
        # 2-D: batch over "data", parameters over "model"
        "data_x_model": (
            mesh2, P("data"), {"w1": P(None, "model"), "b1": P("model"), "w2": P("model")}
        ),
        # FSDP on an Explicit mesh: sharding is part of every array's type
        "fsdp_explicit": (mesh_x, P("data"), fsdp_specs),
    }
    result = {"devices": jax.device_count(), "layouts": {}}
    for name, (mesh, batch_spec, pspecs) in layouts.items():
        put = lambda t, mesh=mesh, pspecs=pspecs: jax.device_put(
            t, {k: NamedSharding(mesh, s) for k, s in pspecs.items()}
        )
        sp, sv0, sb = put(params), put(v0), put(b)
        sx = jax.device_put(x, NamedSharding(mesh, batch_spec))
        sy = jax.device_put(y, NamedSharding(mesh, batch_spec))
        if AxisType.Explicit in mesh.axis_types:
            # explicit FSDP as JAX writes it: the model all-gathers each weight before
            # use (batch and weight sharded over one axis is otherwise a type error), and
            # everything runs under ``jax.set_mesh``
            rep = NamedSharding(mesh, P())
            gather = lambda p, rep=rep: jax.tree.map(lambda w: jax.sharding.reshard(w, rep), p)
            xmodel = lambda p, x, gather=gather: model(gather(p), x)
            xloss = lambda p, x, y, xmodel=xmodel: out_loss(xmodel(p, x), y)
            with jax.set_mesh(mesh):
                got = _computations(sp, sx, sy, xmodel, out_loss, xloss, sv0, sb)
                got.update(_explicit_errors(xloss, sp, sx, sy, v0))
                got.update(_explicit_slices(sx, x))
        else:
            got = _computations(sp, sx, sy, model, out_loss, loss, sv0, sb)
        param_specs = [pspecs[k] for k in sorted(pspecs)]
        recs = {}
        for key, val in got.items():
            rec = {}
            if key in ("eigsh_vectors", "landscape_eigenvectors", "eager_eigsh_vectors"):
                # compare up to sign, per eigenvector
                signs = np.sign(
                    sum(
                        (np.asarray(a) * np.asarray(r)).reshape(np.shape(a)[0], -1)
                        .sum(axis=1)
                        for a, r in zip(jax.tree.leaves(val), jax.tree.leaves(ref[key]),
                                        strict=True)
                    )
                )
                aligned = jax.tree.map(
                    lambda a, s=signs: np.asarray(a) * s.reshape((-1,) + (1,) * (a.ndim - 1)),
                    val,
                )
                rec["err"] = _compare(ref[key], aligned)
            elif key.endswith(("converged", "accepted")):
                rec["value"] = bool(val)
            elif key.endswith("_error"):
                rec["message"] = val
            elif key.startswith("explicit_"):
                rec["value"] = val
            else:
                rec["err"] = _compare(ref[key], val)
            if isinstance(val, dict) and not key.startswith("explicit_"):
                rec["layout"] = _layout(
                    val, param_specs,
                    basis=key in ("eigsh_vectors", "lanczos_basis", "landscape_eigenvectors",
                                  "eager_eigsh_vectors", "stream_matmat"),
                )
            recs[key] = rec
        result["layouts"][name] = recs
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
