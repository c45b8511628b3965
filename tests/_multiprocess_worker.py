"""Multi-process checks run by ``tests/test_multiprocess.py``.

``python tests/_multiprocess_worker.py OUT.json PROCESS_ID NUM_PROCESSES PORT [MODE]``.
With ``NUM_PROCESSES=1`` this is the reference: one process with one CPU device,
which computes each family once (the layouts only place the same numbers, so one
unsharded answer is the reference for both). With ``NUM_PROCESSES=2``
each process has 4 CPU devices and joins the others through
``jax.distributed.initialize`` (gloo collectives), so the same 8-device meshes span
the processes. Every process runs the same code on global arrays
(``jax.make_array_from_callback``), reads each result back whole
(``multihost_utils.process_allgather``) and writes it to its own JSON file; the
test compares the files. ``MODE=die`` runs a jitted ``eigsh`` whose process 1
exits before its first collective (the dead-process test). Nothing runs on import
(pytest's doctest collection imports this module).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the runtime's own bound on a silent peer (`jax.distributed.initialize`); the dead-process
# test asserts that the survivor stops within it
HEARTBEAT_S = 10


def _start(process_id: int, num_processes: int, port: int):
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
            process_id=process_id, initialization_timeout=60,
            heartbeat_timeout_seconds=HEARTBEAT_S, shutdown_timeout_seconds=30,
        )
    # every process brings the same number of local devices (the test's XLA_FLAGS)
    assert jax.device_count() == num_processes * jax.local_device_count(), jax.devices()


def _global(tree, shardings):
    """Host values (the same on every process) as global arrays placed by ``shardings``."""
    import jax

    def put(a, s):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])

    return jax.tree.map(put, tree, shardings)


def _host(tree):
    """Every array leaf of ``tree`` read back whole on this process (a collective)."""
    import jax
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    arrays = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    got = multihost_utils.process_allgather([leaves[i] for i in arrays], tiled=True)
    for i, g in zip(arrays, got, strict=True):
        leaves[i] = g
    return jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])


def _json(tree):
    import jax

    return [x.tolist() for x in jax.tree.leaves(_host(tree))]


def _fisher(params, x, y, model, out_loss, loss, v0):
    """Fisher (closed form and Monte Carlo) and empirical Fisher products, jitted and eager."""
    import jax

    import curvlib

    key = jax.random.PRNGKey(2)
    fi = curvlib.fisher_matvec(model, params, x, likelihood="gaussian")
    fi_mc = curvlib.fisher_matvec(model, params, x, likelihood="gaussian", key=key)
    ef = curvlib.empirical_fisher_matvec(
        lambda p, batch: 0.5 * jax.numpy.sum((model(p, batch[0]) - batch[1]) ** 2, axis=-1),
        params, (x, y))
    apply = jax.jit(lambda mv, v: mv(v))
    return {"fisher": apply(fi, v0), "fisher_mc": apply(fi_mc, v0),
            "empirical_fisher": apply(ef, v0), "empirical_fisher_eager": ef(v0)}


def _blocks_and_inverse(hv, params, b):
    """``block_eigsh`` (eager, one spectrum per leaf) and a jitted ``inverse_matvec``."""
    import jax

    import curvlib

    blocks = curvlib.block_eigsh(hv, params, 1, key=jax.random.PRNGKey(3), basis_size=6,
                                 max_restarts=30)
    inv = curvlib.inverse_matvec(hv, damping=1.0, cg=curvlib.CG(rtol=1e-12))
    return {"block_eigsh": {k: r.eigenvalues for k, r in blocks.items()},
            "inverse_matvec": jax.jit(lambda op, b: op(b))(inv, b)}


def _track(params, x, y, loss):
    """Two jitted steps of ``track_curvature`` chained with SGD."""
    import jax
    import optax

    import curvlib

    # every=2: the first step measures, the second only carries the state
    tx = optax.chain(curvlib.track_curvature(every=2, k=2, key=jax.random.PRNGKey(4),
                                             num_probes=2, trace_method="hutchinson"),
                     optax.sgd(0.1))

    @jax.jit
    def step(p, s, x, y):
        u, s = tx.update(jax.grad(loss)(p, x, y), s, p, value_fn=loss, x=x, y=y)
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for _ in range(2):
        p, s = step(p, s, x, y)
    info = curvlib.curvature_info(s)
    return {"track_params": p, "track_eigenvalues": info.eigenvalues, "track_trace": info.trace}


def _eager(hv, v0):
    """Eager ``eigsh`` on global arrays, compiled in front, then two calls compile-behind."""
    import curvlib

    out = {}
    was = curvlib.compile_behind()
    try:
        for behind in (False, True):
            curvlib.compile_behind(behind)
            for i in range(2 if behind else 1):
                e = curvlib.eigsh(hv, v0, 2, basis_size=10, max_restarts=30)
                out[f"eager_eigsh_values_{int(behind)}_{i}"] = e.eigenvalues
                out[f"eager_eigsh_vectors_{int(behind)}_{i}"] = e.eigenvectors
    finally:
        curvlib.compile_behind(was)
    return out


def _local_batches(x, y, split: int):
    """This process's batches from its part of ``(x, y)`` (host arrays): global batches of 24.

    ``split`` rows go to process 0 and the rest to process 1, each streamed 12 rows
    at a time, so with ``split != len(x) / 2`` the last batch differs in size across
    the processes. One process streams all the rows 24 at a time: the same global
    batches.
    """
    import jax

    rows = 24 // jax.process_count()
    if jax.process_count() > 1:
        lo, hi = (0, split) if jax.process_index() == 0 else (split, len(x))
        x, y = x[lo:hi], y[lo:hi]
    return lambda: ((x[i:i + rows], y[i:i + rows]) for i in range(0, len(x), rows))


def _streams(params, x, y, loss, v0, batch_sharding, host_xy):
    """Per-process streams (``process_local=True``) against the in-memory operators.

    ``even``: 32 rows per process in batches of 12 (12 + 12 + 8 each: the global
    batches 24, 24, 16 split over the 8 devices). ``ragged``: 34 and 30 rows, so the
    last batch has 10 rows on one process and 6 on the other (gathered, replicated).
    ``lengths``: the second process yields one batch fewer, which must raise on both.
    """
    import jax

    import curvlib

    loss_b = lambda p, b: loss(p, *b)
    build = lambda p, b: curvlib.hessian_matvec(loss_b, p, b)
    hv = curvlib.hessian_matvec(loss, params, x, y)(v0)
    grad = jax.jit(jax.grad(loss))(params, x, y)
    out = {"stream_inmemory_hvp": hv, "stream_inmemory_grad": grad}
    for name, split in (("even", 32), ("ragged", 34)):
        batches = _local_batches(*host_xy, split)
        H = curvlib.stream_matvec(build, params, batches, sharding=batch_sharding,
                                  process_local=True)
        out[f"stream_{name}_hvp"] = H(v0)
        out[f"stream_{name}_grad"] = curvlib.stream_gradient(
            loss_b, params, batches, sharding=batch_sharding, process_local=True)[1]
        out[f"stream_{name}_examples"] = np.asarray([H.num_examples, H.num_batches])
    if jax.process_count() > 1:
        xs, ys = host_xy
        count = 3 if jax.process_index() == 0 else 2
        short = lambda: ((xs[8 * i:8 * i + 8], ys[8 * i:8 * i + 8]) for i in range(count))
        try:
            curvlib.stream_mean(lambda b, p: loss_b(p, b), short, params,
                                sharding=batch_sharding, process_local=True)
            out["stream_lengths_error"] = ""
        except ValueError as err:
            out["stream_lengths_error"] = str(err)
    return out


def _layouts(mesh):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rep = {"w1": P(), "b1": P(), "w2": P()}
    fsdp = {"w1": P(None, "data"), "b1": P("data"), "w2": P("data")}
    named = lambda specs: {k: NamedSharding(mesh, s) for k, s in specs.items()}
    return {
        # batch split over all 8 devices (both processes), parameters replicated
        "data_parallel": (NamedSharding(mesh, P("data")), named(rep)),
        # parameters split by rows over the same 8 devices: half of each on each process
        "param_sharded": (NamedSharding(mesh, P("data")), named(fsdp)),
    }


def _groups(params, x, y, model, out_loss, loss, v0, b, batch_sharding, host_xy):
    """``{group: thunk}``; each thunk computes one family of results (a dict)."""
    import _kfac_sharding_worker
    import _sharding_worker as S

    hv, gv = S._operators(params, x, y, model, out_loss, loss)
    return {
        "products": lambda: {**S._products(params, x, y, model, out_loss, loss, v0),
                             **_fisher(params, x, y, model, out_loss, loss, v0)},
        "solvers": lambda: S._solvers(hv, gv, v0, b),
        "stochastic": lambda: S._stochastic(hv, v0),
        "newton_cg": lambda: S._newton_cg(params, x, y, loss),
        "kfac": lambda: {f"kfac_{k}": v for k, v in
                         _kfac_sharding_worker._run(params, x, y, model, loss)[0].items()},
        "blocks_inverse": lambda: _blocks_and_inverse(hv, params, b),
        "track": lambda: _track(params, x, y, loss),
        "landscape": lambda: S._landscape(params, x, y, loss),
        "eager": lambda: _eager(hv, v0),
        "streams": lambda: _streams(params, x, y, loss, v0, batch_sharding, host_xy),
    }


# which groups run on which layout: "full" is everything on both layouts; "quick" (the
# suite's default) splits the groups between the layouts to stay within its time budget
PROFILES = {
    "full": {"data_parallel": None, "param_sharded": None},
    "quick": {
        "data_parallel": ("products", "eager", "stochastic", "kfac", "track", "landscape",
                          "streams"),
        "param_sharded": ("products", "solvers", "newton_cg", "blocks_inverse"),
    },
}


def run(path: str, profile: str) -> None:
    """Every family of ``profile`` on each layout; the one-process reference computes each
    family once (on its one device) and files it under every layout that runs it."""
    import _sharding_worker
    import jax

    params, x, y, model, out_loss, loss, v0, b = _sharding_worker._setup()
    host = jax.tree.map(np.asarray, (params, x, y, v0, b))
    reference = jax.process_count() == 1
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    import curvlib

    result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "devices": jax.device_count(), "curvlib": curvlib.__file__, "layouts": {},
              "seconds": {}}
    done = {}  # the reference's families, computed once
    for name, (bsh, psh) in _layouts(mesh).items():
        sp, sv0, sb = (_global(t, psh) for t in (host[0], host[3], host[4]))
        sx, sy = _global(host[1], bsh), _global(host[2], bsh)
        groups = _groups(sp, sx, sy, model, out_loss, loss, sv0, sb, bsh, host[1:3])
        chosen = PROFILES[profile][name]
        chosen = tuple(groups) if chosen is None else chosen
        recs = result["layouts"][name] = {}
        for group in chosen:
            if group in done:
                recs.update(done[group])
                continue
            t0 = time.perf_counter()
            got = groups[group]()
            got = {k: v if isinstance(v, str) else _json(v) for k, v in got.items()}
            recs.update(got)
            if reference:
                done[group] = got
            result["seconds"][f"{name}/{group}"] = dt = time.perf_counter() - t0
            print(f"process {jax.process_index()}: {name}/{group} {dt:.1f} s",
                  file=sys.stderr, flush=True)
    result["cpu_seconds"] = time.process_time()
    Path(path).write_text(json.dumps(result))


def die() -> None:
    """Both processes run a jitted ``eigsh`` once; then process 1 exits and process 0 runs
    it again, so it waits inside that program's first collective for a peer that is gone."""
    import _sharding_worker
    import jax

    import curvlib

    params, x, y, model, out_loss, loss, v0, b = _sharding_worker._setup()
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    bsh, psh = _layouts(mesh)["data_parallel"]
    sp, sv0 = _global(params, psh), _global(v0, psh)
    sx, sy = _global(x, bsh), _global(y, bsh)
    hv = curvlib.hessian_matvec(loss, sp, sx, sy)
    eig = jax.jit(lambda mv, v: curvlib.eigsh(mv, v, 3, basis_size=20, max_restarts=50))
    jax.block_until_ready(eig(hv, sv0))
    if jax.process_index() == 1:
        print(f"process 1: exiting at {time.time():.3f}", file=sys.stderr, flush=True)
        os._exit(3)
    print(f"process 0: solving at {time.time():.3f}", file=sys.stderr, flush=True)
    jax.block_until_ready(eig(hv, sv0))
    print("process 0: solved without its peer", file=sys.stderr, flush=True)


def main(argv) -> None:
    path, process_id, num_processes, port = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    mode = argv[4] if len(argv) > 4 else "quick"
    _start(process_id, num_processes, port)
    if mode == "die":
        die()
    else:
        run(path, mode)


if __name__ == "__main__":
    main(sys.argv[1:])
