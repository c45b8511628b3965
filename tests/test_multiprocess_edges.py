"""Per-process streams across two ``jax.distributed`` processes: the edges of ``process_local``.

Launched as ``tests/test_multiprocess.py`` launches its workers (its ``_launch`` and
``_wait``; this file is the worker: ``python tests/test_multiprocess_edges.py OUT.json
PROCESS_ID NUM_PROCESSES PORT``): two processes of 2 CPU devices each, a 4-device mesh
over both. Each process streams its own rows (``process_local=True``) and writes what it
got; the oracle is the in-memory gradient of the whole data set, computed by each process
on its own host copy.

* A leaf placed replicated (labels ``P()`` beside inputs split over ``data``): the
  processes' rows are gathered and placed, as in one process (JAX's
  ``make_array_from_process_local_data`` refused the process's half as a replicated
  leaf's "host data").
* Parts of one batch that differ across processes in a leaf's shape past the sample axis
  or in dtype: a ``ValueError`` on every process. (A width of 4 on one process and 5 on
  the other raised a ``TypeError`` on one process and left the other waiting forever in
  the product's collectives; a float32 part beside a float64 one was accepted.)
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

# a hang is a failure, not a stuck suite: every process is killed after this long
TIMEOUT_S = 60


def _data():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(5, 3)) / 2, "b": 0.1 * rng.normal(size=(3,))}
    x, y = rng.normal(size=(32, 5)), rng.normal(size=(32, 3))
    return params, x, y


def _loss(p, x, y):
    import jax.numpy as jnp

    return 0.5 * jnp.mean(jnp.sum((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2, axis=-1))


def _worker(path: str, process_id: int, num_processes: int, port: int, mode: str) -> None:
    """Each process: its 16 rows in batches of 8; ``mode`` ``replicated``: the stream's
    gradient with labels placed ``P()``; ``differing``: the refusals."""
    from _multiprocess_worker import _start

    _start(process_id, num_processes, port)
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import curvlib

    params, x, y = _data()
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    split, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    gp = {k: jax.make_array_from_callback(a.shape, rep, lambda i, a=a: a[i])
          for k, a in params.items()}
    me = jax.process_index()
    xs, ys = x[16 * me:16 * me + 16], y[16 * me:16 * me + 16]
    loss_b = lambda p, b: _loss(p, *b)
    out = {"oracle": jax.tree.map(lambda g: np.asarray(g).tolist(),
                                  jax.grad(_loss)(params, x, y))}

    if mode == "replicated":
        own = lambda: ((xs[i:i + 8], ys[i:i + 8]) for i in range(0, 16, 8))
        g = curvlib.stream_gradient(loss_b, gp, own, sharding=(split, rep),
                                    process_local=True)[1]
        out["replicated_labels"] = jax.tree.map(lambda a: np.asarray(a).tolist(), g)
        Path(path).write_text(json.dumps(out))
        return

    def differing(change):
        def batches():
            for i in range(0, 16, 8):
                xb = xs[i:i + 8]
                yield (change(xb) if me == 1 and i == 8 else xb), ys[i:i + 8]
        return batches

    for name, change in (("width", lambda xb: xb[:, :4]),
                         ("dtype", lambda xb: xb.astype(np.float32))):
        try:
            curvlib.stream_gradient(loss_b, gp, differing(change), sharding=split,
                                    process_local=True)
            out[name] = ""
        except Exception as err:  # noqa: BLE001  (the test reads the type and the message)
            out[name] = f"{type(err).__name__}: {err}"
    multihost_utils.sync_global_devices("done")  # both processes got here: no one waits
    Path(path).write_text(json.dumps(out))


def _run(tmp_path, mode: str) -> list[dict]:
    """Two processes of this file's `_worker` in ``mode`` (launched by
    ``tests/test_multiprocess.py``'s helpers); each one's JSON."""
    import test_multiprocess as tm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tm, "WORKER", HERE)
        procs = tm._launch(tmp_path, mode, [(0, 2, 2), (1, 2, 2)])
    done, _ = tm._wait(procs, TIMEOUT_S)
    if any(rc != 0 for rc, _, _ in done):
        pytest.fail("multi-process workers failed:\n" + "\n".join(
            f"--- process {i} of 2: exit {rc} after {t:.0f} s\n{tm._tail(err)}"
            for i, (rc, err, t) in enumerate(done)))
    return [json.loads((tmp_path / f"process_{i}_of_2.json").read_text()) for i in range(2)]


def test_a_replicated_leaf_of_per_process_streams_is_gathered(tmp_path):
    """Labels placed ``P()`` beside inputs split over the mesh: the union of the processes'
    rows, as in one process (the in-memory gradient of all 32 rows, to 1e-12)."""
    for rec in _run(tmp_path, "replicated"):
        for k in ("w", "b"):
            ref, got = np.asarray(rec["oracle"][k]), np.asarray(rec["replicated_labels"][k])
            assert np.max(np.abs(got - ref)) <= 1e-12 * np.max(np.abs(ref)), (k, got, ref)


def test_batch_parts_that_differ_across_processes_are_refused_on_every_process(tmp_path):
    """Process 1's second batch is 4 wide (or float32) against process 0's 5 (float64): the
    same ``ValueError`` on both processes, naming the batch and the process, and both go on
    (a collective after it is met by both)."""
    for rec, what in itertools.product(_run(tmp_path, "differing"), ("width", "dtype")):
        msg = rec[what]
        assert msg.startswith("ValueError: batch 1 of the stream differs across processes: "
                              "process(es) [1]"), msg
        assert "process_local=True" in msg, msg


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
