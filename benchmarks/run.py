"""Run every benchmark case and render ``results/SUMMARY.md``.

Usage (from the repository root)::

    pip install -e '.[bench]'
    python -m benchmarks.run            # everything
    python -m benchmarks.run --quick    # short smoke run (fewer sizes and repeats)
    python -m benchmarks.run --only products eigsh
    python -m benchmarks.run --only large_model   # the 10.9M-parameter case (minutes)

Each case writes ``benchmarks/results/<case>.json``; the summary is re-rendered
from all JSON files present, so cases can be re-run one at a time.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
import traceback

CASES = ("first_answer", "products", "eigsh", "landscape", "family", "kfac", "scaling",
         "optimizers", "track_overhead")
# long (minutes of compile and a ~5 GiB peak): only when named with --only
EXTRA = ("large_model",)
# cases that cannot run without these packages (eigsh skips its torch peer by itself)
NEEDS = {"landscape": ("torch",)}


def missing(name: str) -> list[str]:
    """The packages case ``name`` needs that are not installed."""
    import importlib.util

    return [m for m in NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run: fewer sizes and repeats")
    ap.add_argument("--only", nargs="*", choices=CASES + EXTRA,
                    help="run only these cases (large_model runs only when named)")
    ap.add_argument("--compilation-cache", action="store_true",
                    help="use JAX's persistent compilation cache ($CURVLIB_CACHE_DIR or "
                         "~/.cache/curvlib/jax); off by default, as the in-process compile "
                         "columns would then time cache loads (first-call figures are always "
                         "measured in fresh processes without it)")
    ap.add_argument("--no-compilation-cache", action="store_true",
                    help="the default (kept for old command lines)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for torch (default: all cores visible, as XLA "
                         "uses); 1 also makes XLA single-threaded")
    args = ap.parse_args(argv)

    n = args.threads or len(os.sched_getaffinity(0))
    if args.threads == 1:
        # one intra-op thread for XLA too (set before jax is imported), so both sides match
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                                   "=false intra_op_parallelism_threads=1").strip()
    from . import _common as C

    if args.compilation_cache and not args.no_compilation_cache:
        import curvlib

        C.log(f"persistent compilation cache: {curvlib.enable_compilation_cache()}")

    C.QUICK = args.quick
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass

    failed, skipped = [], []
    for name in args.only or CASES:
        if missing(name):
            C.log(f"== {name}: skipped, needs {', '.join(missing(name))} (not installed; "
                  "pip install -e '.[bench]') ==")
            skipped.append(name)
            continue
        t0 = time.perf_counter()
        C.log(f"== {name} ==")
        try:
            importlib.import_module(f"benchmarks.{name}").run(quick=args.quick)
        except Exception:  # noqa: BLE001 - keep running the other cases, report at the end
            traceback.print_exc()
            failed.append(name)
        C.log(f"== {name}: {time.perf_counter() - t0:.1f} s ==")
    path = C.write_summary()
    C.log(f"summary: {path}")
    if failed:
        C.log(f"FAILED cases: {failed}")
    if skipped:
        C.log(f"SKIPPED cases (packages missing): {skipped}")
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
