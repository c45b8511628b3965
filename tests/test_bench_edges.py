"""Benchmark helpers (``benchmarks/``): ratios, goals, targets, JSON and the summary.

Pure functions on tiny synthetic inputs; no benchmark is run.
"""

from __future__ import annotations

import json
import re
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import _common as C


def _strict_loads(text):
    def refuse(const):
        raise ValueError(f"not strict JSON: {const}")

    return json.loads(text, parse_constant=refuse)


def _meta(commit="aaaaaaa", date="2026-12-01T10:00:00+00:00", quick=False,
          platform="Linux-A", torch_threads=None):
    threads = {"os_cpu_count": 2, "sched_affinity": 2}
    if torch_threads is not None:
        threads["torch_num_threads"] = torch_threads
    return {"date_utc": date, "git_commit": commit, "git_dirty": False, "platform": platform,
            "processor": "x86_64", "jax_backend": "cpu", "memory_gb": 8.0,
            "versions": {"jax": "0.10.2", "torch": "2.13.0"}, "threads": threads,
            "quick": quick, "load_avg_1m_at_start": 1.0}


def _row(what, ratio="2.00x", goal=">=1x: met"):
    return [what, "1.00 s", "peer", "2.00 s", ratio, "-", 5, goal]


@pytest.fixture
def no_git(monkeypatch):
    monkeypatch.setattr(C, "_head", lambda: "ccccccc")
    monkeypatch.setattr(C, "_commits_since", lambda commit: "0")


# ------------------------------------------------------------------- JSON


def test_write_result_is_strict_json_with_numpy_nan_and_inf(tmp_path, monkeypatch):
    import jax.numpy as jnp

    monkeypatch.setattr(C, "RESULTS", tmp_path)
    path = C.write_result("case", {
        "scalar_nan": np.float64("nan"), "scalar_inf": np.float32(np.inf),
        "array": np.array([1.0, np.nan, -np.inf]), "jax": jnp.array([jnp.nan, 2.0]),
        "nested": [{"x": np.float64("nan")}]})
    out = _strict_loads(path.read_text())
    assert out["scalar_nan"] is None and out["scalar_inf"] == "inf"
    assert out["array"] == [1.0, None, "-inf"]
    assert out["jax"] == [None, 2.0]
    assert out["nested"] == [{"x": None}]
    assert out["meta"]["git_commit"] is not None or out["meta"]["git_dirty"] is None


def test_metadata_records_uncommitted_changes(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "curvlib").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "curvlib" / "a.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    assert C._git_dirty(tmp_path) is False
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"a": 1}\n')  # results only
    assert C._git_dirty(tmp_path) is False
    (tmp_path / "curvlib" / "a.py").write_text("x = 2\n")  # the code measured changed
    assert C._git_dirty(tmp_path) is True
    assert "git_dirty" in C.metadata()


# ---------------------------------------------------------------- summary


def test_summary_marks_quick_cases_machines_and_parts_kept(no_git):
    results = {
        "full": {"meta": _meta(torch_threads=2), "headline": [_row("a full row")]},
        "quick": {"meta": _meta(quick=True, platform="Linux-B"),
                  "headline": [_row("a quick row")]},
        "kept": {"meta": _meta(commit="bbbbbbb", date="2026-12-04T07:49:00+00:00"),
                 "parts": {"old": {"meta": _meta(commit="ddddddd",
                                                 date="2026-11-29T11:25:00+00:00")}},
                 "headline": [_row("a kept row")]},
    }
    text = C.render_summary(results)
    head = text.split("## Headline", 1)[1]
    assert "| quick (quick) | a quick row |" in head
    assert "| full | a full row |" in head
    # two machines: the summary does not claim one machine (and one commit) for all
    assert "Machines differ" in text
    assert re.search(r"Linux-A.*: full, kept\.", text)
    assert re.search(r"Linux-B.*: quick\.", text)
    runs = text.split("## Headline", 1)[0]
    kept_line = next(line for line in runs.splitlines() if line.startswith("| kept |"))
    assert "old: ddddddd, 2026-11-29T11:25" in kept_line
    assert "2.13.0, threads: 2" in next(line for line in runs.splitlines()
                                         if line.startswith("| full |"))


def test_summary_flags_a_run_of_uncommitted_code(no_git):
    m = _meta()
    m["git_dirty"] = True
    text = C.render_summary({"case": {"meta": m, "headline": [_row("r")]}})
    assert "aaaaaaa (uncommitted changes)" in text


def test_fmt_slower_never_says_slower_below_one():
    assert C.fmt_slower(1.58) == "1.58x slower"
    assert C.fmt_slower(0.5) == "2.00x faster"
    assert C.fmt_slower(0.8, 1) == "1.2x faster"
    assert C.fmt_slower(None) == "n/a" and C.fmt_slower(float("nan")) == "n/a"


# ---------------------------------------------------------------- first_answer


def _first_answer_rows():
    cur = dict(eager_second_s=0.05, warm_jit_s=0.001, eager_ready_minus_warm_s=0.001)
    rows = {n: dict(first_s=t, first_s_rounds=[t] * 3) for n, t in {
        "matfree_eigh_partial": 0.4, "scipy_arpack": 0.125, "matfree_trace": 0.36,
        "matfree_diagonal": 0.42, "scipy_cg": 0.12}.items()}
    rows["scipy_arpack"]["eager_second_s"] = 0.007
    for n, t in {"eigsh": 0.2, "lanczos": 0.2, "power_iteration": 0.2, "cg": 0.15,
                 "hutchinson_trace": 0.65, "hutchinson_diag": 0.36,
                 "spectral_density": 0.37, "eigsh_in_jit": 0.5}.items():
        rows[n] = dict(first_s=t, first_s_rounds=[t] * 3, **cur)
    for n, t in {"eigsh_notebook_answer_now": 0.2, "eigsh_notebook_fused_in_front": 2.8,
                 "eigsh_notebook_warm_persistent_cache": 0.1}.items():
        rows[n] = dict(first_s=t, first_s_rounds=[t] * 3, new_k_s=0.17, new_batch_size_s=0.1,
                       first_build_s=0.3)
    return rows


def test_first_answer_headline_words_and_repeats():
    from benchmarks import first_answer as FA

    head = FA._headline(_first_answer_rows())
    cells = [str(c) for row in head for c in row]
    assert not [c for c in cells if re.fullmatch(r"0\.\d+x slower", c)], cells
    lanczos = next(r for r in head if r[0].startswith("lanczos"))
    assert lanczos[4] == "2.00x faster"  # 0.2 s against matfree's 0.4 s
    warm = next(r for r in head if "warm persistent cache" in r[0])
    assert warm[4] == "1.2x faster"  # 0.1 s against ARPACK's 0.125 s
    build = next(r for r in head if "first build" in r[0])
    assert build[1] == "0.300 s"
    # a result written before the build was timed renders without it
    rows = _first_answer_rows()
    del rows["eigsh_notebook_answer_now"]["first_build_s"]
    build = next(r for r in FA._headline(rows) if "first build" in r[0])
    assert build[1] == FA._fmt(None)
    second = next(r for r in head if r[0].startswith("eager second call"))
    assert second[6] == f"1 / {FA.PAIRS} (median)"  # the warm call is a median of PAIRS


# ------------------------------------------------------------------- eigsh


def test_matfree_depth_search_finds_the_smallest_m_below_the_first_grid_point(monkeypatch):
    import jax.numpy as jnp

    from benchmarks import eigsh as E

    needed = 33  # the oracle: depths >= 33 reach the target

    def solver(prob, m):
        return lambda *a: (jnp.full(E.K, float(m)), jnp.zeros((E.K, 2)))

    class Chk:
        def check(self, vals, vecs):
            m = int(vals[0])
            return {"max_rel_residual": 1e-4 if m >= needed else 1e-2, "same_pairs": True,
                    "reached": m >= needed}

    monkeypatch.setattr(E, "matfree_solver", solver)
    prob = SimpleNamespace(params=None, batch=())
    entry, failed = E.run_matfree(prob, Chk(), None, 5, 40, 200, quick=False)
    assert failed is None
    assert entry["num_matvecs"] == needed
    assert min(entry["search"]) >= E.K  # never a depth below K


def test_eigsh_row_of_a_less_accurate_faster_peer_claims_no_bound():
    from benchmarks import eigsh as E

    res = {"model": "t",
           "curvlib": {"timing": {"median_s": 2.0, "repeats": 5}, "max_rel_residual": 5e-4},
           "torch_power": {"timing": {"median_s": 1.0, "repeats": 3}, "max_rel_residual": 3e-2,
                           "num_matvecs": 100, "reached": False}}
    row = E._row(res, "torch_power", "torch", ">=10x")
    assert "slower by" not in row[4]  # it took half curvlib's time: no lower bound
    assert row[5] == "5.0e-04 / 3.0e-02" and row[6] == "5 / 3"
    res["torch_power"]["timing"]["median_s"] = 50.0
    assert "slower by >= 25.00x" in E._row(res, "torch_power", "torch", ">=10x")[4]


# -------------------------------------------------------------- optimizers


def _opt(t, reached, g=1e-7, v=0.04):
    return {"time": {"median_s": t}, "reached": reached, "final_grad_norm": g,
            "final_value": v}


def test_optimizer_ratios_only_between_runs_that_reached_the_target():
    from benchmarks import optimizers as O

    lr = {"curvlib.newton_cg": _opt(0.1, True), "optax.lbfgs": _opt(0.05, False, g=1e-3),
          "scipy trust-ncg": _opt(0.3, True)}
    mp = {"curvlib.newton_cg(ggn)": _opt(0.06, True), "optax.lbfgs": _opt(0.02, True)}
    assert O.time_ratio(lr["optax.lbfgs"], lr["curvlib.newton_cg"]) is None
    assert O.time_ratio(lr["scipy trust-ncg"], lr["curvlib.newton_cg"]) == pytest.approx(3.0)
    rows = O.headline_rows(lr, mp, 5)
    assert rows[0][4].startswith("n/a") and rows[0][7].endswith("not measurable (a side "
                                                                 "missed the target)")
    assert rows[1][4] == "3.00x"
    # the MLP, where optax.lbfgs is faster, is a headline row too
    mlp = rows[2]
    assert "MLP" in mlp[0] and mlp[4] == "0.33x" and mlp[7].endswith("MISSED")


# -------------------------------------------------------------------- kfac


def test_steps_and_time_to_target():
    from benchmarks import kfac as K

    times = np.array([0.5, 0.1, 0.1, 0.1])
    assert K._to_target([5.0, 4.0, 3.0, 2.0], times, 3.0) == (2, pytest.approx(0.7))
    assert K._to_target([5.0, np.nan, 2.0, 1.0], times, 3.0) == (2, pytest.approx(0.7))
    assert K._to_target([5.0, 4.0], times, 3.0) == (None, None)


def test_tuned_adam_skips_diverged_runs():
    from benchmarks import kfac as K

    adams = {"adam(0.1)": {"losses": np.array([3.0, np.nan, np.nan])},
             "adam(0.01)": {"losses": np.array([3.0, 2.0, 1.5, 1.6])}}
    assert K._tuned_adam(adams) == ("adam(0.01)", 1.5)
    adams["adam(0.1)"]["losses"] = np.array([3.0, 1.0, np.nan])  # its best before diverging
    assert K._tuned_adam(adams) == ("adam(0.1)", 1.0)
    with pytest.raises(RuntimeError, match="diverged"):
        K._tuned_adam({"adam(1)": {"losses": np.array([np.nan])}})


def _ms(cell):
    v, unit = cell.split()
    return float(v) * {"ms": 1e-3, "us": 1e-6, "s": 1.0}[unit]


def test_kfac_step_time_row_shows_the_times_its_ratio_comes_from():
    from benchmarks import kfac as K

    adam = [0.0019, 0.0020, 0.0018, 0.0019, 0.0020]
    ratios = [3.5, 3.6, 3.2, 4.3, 3.7]
    costs = {"ratios": ratios, "kfac_s": list(np.multiply(adam, ratios)), "adam_s": adam,
             "pairs": 5, "between": float(np.median(ratios[:-2])),
             "amortised": float(np.mean(ratios))}
    row = K._step_time_row("kfac", costs, "adam(0.02)")
    between, amortised = (_ms(c) for c in row[1].split(" / "))
    peer = _ms(row[3])
    assert between / peer == pytest.approx(costs["between"], rel=0.03)
    assert amortised / peer == pytest.approx(costs["amortised"], rel=0.03)
    assert row[6].startswith("5 pairs")


def _race(measured_now):
    raw = {"versions": {"kfac_jax": "0.0.8"}, "runs": [{}], "measured_now": measured_now,
           "file": "kfac_jax.json", "date_utc": "2026-11-29T06:00:00+00:00",
           "machine": {"load_avg": [11.5, 9.0, 9.0]}}
    return {"runs": {"kfac": {"cpu_s_per_step": 0.006}, "kfac-jax": {"cpu_s_per_step": 0.007,
                                                                     "repeats": 3}},
            "reached": {"kfac": (183, 1.32), "kfac-jax": (175, 2.46)}, "repeats": 3,
            "kj": {"raw": raw}}


def test_kfac_jax_row_says_when_kfac_jax_was_not_measured_in_this_run():
    from benchmarks import kfac as K

    old = K._kfac_jax_row("autoencoder", _race(False))
    assert "earlier run" in old[2] and old[4] == "1.86x"
    assert any("not measured in this run" in n and "2026-11-29" in n
               for n in K._notes(_race(False)["kj"]))
    now = K._kfac_jax_row("autoencoder", _race(True))
    assert now[2] == "kfac-jax 0.0.8"
    assert not any("not measured" in n for n in K._notes(_race(True)["kj"]))


def test_kfac_classifier_steps_goal_reads_the_way_its_ratio_does(monkeypatch):
    from benchmarks import kfac as K

    losses = lambda n: np.linspace(1.0, 0.0, n)
    runs = {"adam(0.03)": {"losses": losses(3000)}, "kfac": {"losses": losses(400)}}
    race = {"runs": runs, "best": "adam(0.03)", "target": 0.0, "repeats": 3, "kj": None,
            "reached": {"adam(0.03)": (2999, 7.27), "kfac": (175, 1.58)}, "summary": ""}
    monkeypatch.setattr(K, "_race", lambda *a: race)
    monkeypatch.setattr(K, "_plot", lambda *a, **k: "kfac_classifier.png")
    monkeypatch.setattr(K, "_compact", lambda r: {})
    steps = K._classifier(False, None, True)["headline"][0]
    # the ratio is Adam's steps / K-FAC's (17.05x): the summary's convention reads a goal
    # written "<= ..." as curvlib / peer, so the goal must not be written so
    assert steps[4].startswith("17.05x")
    assert not steps[7].startswith("<=") and steps[7].endswith("met")


# ------------------------------------------------------------------ family


def test_family_report_records_parts_kept_from_an_earlier_run(no_git):
    from benchmarks import family as F

    pr = lambda r: {"a": {"median_s": 0.01}, "b": {"median_s": 0.01 * r},
                    "ratio_b_over_a_median": r, "ratio_iqr": 0.1, "repeats": 15}
    products = {"paired_vs_grad": {n: pr(1.1) for n in ("fisher", "ggn", "empirical_fisher")},
                "timings": {"grad": {"median_s": 0.01, "per_grad": 1.0, "repeats": 7}},
                "agreement": {"fisher_vs_ggn": 1e-7, "recompute_vs_linearize": 1e-7}}
    block = {"eigenvalues": [1.0], "num_matvecs": 40, "converged": True}
    spectra = {"paired": pr(2.0), "blocks": {"l0": block}, "block_products_total": 40,
               "full": {"num_matvecs": 60, "compile_s": 1.0}, "blocks_compile_s": 2.0,
               "paired_batch_size_1": pr(1.8)}
    stream = {"paired": pr(1.3), "streamed": {"num_matvecs": 39},
              "in_memory": {"num_matvecs": 39}}
    prob = SimpleNamespace(name="transformer", params={"w": np.zeros(3)}, config={})
    last = {"meta": _meta(commit="ddddddd", date="2026-11-29T11:25:00+00:00")}
    kept = {"products": F.kept_meta(last, "products")}
    payload = F._report(prob, products, spectra, stream, True, kept)
    assert payload["parts_meta"]["products"]["git_commit"] == "ddddddd"
    assert any("products (commit ddddddd, 2026-11-29T11:25)" in n for n in payload["notes"])
    # a part kept twice keeps the run that measured it
    assert F.kept_meta({"meta": _meta(), **payload}, "products")["git_commit"] == "ddddddd"
    text = C.render_summary({"family": {"meta": _meta(commit="eeeeeee"), **payload}})
    assert "eeeeeee; parts measured apart: products: ddddddd, 2026-11-29T11:25" in text


# ------------------------------------------------------------- without torch


def test_cases_needing_torch_are_skipped_by_name_without_it(monkeypatch, capsys):
    import importlib.util

    from benchmarks import run as R

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    monkeypatch.setattr(C, "write_summary", lambda: "SUMMARY.md")
    ran = []
    monkeypatch.setattr(R.importlib, "import_module",
                        lambda name: ran.append(name) or SimpleNamespace(run=lambda quick: None))
    assert R.main(["--only", "landscape"]) == 1
    out = capsys.readouterr().out
    assert "landscape: skipped, needs torch" in out and ran == []


def test_eigsh_row_of_a_skipped_torch_peer_says_so():
    from benchmarks import eigsh as E

    res = {"model": "t", "torch_power": None, "torch_power_skipped": "torch is not installed",
           "curvlib": {"timing": {"median_s": 2.0, "repeats": 5}, "max_rel_residual": 5e-4}}
    row = E._row(res, "torch_power", "torch", ">=10x")
    assert row[3] == "not run: torch is not installed" and row[7] == ">=10x: not measured"


def test_kfac_jax_results_with_a_diverged_step_stay_strict_and_readable(tmp_path, monkeypatch):
    from benchmarks import kfac as K
    from benchmarks import kfac_jax_ref as KJ

    res = {"runs": [{"losses": [3.0, float("nan"), 1.0], "step_times": [0.1, 0.1, 0.1],
                     "cpu_s_per_step": 0.1}], "compile_s": 1.0,
           "versions": {"kfac_jax": "0.0.8"}}
    text = json.dumps(KJ._strict(res), allow_nan=False)  # what kfac_jax_ref.py writes
    monkeypatch.setattr(C, "RESULTS", tmp_path)
    (tmp_path / "kfac_jax.json").write_text(text)
    kj = K._kfac_jax(None, 3, True, "autoencoder")
    assert kj["losses"].dtype == float and np.isnan(kj["losses"][1])
    assert K._to_target(kj["losses"], kj["step_times"], 2.0) == (2, pytest.approx(0.3))
