"""K-FAC on 8 host devices: the single-device answer, the parameters' layout, one trace.

The pytest process has one CPU device, so ``tests/_kfac_sharding_worker.py`` runs
in a fresh process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
for three ``Auto``-mesh layouts (data-parallel, FSDP over the same axis as the
batch, a ``(2, 4)`` data x model mesh). It computes ``kfac_curvature``'s factors
and products and three jitted ``kfac`` steps (Monte Carlo statistics, adaptive
step and damping, refreshes every 2 steps) and compares them with one device.
Asserted here: agreement to float64 round-off; products and updates keep the
parameters' ``PartitionSpec`` (each device holds 1/8 or 1/4 of a split
parameter); the factors are placed as the parameters are (split by rows where
the weight's input or output axis is split and the size divides) and stay put,
so the second jitted step does not retrace; and that placement lives in the state:
a second ``init`` on the same transform, or a transform rebuilt without ``init``, steps
the sharded state with its layout kept and one trace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_kfac_sharding_worker.py")
LAYOUTS = ("data_parallel", "fsdp", "data_x_model")
SPLIT = {"data_parallel": 1.0, "fsdp": 1 / 8, "data_x_model": 1 / 4}
VALUES = ("factors", "matvec", "inverse_exact", "inverse_factored", "update", "params_after",
          "state_factors")
VECTORS = ("matvec", "inverse_exact", "inverse_factored", "update", "params_after")
# factor order: A(w1 with bias: 9 x 9), A(w2: 16 x 16), G(w1: 16 x 16), G(w2: 8 x 8)
FACTOR_LAYOUT = {
    "data_parallel": ["()", "()", "()", "()"],
    "fsdp": ["()", "('data',)", "('data',)", "()"],  # 9 rows do not split 8 ways
    "data_x_model": ["()", "('model',)", "('model',)", "()"],
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfac_sharding") / "report.json"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                        ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def test_worker_saw_eight_devices(report):
    assert report["devices"] == 8 and set(report["layouts"]) == set(LAYOUTS)
    assert report["reference"]["traces"] == 1 and not report["reference"]["skipped"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_equals_single_device(report, layout):
    recs = report["layouts"][layout]
    for name in VALUES:
        assert recs[name]["err"] < 1e-12, (layout, name, recs[name])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_products_and_updates_keep_the_parameter_layout(report, layout):
    recs = report["layouts"][layout]
    for name in VECTORS:
        for leaf in recs[name]["layout"]:
            assert leaf["matches"], (layout, name, leaf)
            assert leaf["max_shard_fraction"] == pytest.approx(SPLIT[layout]), (layout, name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_factors_placed_as_the_parameters_and_no_retrace(report, layout):
    meta = report["layouts"][layout]["meta"]
    assert meta["factor_layout_init"] == FACTOR_LAYOUT[layout]
    assert meta["factor_layout_after"] == FACTOR_LAYOUT[layout]
    assert meta["traces"] == 1 and not meta["skipped"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_placement_lives_in_the_state_not_in_the_transform(report, layout):
    """A second ``init`` on the same transform, or a transform rebuilt without ``init``,
    steps a sharded state with its placement: the layout kept, one trace."""
    shared = report["layouts"][layout]["meta"]["shared_transform"]
    for name in ("same", "rebuilt"):
        assert shared[name]["factor_layout_after"] == FACTOR_LAYOUT[layout], (layout, name)
        assert shared[name]["traces"] == 1, (layout, name)
