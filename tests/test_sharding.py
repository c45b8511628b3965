"""Multi-device runs give the single-device answer and keep their shardings.

The pytest process has one CPU device, so the work runs once, in a fresh
process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(``tests/_sharding_worker.py``), for three layouts on ``Auto`` meshes and one on
an ``Explicit`` mesh:

* ``data_parallel``: batch split 8 ways, parameters replicated;
* ``fsdp``: batch *and* parameters split 8 ways over the same axis;
* ``data_x_model``: a ``(2, 4)`` mesh, batch over ``data``, parameters over ``model``;
* ``fsdp_explicit``: ``fsdp`` on a mesh with ``AxisType.Explicit`` axes, run under
  ``jax.set_mesh`` with a model that all-gathers each weight (``reshard`` to
  ``P()``) before use, as explicit-mode FSDP is written.

For each layout the worker computes Hessian products (linearize, fwd-rev,
microbatched, eager and jitted), GGN products, ``eigsh``, ``lanczos``, a damped
``cg`` solve, the randomised estimators (``hutchinson_trace`` plain and Hutch++,
``hutchinson_diag``, ``spectral_density``; jitted, same key), one jitted
``scale_by_newton_cg`` step and the ``Delta2(D)`` pipeline
(``curvature_subspace``, ``increment_coefficients`` with ``k + 1 = 41`` samples,
which do not split evenly over 8 devices, ``delta2_closed_form``), and compares
them with the same computation on unsharded arrays.
Here we assert (1) agreement to a few float64 ulps-times-dimension and (2) that
every parameter-shaped output (products, eigenvectors, the Krylov basis, the CG
solution, the Hutchinson diagonal) carries the parameters' ``PartitionSpec``
(with a leading unsplit axis for stacked vectors), so each device holds only its
shard: nothing is gathered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_sharding_worker.py")
LAYOUTS = ("data_parallel", "fsdp", "data_x_model", "fsdp_explicit")
SPLIT = {"data_parallel": 1.0, "fsdp": 1 / 8, "data_x_model": 1 / 4, "fsdp_explicit": 1 / 8}
LANDSCAPE = (
    "landscape_eigenvalues", "landscape_eigenvectors", "landscape_converged",
    "landscape_c", "landscape_B", "landscape_delta2",
)
# microbatched landscape and k_curve (the angles between subspaces included)
LANDSCAPE_MB = ("landscape_mb_eigenvalues", "landscape_curve_closed_form",
                "landscape_curve_angle")
VECTORS = (
    "hvp_linearize", "hvp_linearize_jit", "hvp_fwd_rev", "hvp_microbatched", "ggn", "ggn_jit",
    "eigsh_vectors", "lanczos_basis", "cg_x", "hutchinson_diag",
    "newton_cg_update", "newton_cg_solution", "landscape_eigenvectors",
    # eager: on the answer-now path (replicated parameters) the result is placed like them
    "eager_eigsh_vectors",
    # a streamed block product: the vectors' axis unsplit, each vector placed like params
    "stream_matmat",
    # a stream whose batches of 20 and 12 rows do not split over 8 devices (replicated)
    "stream_ragged_product",
)
SCALARS = (
    "eigsh_values", "lanczos_alphas",
    "hutchinson_trace", "hutchpp_trace", "slq_nodes", "slq_density",
    "landscape_eigenvalues", "landscape_c", "landscape_B", "landscape_delta2",
    *LANDSCAPE_MB,
    "stream_ragged_gradient",  # compared only
)
# float64 throughout; sums are reordered across devices, and eigsh/cg iterate
TOL = 1e-10


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "report.json"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out)],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    if proc.returncode != 0:
        pytest.fail(f"sharding worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def test_worker_saw_eight_devices(report):
    assert report["devices"] == 8
    assert set(report["layouts"]) == set(LAYOUTS)


def _record(report, layout, name):
    recs = report["layouts"][layout]
    if name in LANDSCAPE and "landscape_error" in recs:
        # the worker records the pipeline's exception so the other checks still run
        pytest.fail(f"Delta2(D) pipeline on {layout}: {recs['landscape_error']['message']}")
    if name in LANDSCAPE_MB and "landscape_mb_error" in recs:
        pytest.fail(f"microbatched landscape on {layout}: "
                    f"{recs['landscape_mb_error']['message']}")
    return recs[name]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", VECTORS + SCALARS)
def test_sharded_matches_single_device(report, layout, name):
    rec = _record(report, layout, name)
    assert rec["err"] < TOL, (layout, name, rec)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", VECTORS)
def test_outputs_keep_parameter_sharding(report, layout, name):
    for leaf in _record(report, layout, name)["layout"]:
        assert leaf["matches"], (layout, name, leaf)
        # each device holds 1/8 (fsdp) or 1/4 (2-D) of every parameter-shaped output
        assert leaf["max_shard_fraction"] == pytest.approx(SPLIT[layout]), (layout, name, leaf)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_solvers_converge(report, layout):
    for name in ("eigsh_converged", "cg_converged", "newton_cg_accepted", "landscape_converged"):
        assert _record(report, layout, name)["value"], name


def test_explicit_mesh_errors_are_named(report):
    """What explicit sharding cannot do raises a ``ValueError`` that says why."""
    recs = report["layouts"]["fsdp_explicit"]
    msg = recs["tangent_type_error"]["message"]
    assert "tangent must carry the same sharding" in msg and "float64[16]" in msg, msg
    msg = recs["microbatch_error"]["message"]
    assert "explicitly sharded over 8 devices" in msg and "got 12" in msg, msg
    msg = recs["flatten_error"]["message"]
    assert "`flatten=True`" in msg and "float64[16@data]" in msg, msg


def test_explicit_uneven_sample_slices(report):
    """Slicing the explicitly split sample axis: kept split when even, else gathered, exact."""
    got = report["layouts"]["fsdp_explicit"]["explicit_take"]["value"]
    assert all(r["err"] == 0.0 for r in got.values()), got
    assert got["0:40"]["type"] == "float64[40@data,8]", got
    for key, n in (("0:41", 41), ("40:41", 1), ("59:62", 3)):
        assert got[key]["type"] == f"float64[{n},8]", got
