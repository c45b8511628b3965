"""Edges of ``python -m curvlib.demo``: options refused before any work, the figure's
headline, and a JSON report that is written whole, with where it was measured."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from curvlib.demo import cli, probe
from curvlib.demo import report as demo_report


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_config(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_one_point_grid_does_not_need_sigma_max(capsys):
    # with --num-sigmas 1 the grid is --sigma-min alone: a --sigma-min above the default
    # --sigma-max (0.1) was refused for sigma_max, and --sigma-max itself as "ignored"
    _, cfg = cli.parse_config(["--num-sigmas", "1", "--sigma-min", "1",
                               "--no-compilation-cache"])
    np.testing.assert_allclose(cfg.sigmas, [1.0])
    # the largest sigma of that grid is --sigma-min: its sigma^4 must fit float32
    err = _refused(["--num-sigmas", "1", "--sigma-min", "1e10", "--no-compilation-cache"],
                   capsys)
    assert "sigma_min (--sigma-min) = 10000000000.0: sigma^4 overflows" in err


def test_seq_len_too_long_for_the_held_out_loss_is_refused(capsys):
    # 64 held-out sequences of 801 characters do not fit the held-out split (58 do): the
    # run failed after training, in the held-out loss
    err = _refused(["--seq-len", "800", "--no-compilation-cache"], capsys)
    assert "seq_len (--seq-len) = 800" in err and "holds 58" in err
    cli.parse_config(["--seq-len", "725", "--no-compilation-cache"])  # the largest that fits


@pytest.mark.parametrize("task", ["delta2", "spectrum"])
def test_seed_beyond_jax_prng_range_is_refused(task, capsys):
    # 2**32 gave seed 0's PRNG keys; from 2**63 the run crashed (OverflowError) after the
    # corpus was loaded
    for seed in ("4294967296", str(2**64)):
        err = _refused(["--task", task, "--seed", seed, "--no-compilation-cache"], capsys)
        assert "seed (--seed)" in err
    cli.parse_config(["--task", task, "--seed", str(2**32 - 1), "--no-compilation-cache"])


def test_empty_compilation_cache_dir_is_refused(capsys):
    # "" silently meant the default cache folder
    err = _refused(["--compilation-cache-dir", ""], capsys)
    assert "--compilation-cache-dir must name a folder" in err


def _report(speedup: float) -> dict:
    sig, dims = [1e-4, 1e-2], ["1", "2"]
    per_d = {d: [1.0, 0.9] for d in dims}
    names = ("subspace", "coefficients", "direct_mc", "full_mc", "quadratic_mc", "closed_form")
    timings = {n: 0.5 for n in names} | {n + "_compile": 0.1 for n in names}
    return dict(sigmas=sig, dims=[1, 2], k=3, model=dict(parameters=100),
                ratio_to_full=per_d, ratio_direct_to_full=per_d,
                direct_vs_closed_form_rel_error={d: [1e-3, 1e-2] for d in dims},
                direct_rel_stderr={d: [1e-3, 1e-2] for d in dims},
                model_error_same_draws={d: [1e-4, 1e-3] for d in dims},
                terms={d: dict(constant=[1e-4, 1e-4], sigma2=[1e-8, 1e-4],
                               sigma4=[1e-12, 1e-8]) for d in dims},
                closed_form={d: [1e-4, 2e-4] for d in dims}, timings=timings,
                speedup_end_to_end=speedup, total_seconds=1.0)


def test_figure_says_slower_when_the_closed_form_route_is_slower(tmp_path, monkeypatch):
    # the console said "2x slower"; the figure's title said "GM route 0.5x faster"
    figures = []
    make = demo_report._figure
    monkeypatch.setattr(demo_report, "_figure", lambda **kw: figures.append(make(**kw))
                        or figures[-1])
    demo_report.plot_probe_report(_report(0.5), tmp_path / "r.png")
    title = figures[0].axes[3].get_title()
    assert "2x slower than direct MC" in title and "faster" not in title


def test_json_report_says_where_it_was_measured(tmp_path):
    # the timings came with no machine, no JAX or curvlib version
    cfg = probe.ProbeConfig(out=str(tmp_path), plot=False)
    probe._write_report(_report(2.0), cfg, lambda *a: None)
    machine = json.loads((tmp_path / "delta2_transformer.json").read_text())["machine"]
    assert machine["versions"]["jax"] and machine["versions"]["curvlib"]
    assert machine["jax_backend"] and machine["jax_devices"] and machine["python"]


def test_interrupted_json_write_keeps_the_previous_report(tmp_path, monkeypatch):
    # a Ctrl-C while the JSON was written left a truncated file
    cfg = probe.ProbeConfig(out=str(tmp_path), plot=False)
    path = tmp_path / "delta2_transformer.json"
    probe._write_report(_report(2.0), cfg, lambda *a: None)

    def interrupted(obj, f, **kw):
        f.write('{"config": {')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        probe._write_report(_report(3.0), cfg, lambda *a: None)
    assert json.loads(path.read_text())["speedup_end_to_end"] == 2.0
    assert os.listdir(tmp_path) == ["delta2_transformer.json"]


def test_json_report_is_strict_json(tmp_path):
    # NaN and infinities were written as the literals NaN / Infinity, which strict JSON
    # readers (and the JSON standard) refuse; the landscape's own writer writes null
    path = tmp_path / "r.json"
    demo_report.write_json({"a": float("nan"), "b": [1.5, float("inf"), (2.0, -float("inf"))],
                       "c": {"d": np.float64(np.nan), "e": "text", "f": 3}}, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.5, None, [2.0, None]],
                                "c": {"d": None, "e": "text", "f": 3}}
