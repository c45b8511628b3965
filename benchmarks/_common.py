"""Shared benchmark machinery: timing, metadata, JSON results, Markdown summary, plots.

Method (see README.md): every timed callable is warmed up first (compilation and
first-call effects excluded), then run ``repeats`` times; each repeat calls it
``number`` times and blocks on the result (``jax.block_until_ready``). We report
the median per-call time and the spread (min, max, IQR) over repeats. Ratios are
ratios of medians measured in the same process, one after the other, or, from
``time_paired``, the median of the per-pair ratios of interleaved A/B pairs.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

# Flags set by run.py; read by the cases.
QUICK = False


def repeats(default: int = 5) -> int:
    """Number of timed repeats: never below 5 (the method's floor), 5 in --quick mode."""
    return 5 if QUICK else max(5, default)


# -------------------------------------------------------------------- timing


def _block(x):
    try:
        import jax

        return jax.block_until_ready(x)
    except Exception:  # noqa: BLE001 - non-jax outputs (torch, numpy)
        return x


def time_fn(
    fn: Callable[[], Any],
    *,
    repeats: int = 5,
    number: int | None = None,
    warmup: int = 1,
    min_repeat_s: float = 0.05,
) -> dict:
    """Median wall time of ``fn()`` per call, after ``warmup`` calls.

    ``number`` calls make one repeat (auto-chosen so one repeat lasts at least
    ``min_repeat_s``, to keep timer and dispatch noise small for millisecond
    products). Outputs are blocked on with ``jax.block_until_ready``.
    """
    for _ in range(warmup):
        _block(fn())
    if number is None:
        t0 = time.perf_counter()
        _block(fn())
        one = time.perf_counter() - t0
        number = max(1, int(np.ceil(min_repeat_s / max(one, 1e-9))))
        number = min(number, 1000)
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            out = fn()
        _block(out)
        times.append((time.perf_counter() - t0) / number)
    return summarize(times, number=number)


def time_paired(fn_a: Callable[[], Any], fn_b: Callable[[], Any], *, repeats: int = 15,
                number: int | None = None, min_repeat_s: float = 0.05) -> dict:
    """Interleaved A/B timing for a noisy, shared host: each repeat times A then B back to back.

    Returns both sides' summaries and the median (and IQR) of the per-repeat ratios
    ``t_b / t_a``; load that changes between repeats hits both sides of a pair alike.
    """
    for f in (fn_a, fn_b):
        _block(f())
    if number is None:
        t0 = time.perf_counter()
        _block(fn_a())
        number = min(1000, max(1, int(np.ceil(min_repeat_s / max(time.perf_counter() - t0,
                                                                    1e-9)))))
    ta, tb = [], []
    for i in range(repeats):
        pair = [(fn_a, ta), (fn_b, tb)]
        for f, acc in (pair if i % 2 == 0 else pair[::-1]):
            t0 = time.perf_counter()
            for _ in range(number):
                out = f()
            _block(out)
            acc.append((time.perf_counter() - t0) / number)
    r = np.asarray(tb) / np.asarray(ta)
    q1, q3 = np.percentile(r, [25, 75])
    return {"a": summarize(ta, number=number), "b": summarize(tb, number=number),
            "ratio_b_over_a_median": float(np.median(r)), "ratio_iqr": float(q3 - q1),
            "repeats": repeats}


def summarize(times, **extra) -> dict:
    t = np.asarray(times, float)
    q1, q3 = np.percentile(t, [25, 75])
    return {
        "median_s": float(np.median(t)),
        "min_s": float(t.min()),
        "max_s": float(t.max()),
        "iqr_s": float(q3 - q1),
        "repeats": int(len(t)),
        "times_s": [float(x) for x in t],
        **extra,
    }


def time_compile(jitted, *args) -> float:
    """Seconds to lower and compile ``jitted`` for ``args`` (tracing included)."""
    t0 = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MiB), from ``getrusage``."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# ------------------------------------------------------------------ metadata


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def _git_commit() -> str | None:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:  # noqa: BLE001
        return None


def _git_dirty(root: Path | None = None) -> bool | None:
    """Whether tracked files under ``curvlib/`` or ``benchmarks/`` (results aside) differ from
    the commit: the code measured is then not the recorded commit (``None`` without git)."""
    root = ROOT.parent if root is None else root
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "curvlib",
             "benchmarks", ":(exclude)benchmarks/results", ":(exclude)benchmarks/README.md"],
            cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def threads() -> dict:
    """Thread settings in force: env vars, torch intra/inter-op threads, cores visible."""
    out = {
        k: os.environ.get(k)
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "XLA_FLAGS")
    }
    out["os_cpu_count"] = os.cpu_count()
    try:
        out["sched_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    torch = sys.modules.get("torch")  # (loaded by a torch peer; None where it was blocked)
    if torch is not None:
        out["torch_num_threads"] = torch.get_num_threads()
        out["torch_num_interop_threads"] = torch.get_num_interop_threads()
    return out


def metadata() -> dict:
    import jax

    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {
            m: _version(m)
            for m in ("curvlib", "jax", "jaxlib", "numpy", "scipy", "matfree", "torch", "flax",
                      "optax")
        },
        "threads": threads(),
        "quick": QUICK,
    }
    try:
        import psutil

        meta["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        meta["load_avg_1m_at_start"] = os.getloadavg()[0]
    except Exception:  # noqa: BLE001
        pass
    return meta


# ------------------------------------------------------------------- results


def _jsonable(x):
    """``x`` as strict JSON values: NaN becomes ``None`` and infinities ``"inf"`` /
    ``"-inf"``, also inside NumPy and JAX scalars and arrays."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    elif isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    elif hasattr(x, "shape") and hasattr(x, "dtype"):  # jax arrays
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def dumps(payload) -> str:
    """Strict JSON text of ``payload`` (no ``NaN`` or ``Infinity`` literals)."""
    return json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n"


def write_result(case: str, payload: dict) -> Path:
    """Write ``results/<case>.json`` with metadata attached; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"case": case, "meta": metadata(), **payload}
    path = RESULTS / f"{case}.json"
    path.write_text(dumps(out))
    return path


def ratio(slow: float | None, fast: float | None) -> float | None:
    if not slow or not fast:
        return None
    return float(slow) / float(fast)


def log(*args):
    print(*args, flush=True)


# ------------------------------------------------------------------- summary


def _fmt_s(s) -> str:
    if s is None:
        return "n/a"
    s = float(s)
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt_x(r) -> str:
    return "n/a" if r is None else f"{float(r):.2f}x"


def fmt_slower(r, digits: int = 2) -> str:
    """A time ratio ``curvlib / peer`` in words: ``"1.58x slower"``, or ``"2.10x faster"``
    below 1 (never ``"0.48x slower"``)."""
    if r is None or not np.isfinite(r) or r <= 0:
        return "n/a"
    return f"{r:.{digits}f}x slower" if r >= 1 else f"{1 / r:.{digits}f}x faster"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def load_results() -> dict[str, dict]:
    out = {}
    for p in sorted(RESULTS.glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except json.JSONDecodeError:
            pass
    return out


def _head() -> str:
    """The short commit this summary is rendered at (``?`` without git)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT.parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip() or "?"


def _round(x):
    return f"{x:.1f}" if isinstance(x, int | float) else "?"


def _commits_since(commit) -> str:
    """How many commits changed ``curvlib/`` after ``commit`` (``?`` without git)."""
    import subprocess

    if not commit:
        return "?"
    try:
        out = subprocess.run(["git", "rev-list", "--count", f"{commit}..HEAD", "--", "curvlib"],
                             cwd=ROOT.parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "?"


def _machine(m: dict) -> str:
    """The machine and JAX version a JSON's ``meta`` records, as one phrase (the peers'
    versions are in each JSON's ``meta.versions``, torch's threads in the summary's table)."""
    th, v = m.get("threads", {}), m.get("versions", {})
    return (f"{m.get('processor')} / {m.get('platform')}, "
            f"{th.get('sched_affinity', th.get('os_cpu_count'))} cores visible, "
            f"{m.get('memory_gb')} GiB; JAX {v.get('jax')} ({m.get('jax_backend')})")


def _torch(m: dict) -> str:
    """torch's version and intra-op threads in a run (``-`` when the run did not use it)."""
    n = m.get("threads", {}).get("torch_num_threads")
    return "-" if n is None else f"{m.get('versions', {}).get('torch')}, threads: {n}"


def _part_metas(r: dict) -> dict[str, dict]:
    """The runs of a case's parts kept from earlier runs: ``{part: meta}`` from
    ``parts[<part>]["meta"]`` and ``parts_meta``."""
    out = {name: part["meta"] for name, part in r.get("parts", {}).items()
           if isinstance(part, dict) and isinstance(part.get("meta"), dict)}
    out.update(r.get("parts_meta", {}))
    return out


def _commit_cell(m: dict, parts: dict[str, dict]) -> str:
    """A case's commit, flagged when the tree had uncommitted changes, with the runs of the
    parts measured at another commit or time."""
    def one(mm):
        return str(mm.get("git_commit")) + (" (uncommitted changes)" if mm.get("git_dirty")
                                             else "")
    cell = one(m)
    other = [f"{name}: {one(pm)}, {str(pm.get('date_utc'))[:16]}" for name, pm in parts.items()
             if (pm.get("git_commit"), pm.get("date_utc")) != (m.get("git_commit"),
                                                               m.get("date_utc"))]
    return cell + ("; parts measured apart: " + "; ".join(other) if other else "")


def _case_label(name: str, r: dict) -> str:
    """A case's name, marked when it ran in ``--quick`` mode (here or in a kept part)."""
    metas = [r.get("meta", {}), *_part_metas(r).values()]
    return name + (" (quick)" if any(m.get("quick") for m in metas) else "")


def render_summary(results: dict[str, dict] | None = None) -> str:
    """Markdown summary of every ``results/*.json`` that carries a ``summary`` block."""
    results = load_results() if results is None else results
    parts = ["# curvlib benchmark summary", ""]
    metas = {name: r["meta"] for name, r in results.items() if "meta" in r}
    if metas:
        machines: dict[str, list[str]] = {}
        for name, m in metas.items():
            machines.setdefault(_machine(m), []).append(name)
        if len(machines) == 1:
            parts += [f"Machine (every case): {next(iter(machines))}. Peer versions "
                      "(matfree, scipy, torch) are in each JSON's `meta.versions`.", ""]
        else:
            parts += ["Machines differ between cases (compare rows of different machines with "
                      "care):", ""]
            parts += [f"- {desc}: {', '.join(names)}." for desc, names in machines.items()]
            parts += ["", "Peer versions (matfree, scipy, torch) are in each JSON's "
                      "`meta.versions`.", ""]
        parts += [
            "Times are medians over the listed repeats after warm-up. A ratio is peer / "
            "curvlib (above 1: curvlib is faster) unless its row says otherwise: \"x slower\" "
            "and \"x faster\" say which in words; rows read \"of a gradient\", \"of one "
            "eigsh\", \"K-FAC / Adam\" or with a goal written \"<= ...\" are curvlib / peer "
            "(below 1: curvlib is faster). Peers are "
            "measured in the same run unless the case's notes say otherwise.",
            "",
            "Each case's run (its JSON's `meta`): the commit and date it measured, and how many "
            f"commits had changed `curvlib/` since when this summary was rendered (at "
            f"{_head()}; a case measured long ago describes older code: rerun it with "
            "`python -m benchmarks.run --only <case>`). Parts of a case kept from an earlier "
            "run are listed with their own commit; cases run with `--quick` are marked "
            "(quick) here and in the headline.",
            "",
            md_table(["case", "commit", "date (UTC)", "load (1 min)", "curvlib commits since",
                      "torch (threads)", "mode"],
                     [[name, _commit_cell(m, _part_metas(results[name])),
                       str(m.get("date_utc"))[:16], _round(m.get("load_avg_1m_at_start")),
                       _commits_since(m.get("git_commit")), _torch(m),
                       "quick" if m.get("quick") else "full"]
                      for name, m in metas.items()]),
            "",
        ]
    headline = []
    for name, r in results.items():
        for row in r.get("headline", []):
            headline.append([_case_label(name, r)] + row)
    if headline:
        parts += ["## Headline", "", md_table(
            ["case", "what", "curvlib", "peer", "peer time", "ratio", "accuracy (curvlib / peer)",
             "repeats", "goal"], headline), ""]
    for name, r in results.items():
        if "summary_md" in r:
            parts += [f"## {r.get('title', name)}", "", r["summary_md"], ""]
        for note in r.get("notes", []):
            parts.append(f"- {note}")
        if r.get("notes"):
            parts.append("")
        for plot in r.get("plots", []):
            parts += [f"![{name}]({plot})", ""]
    return "\n".join(parts)


def write_summary() -> Path:
    """Render ``results/SUMMARY.md`` and refresh the headline table in ``README.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "SUMMARY.md"
    text = render_summary()
    path.write_text(text)
    readme = ROOT / "README.md"
    start, end = "<!-- headline:start -->", "<!-- headline:end -->"
    if readme.exists() and "## Headline" in text:
        body = text.split("## Headline", 1)[1].split("\n## ", 1)[0].strip()
        r = readme.read_text()
        if start in r and end in r:
            head, rest = r.split(start, 1)
            _, tail = rest.split(end, 1)
            readme.write_text(f"{head}{start}\n{body}\n{end}{tail}")
    return path


def loglog_plot(path: Path, series: dict[str, tuple], *, xlabel: str, ylabel: str, title: str):
    """Log-log plot of ``{label: (x, y)}``; returns the file name (relative to results/)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, (x, y) in series.items():
        ax.loglog(x, y, "o-", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def fit_slope(x, y) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    return float(np.polyfit(lx, ly, 1)[0])


def median(xs):
    return statistics.median(xs)
