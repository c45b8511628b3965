"""``python -m curvlib.demo``: options checked before any work, help, quick mode, reports."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from curvlib.demo import cli
from curvlib.demo.probe import ProbeConfig, parameter_count

TINY = ["--d-model", "8", "--layers", "1", "--heads", "2", "--seq-len", "8",
        "--train-steps", "3", "--batch-size", "4", "--k", "3", "--dims", "1,2",
        "--num-sigmas", "3", "--num-samples", "4", "--full-samples", "4",
        "--basis-size", "6", "--no-compilation-cache"]


@pytest.mark.parametrize("argv, message", [
    (["--sigma-min", "-1"], r"sigma_min \(--sigma-min\)` must be > 0; got -1.0"),
    (["--sigma-max", "1e-6"], r"sigma_max \(--sigma-max\) = 1e-06 must be larger than "
                              r"sigma_min \(--sigma-min\) = 1e-05"),
    (["--num-sigmas", "0"], r"num_sigmas \(--num-sigmas\)` must be >= 1; got 0"),
    (["--heads", "3"], r"d_model \(--d-model\) = 64 must be a multiple of num_heads "
                       r"\(--heads\) = 3"),
    (["--num-samples", "1"], r"num_samples \(--num-samples\)` must be >= 2"),
    (["--dims", "4,1"], r"dims \(--dims\) must be increasing"),
    (["--dims", "1,200000", "--basis-size", "300000"],
     r"max\(dims\) \(--dims\) = 200000 must be smaller than the model's parameter count "
     r"N = 116064"),
    (["--basis-size", "16"], r"basis_size \(--basis-size\) = 16 must exceed the largest "
                             r"subspace dimension max\(dims\) = 16"),
    (["--k", "100000"], r"k \(--k\) = 100000 needs k \+ 2 = 100002 sequences"),
    (["--eig-tol", "0"], r"eig_tol \(--eig-tol\)` must be > 0"),
    (["--microbatch-size", "0"], r"microbatch_size \(--microbatch-size\)` must be >= 1"),
    (["--train-steps", "0"], r"train_steps \(--train-steps\)` must be >= 1"),
    (["--sigma-min", "1e-50"], r"sigma_min \(--sigma-min\) = 1e-50 is 0 in float32"),
    (["--sigma-max", "1e30"], r"sigma_max \(--sigma-max\) = 1e\+30: sigma\^4 overflows"),
    (["--task", "spectrum", "--k", "0"], r"--k applies to --task delta2 only"),
    (["--hidden", "0"], r"--hidden applies to --task spectrum only"),
    (["--compilation-cache-dir", "/tmp"], r"--compilation-cache-dir and "
                                          r"--no-compilation-cache contradict"),
    (["--num-sigmas", "1", "--sigma-max", "0.1"], r"--sigma-max would be ignored"),
    (["--out", ""], r"--out must name a folder"),
    (["--task", "spectrum", "--train-s", "5"], r"unrecognized arguments: --train-s"),
    (["--task", "spectrum", "--top-k", "0"], r"top_k \(--top-k\)` must be >= 1"),
    (["--task", "spectrum", "--hidden", "1", "--top-k", "100"],
     r"top_k \(--top-k\) = 100 must be smaller than the MLP's parameter count N = 85"),
])
def test_cli_checks_every_option_before_any_work(argv, message, capsys):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--no-compilation-cache"])
    assert time.perf_counter() - t0 < 1.0  # no training, no compilation
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "python -m curvlib.demo: error:" in err
    import re

    assert re.search(message, err), err


def test_cli_refuses_unusable_folders_before_any_work(tmp_path, monkeypatch, capsys):
    # a folder under a plain file was found only when the report was written, after all
    # the work; a cache folder that is a file raised a bare FileExistsError
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [(["--out", str(afile / "sub"), "--no-compilation-cache"],
              r"--out '.*afile/sub' cannot be created: '.*afile' is not a folder"),
             (["--out", str(afile), "--no-compilation-cache"], r"--out '.*afile' exists and is "
                                                               r"not a folder"),
             (["--out", str(tmp_path / "o"), "--compilation-cache-dir", str(afile)],
              r"--compilation-cache-dir '.*afile' exists and is not a folder")]
    import re

    for argv, message in cases:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert re.search(message, capsys.readouterr().err)
    monkeypatch.setenv("CURVLIB_CACHE_DIR", str(afile))
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "o")])
    assert "$CURVLIB_CACHE_DIR" in capsys.readouterr().err
    # a folder that does not exist yet is fine, and nothing is created by the checks
    cli.parse_config(["--out", str(tmp_path / "new" / "deeper"), "--no-compilation-cache"])
    assert not (tmp_path / "new").exists()


def test_cli_help_has_text_and_default_for_every_option():
    parser = cli.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        assert "(default:" in formatter._get_help_string(action), action.option_strings
    text = parser.format_help()
    assert "--basis-size" in text and "--quick" in text and "--no-compilation-cache" in text


def test_quick_mode_and_explicit_options():
    a, cfg = cli.parse_config(["--quick", "--no-compilation-cache"])
    assert cfg.train_steps == cli.QUICK["train_steps"] and cfg.dims == cli.QUICK["dims"]
    assert cfg.num_samples == cli.QUICK["num_samples"]
    a, cfg = cli.parse_config(["--quick", "--num-samples", "5", "--no-compilation-cache"])
    assert cfg.num_samples == 5 and cfg.train_steps == cli.QUICK["train_steps"]
    # the deprecated flag name of the basis size still works
    a, cfg = cli.parse_config(["--num-matvecs", "40", "--no-compilation-cache"])
    assert cfg.basis_size == 40


def test_compilation_cache_flag(monkeypatch, tmp_path):
    import curvlib

    calls = {}
    monkeypatch.delattr(curvlib, "enable_compilation_cache", raising=False)
    monkeypatch.setattr("jax.config.update", lambda name, value: calls.__setitem__(name, value))
    monkeypatch.setenv("CURVLIB_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.enable_compilation_cache() == str(tmp_path / "cache")
    assert calls["jax_compilation_cache_dir"] == str(tmp_path / "cache")
    assert (tmp_path / "cache").is_dir()
    a, _ = cli.parse_config([])
    assert not a.no_compilation_cache  # on by default
    a, _ = cli.parse_config(["--no-compilation-cache"])
    assert a.no_compilation_cache


@pytest.mark.parametrize("d_model, layers, heads, seq_len", [(64, 2, 4, 64), (8, 1, 2, 8)])
def test_parameter_count_matches_the_model(d_model, layers, heads, seq_len):
    import jax
    import jax.numpy as jnp

    from curvlib import _tree
    from curvlib.demo import models

    cfg = models.TransformerConfig(vocab_size=96, seq_len=seq_len, d_model=d_model,
                                   num_layers=layers, num_heads=heads)
    shapes = jax.eval_shape(models.DecoderLM(cfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, seq_len), jnp.int32))
    assert parameter_count(cfg) == _tree.size(shapes["params"])


def test_demo_main_tiny(tmp_path):
    lines = []
    from curvlib.demo import probe

    a, cfg = cli.parse_config(TINY + ["--out", str(tmp_path)])
    r = probe.run_probe(cfg, log=lines.append)
    assert r["dims"] == [1, 2] and len(r["sigmas"]) == 3
    for key in ("delta1", "delta2_full", "closed_form", "terms", "quadratic_mc", "direct_mc",
                "ratio_to_full", "direct_vs_closed_form_rel_error", "timings",
                "speedup_closed_form_vs_direct", "model_error_same_draws",
                "speedup_end_to_end", "route_seconds", "max_principal_angle"):
        assert key in r
    # sigma -> 0: every Delta2 tends to Delta1^2
    np.testing.assert_allclose(r["closed_form"]["2"][0], r["delta1"] ** 2, rtol=1e-3)
    # the headline counts every stage: subspace + coefficients + GM vs subspace + direct MC
    t = r["timings"]
    gm_route = t["subspace"] + t["coefficients"] + t["closed_form"]
    np.testing.assert_allclose(r["speedup_end_to_end"],
                               (t["subspace"] + t["direct_mc"]) / gm_route, rtol=1e-12)
    assert all(t[s + "_compile"] >= 0 for s in ("subspace", "coefficients", "direct_mc"))
    # the console summary fits 100 columns; the details are in the JSON
    assert lines and max(len(line) for line in lines) <= 100
    # (said as the reader says it: a ratio below 1 is "slower", not "0.67x faster")
    assert any(re.search(r"[0-9.]+x (faster|slower) end to end", line) for line in lines)
    saved = json.loads((tmp_path / "delta2_transformer.json").read_text())
    assert saved["k"] == 3 and "quadratic_mc" in saved
    assert (tmp_path / "delta2_transformer.png").stat().st_size > 0


def test_probe_config_validates_in_python():
    with pytest.raises(ValueError, match=r"num_heads \(--heads\) = 3"):
        ProbeConfig(num_heads=3).validate()
    assert ProbeConfig().validate() == 116064
