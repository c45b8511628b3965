"""Two processes joined by ``jax.distributed`` give the one-process answer; a dead one is named.

``tests/_multiprocess_worker.py`` runs the same code three times at once: as two
processes with 4 CPU devices each, joined by ``jax.distributed.initialize``
(gloo collectives, a coordinator on a free local port), and as one reference
process with one CPU device (each family once: the layouts place the same numbers).
The 8-device mesh of the two processes spans both, in two
layouts: ``data_parallel`` (batch over all 8 devices, parameters replicated) and
``param_sharded`` (parameters split by rows over the same 8 devices, so each
process holds half of each). The computations are those of
``tests/_sharding_worker.py`` and ``tests/_kfac_sharding_worker.py`` (operators,
``eigsh``, ``lanczos``, ``cg``, Hutchinson, SLQ, ``newton_cg``, ``kfac``, the
Delta2(D) pipeline) and more (Fisher and empirical Fisher, ``block_eigsh``,
``inverse_matvec``, ``track_curvature``, eager ``eigsh`` with compile-behind on,
per-process streams). Each process reads every result back whole and writes JSON;
here we assert agreement to ``1e-12`` in float64.

The suite's default profile (``quick``) runs each family once, some on one layout
and some on the other (the split is ``PROFILES`` in the worker), to keep the harness
within two minutes on two CPU cores: every program is compiled by all three
processes, so they compile at XLA's lowest backend optimisation level (the harness
checks agreement, not speed; the reference compiles the same way).
``CURVLIB_MULTIPROCESS=full`` runs every family on both layouts.

The dead-process test starts two processes of which one exits before the first
collective of a jitted ``eigsh``; the survivor must stop with an error that names the
dead task within the heartbeat timeout given to ``jax.distributed.initialize``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-12
# a hang never blocks the suite: every process is killed after this long
TIMEOUT_S = 900
# no worker wrote a line (one per family, the slowest about 25 s) for this long: stuck
STALL_S = 240
PROFILE = os.environ.get("CURVLIB_MULTIPROCESS", "quick")
# compile time is most of the harness's time: the backend's cheapest setting
# (tests/conftest.py's choice: the emitter flag only where the installed XLA has it)
XLA_FLAGS = os.environ.get("CURVLIB_TEST_XLA_FLAGS",
                           "--xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path, mode: str, ranks) -> list[subprocess.Popen]:
    """Start ``(process_id, num_processes, local devices)`` workers on one fresh port."""
    port = _free_port()
    procs = []
    for pid, num, devices in ranks:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" {XLA_FLAGS}"
                            + f" --xla_force_host_platform_device_count={devices}").strip()
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        out = out_dir / f"process_{pid}_of_{num}.json"
        # output to files, not pipes: a full pipe would stall a worker and then its peer
        log = open(out.with_suffix(".log"), "w")  # closed in _wait
        p = subprocess.Popen(
            [sys.executable, str(WORKER), str(out), str(pid), str(num), str(port), mode],
            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        p.log = log
        procs.append(p)
    return procs


def _wait(procs, timeout: float, stall: float | None = None):
    """``[(returncode, output, seconds)]`` and whether the run stalled.

    Every process still running at ``timeout`` is killed; with ``stall``, so is every one when
    none of them has written a line for ``stall`` seconds (the workers print one per family).
    """
    start, ended, stalled = time.monotonic(), {}, False
    logs = [Path(p.log.name) for p in procs]
    seen, last = None, start
    while len(ended) < len(procs):
        now = time.monotonic()
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = now - start
        sizes = [log.stat().st_size for log in logs]
        if sizes != seen:
            seen, last = sizes, now
        stuck = stall is not None and now - last > stall
        if len(ended) < len(procs) and (now - start > timeout or stuck):
            stalled = stuck
            for i, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    p.wait()
                    ended[i] = now - start
            break
        time.sleep(0.5)
    done = []
    for i, p in enumerate(procs):
        p.log.close()
        done.append((p.returncode, Path(p.log.name).read_text(), ended[i]))
    return done, stalled


def _tail(err: str, n: int = 4000) -> str:
    lines = [ln for ln in err.splitlines() if not ln.startswith(("I1", "[Gloo]"))]
    return "\n".join(lines)[-n:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    start = time.monotonic()
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp("multiprocess")
        procs = (_launch(out, PROFILE, [(0, 2, 4), (1, 2, 4)])
                 + _launch(out, PROFILE, [(0, 1, 1)]))
        done, stalled = _wait(procs, TIMEOUT_S, STALL_S)
        if not stalled:
            break
        # XLA:CPU's gloo collectives can deadlock two processes on an overloaded host (both
        # inside one all-reduce, one device's launch waiting on the client's semaphore): a
        # runtime fault, not curvlib's; the run is repeated once, and said so
        print(f"multi-process harness: no output for {STALL_S} s (attempt {attempt}); "
              "the processes were stopped" + ("; rerunning" if attempt == 1 else ""))
    seconds = time.monotonic() - start
    if any(rc != 0 for rc, _, _ in done):
        pytest.fail("multi-process workers failed:\n" + "\n".join(
            f"--- {name}: exit {rc} after {t:.0f} s\n{_tail(err)}" for name, (rc, err, t) in
            zip(("process 0 of 2", "process 1 of 2", "reference"), done, strict=True)))
    read = lambda name: json.loads((out / name).read_text())
    print(f"multi-process harness ({PROFILE}): {seconds:.0f} s")
    return {"reference": read("process_0_of_1.json"), "seconds": seconds,
            "processes": [read("process_0_of_2.json"), read("process_1_of_2.json")]}


def _err(ref, got) -> float:
    """The largest relative difference over the leaves (booleans and counts: exact)."""
    worst = 0.0
    for r, g in zip(ref, got, strict=True):
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        assert r.shape == g.shape, (r.shape, g.shape)
        scale = max(float(np.max(np.abs(r), initial=0.0)), 1e-300)
        worst = max(worst, float(np.max(np.abs(r - g), initial=0.0)) / scale)
    return worst


def _aligned(ref, got):
    """``got``'s stacked eigenvectors (leading axis k) flipped to ``ref``'s signs."""
    dots = sum(np.sum(np.asarray(r) * np.asarray(g), axis=tuple(range(1, np.ndim(r))))
               for r, g in zip(ref, got, strict=True))
    sign = np.where(dots < 0, -1.0, 1.0)
    return [np.asarray(g) * sign.reshape((-1,) + (1,) * (np.ndim(g) - 1)) for g in got]


def _diff(ref, got, name: str) -> float:
    """`_err`, eigenvectors compared up to their signs."""
    return _err(ref, _aligned(ref, got) if "vectors" in name else got)


def test_each_process_saw_four_of_eight_devices(runs):
    assert runs["reference"]["process_count"] == 1 and runs["reference"]["devices"] == 1
    for i, rec in enumerate(runs["processes"]):
        assert (rec["process_index"], rec["process_count"], rec["devices"]) == (i, 2, 8)
    for rec in [runs["reference"], *runs["processes"]]:  # this checkout's curvlib
        assert Path(rec["curvlib"]).resolve().is_relative_to(ROOT), rec["curvlib"]


@pytest.mark.parametrize("layout", ("data_parallel", "param_sharded"))
def test_two_processes_equal_one(runs, layout):
    """Every result, read back by each process, equals the one-device, one-process run."""
    ref = runs["reference"]["layouts"][layout]
    assert len(ref) > 20, sorted(ref)
    for rec in runs["processes"]:
        got = rec["layouts"][layout]
        assert set(got) - {"stream_lengths_error"} == set(ref)
        bad = {k: e for k in ref if (e := _diff(ref[k], got[k], k)) >= TOL}
        assert not bad, (layout, rec["process_index"], bad)


def test_every_process_reads_the_same_results(runs):
    a, b = (rec["layouts"] for rec in runs["processes"])
    assert a == b


def test_eager_eigsh_compile_behind_agrees_across_processes(runs):
    """Eager ``eigsh`` on global arrays: in front, then two calls with compile-behind on. In
    one process the first of those answers through the host-driven path; in two, compile-behind
    is off (every process runs the same program), so the answers are the same bits."""
    for rec in [runs["reference"], *runs["processes"]]:
        layouts = [r for r in rec["layouts"].values() if "eager_eigsh_values_0_0" in r]
        assert layouts
        for r in layouts:
            for i in range(2):
                for what in ("values", "vectors"):
                    ref, got = r[f"eager_eigsh_{what}_0_0"], r[f"eager_eigsh_{what}_1_{i}"]
                    err = _diff(ref, got, what)
                    assert err < TOL, (rec["process_count"], what, i, err)
                    if rec["process_count"] > 1:
                        assert ref == got


def test_per_process_streams_equal_the_in_memory_operator(runs):
    """``process_local=True``: each process streams its own rows; products and gradients
    equal the in-memory ones over the whole dataset, even and ragged."""
    for rec in [runs["reference"], *runs["processes"]]:
        r = next(r for r in rec["layouts"].values() if "stream_even_hvp" in r)
        for case in ("even", "ragged"):
            assert _err(r["stream_inmemory_hvp"], r[f"stream_{case}_hvp"]) < TOL, case
            assert _err(r["stream_inmemory_grad"], r[f"stream_{case}_grad"]) < TOL, case
            assert r[f"stream_{case}_examples"] == [[64, 3]], case
    for rec in runs["processes"]:
        r = next(r for r in rec["layouts"].values() if "stream_even_hvp" in r)
        msg = r["stream_lengths_error"]
        assert "different lengths" in msg and "process(es) [1] ended after 2 batches" in msg, msg


def test_a_dead_process_stops_the_others_within_the_heartbeat(tmp_path):
    """After a jitted ``eigsh`` on both, process 1 exits; process 0, waiting inside the same
    program's collectives, exits non-zero within the heartbeat timeout, naming a dead task."""
    sys.path.insert(0, str(WORKER.parent))
    from _multiprocess_worker import HEARTBEAT_S

    launched = time.time()
    ((rc0, err0, t0), (rc1, err1, _)), _ = _wait(
        _launch(tmp_path, "die", [(0, 2, 4), (1, 2, 4)]), TIMEOUT_S)
    assert rc1 == 3, _tail(err1)
    assert rc0 != 0 and "solved without its peer" not in err0, _tail(err0)
    exited = float(err1.split("process 1: exiting at ")[1].split()[0])
    waited = launched + t0 - exited
    print(f"process 0 stopped {waited:.1f} s after process 1 exited "
          f"(heartbeat timeout {HEARTBEAT_S} s)")
    # the runtime's heartbeat bound, plus its polling and the process teardown
    assert waited < 2 * HEARTBEAT_S + 10, (waited, _tail(err0))
    assert "another task died" in err0, _tail(err0)
