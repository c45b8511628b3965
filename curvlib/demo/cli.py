"""Command line of ``python -m curvlib.demo``.

Every option is checked before any work (bad values end the run within a
second with the option named), every option's help shows its default, and
``--quick`` runs a reduced configuration. JAX's persistent compilation cache
is on by default (``--no-compilation-cache`` turns it off), so a second run on
the same machine skips most compilation.
"""

from __future__ import annotations

import argparse
import os
import sys

from curvlib.demo.probe import ProbeConfig, run_probe
from curvlib.demo.spectrum import SpectrumConfig, run_spectrum

# --quick: the same pipeline at a size that runs in seconds (explicit flags still win)
QUICK = dict(train_steps=100, dims=(1, 4, 8), num_sigmas=5, num_samples=8, full_samples=8,
             basis_size=24, sample_batch_size=40, timing_repeats=1, hidden=16, top_k=5,
             mlp_steps=100)


def float_list(s: str) -> tuple:
    return tuple(float(x) for x in s.split(",") if x.strip())


def int_list(s: str) -> tuple:
    return tuple(int(x) for x in s.split(",") if x.strip())


def default_cache_dir() -> str:
    """``$CURVLIB_CACHE_DIR``, or ``curvlib/jax`` under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    if os.environ.get("CURVLIB_CACHE_DIR"):
        return os.environ["CURVLIB_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "curvlib", "jax")


def enable_compilation_cache(path: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache in ``path``; returns the folder used.

    Uses ``curvlib.enable_compilation_cache`` when the library provides it;
    otherwise sets ``jax_compilation_cache_dir`` and caches every program
    (no minimum compile time or size), which is what a short demo needs.
    """
    import curvlib

    path = path or default_cache_dir()
    lib = getattr(curvlib, "enable_compilation_cache", None)
    if lib is not None:
        return lib(path) or path
    import jax

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def build_parser() -> argparse.ArgumentParser:
    """The demo's argument parser: the common options, then one group per stage."""
    p = argparse.ArgumentParser(
        prog="python -m curvlib.demo",
        description=(
            "Delta2(D) probe of a small decoder-only transformer trained on the Python "
            "documentation (pydoc_data, offline): Delta1, full-space Delta2 and Delta2(D) by "
            "closed form, quadratic MC and direct MC over a sigma grid and nested D, with "
            "stage timings. Writes JSON and a PNG. '--task spectrum' runs the foundation "
            "demo instead (Hessian eigenvalues and spectral density of an MLP on digits). "
            "Every option is checked before any work."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a flag is spelled out: the checks see what was given
    )
    dc, sc = ProbeConfig(), SpectrumConfig()
    _add_common_options(p, dc)
    _add_training_options(p, dc)
    _add_probe_options(p, dc)
    _add_spectrum_options(p, sc)
    return p


def _add_common_options(p: argparse.ArgumentParser, dc: ProbeConfig) -> None:
    """Add the task, output, seed, plot and compilation-cache options."""
    p.add_argument("--task", choices=("delta2", "spectrum"), default="delta2",
                   help="delta2: the transformer probe; spectrum: eigsh + SLQ of an MLP")
    p.add_argument("--quick", action="store_true",
                   help="reduced run for a first look: "
                   + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                   + " (explicit options still apply)")
    p.add_argument("--out", default=dc.out, help="output folder for JSON and PNG")
    p.add_argument("--seed", type=int, default=dc.seed, help="seed of training, data and probes")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-compilation-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache")
    p.add_argument("--compilation-cache-dir", default=argparse.SUPPRESS,
                   help="folder of the persistent compilation cache (default: "
                   "$CURVLIB_CACHE_DIR, else ~/.cache/curvlib/jax)")


def _add_training_options(p: argparse.ArgumentParser, dc: ProbeConfig) -> None:
    """Add the delta2 task's transformer and training options."""
    g = p.add_argument_group("model and training (delta2)")
    g.add_argument("--d-model", type=int, default=dc.d_model,
                   help="transformer width (a multiple of --heads)")
    g.add_argument("--layers", type=int, default=dc.num_layers, help="transformer blocks")
    g.add_argument("--heads", type=int, default=dc.num_heads, help="attention heads")
    g.add_argument("--seq-len", type=int, default=dc.seq_len,
                   help="tokens per sample (one sample = one sequence)")
    g.add_argument("--train-steps", type=int, default=dc.train_steps, help="AdamW steps (>= 1)")
    g.add_argument("--batch-size", type=int, default=dc.batch_size,
                   help="training sequences per step")
    g.add_argument("--learning-rate", type=float, default=dc.learning_rate,
                   help="peak learning rate (warmup-cosine schedule)")


def _add_probe_options(p: argparse.ArgumentParser, dc: ProbeConfig) -> None:
    """Add the delta2 task's probe options (k, D, sigma grid, samples)."""
    g = p.add_argument_group("probe (delta2)")
    g.add_argument("--k", type=int, default=dc.k, help="sample count k (sequences in L_k)")
    g.add_argument("--dims", type=int_list, default=dc.dims,
                   help="nested subspace dimensions D, increasing, comma separated")
    g.add_argument("--sigma-min", type=float, default=dc.sigma_min,
                   help="smallest probe scale sigma (> 0)")
    g.add_argument("--sigma-max", type=float, default=dc.sigma_max,
                   help="largest probe scale sigma (> --sigma-min)")
    g.add_argument("--num-sigmas", type=int, default=dc.num_sigmas,
                   help="size of the log-spaced sigma grid")
    g.add_argument("--num-samples", type=int, default=dc.num_samples,
                   help="antithetic pairs per sigma for the subspace MC estimators (>= 2)")
    g.add_argument("--full-samples", type=int, default=dc.full_samples,
                   help="antithetic pairs per sigma for full-space Delta2 (>= 2)")
    g.add_argument("--basis-size", "--num-matvecs", dest="basis_size", type=int,
                   default=dc.basis_size,
                   help="Lanczos basis size (> max D; --num-matvecs is its old name)")
    g.add_argument("--eig-tol", type=float, default=dc.eig_tol,
                   help="eigsh relative residual tolerance")
    g.add_argument("--microbatch-size", type=int, default=None,
                   help="chunk size over the samples (bounds memory for large k)")
    g.add_argument("--sample-batch-size", type=int, default=dc.sample_batch_size,
                   help="Monte Carlo evaluations per vectorised chunk")
    g.add_argument("--timing-repeats", type=int, default=dc.timing_repeats,
                   help="repeats of the sub-millisecond stages when timing them")
    g.add_argument("--no-overlap", action="store_true",
                   help="skip the subspace at k+1 (principal angles)")


def _add_spectrum_options(p: argparse.ArgumentParser, sc: SpectrumConfig) -> None:
    """Add the spectrum task's MLP options."""
    g = p.add_argument_group("spectrum task")
    g.add_argument("--hidden", type=int, default=sc.hidden, help="MLP hidden width")
    g.add_argument("--top-k", type=int, default=sc.top_k, help="top Hessian eigenvalues")
    g.add_argument("--mlp-steps", type=int, default=sc.train_steps,
                   help="MLP training steps (>= 1)")


def _given(parser: argparse.ArgumentParser, argv) -> dict:
    """``dest -> flag`` of the options written on the command line (not defaulted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    words = {w.split("=", 1)[0] for w in argv if w.startswith("--")}
    return {act.dest: flag for act in parser._actions for flag in act.option_strings
            if flag in words}


def _task_options(parser: argparse.ArgumentParser) -> dict:
    """``dest -> task`` of the options that belong to one task (their group's title)."""
    out = {}
    for group in parser._action_groups:
        task = ("delta2" if "(delta2)" in (group.title or "") else
                "spectrum" if "spectrum" in (group.title or "") else None)
        if task is not None:
            out.update({act.dest: task for act in group._group_actions})
    return out


def _check_paths_and_combinations(parser, a, argv) -> None:
    """The output and cache folders usable, and no option that the run would ignore."""
    given = _given(parser, argv)
    for dest, task in _task_options(parser).items():
        if dest in given and task != a.task:
            raise ValueError(f"{given[dest]} applies to --task {task} only (this run: "
                             f"--task {a.task}).")
    if a.no_compilation_cache and "compilation_cache_dir" in given:
        raise ValueError("--compilation-cache-dir and --no-compilation-cache contradict "
                         "each other: pass one.")
    if a.task == "delta2" and a.num_sigmas == 1 and "sigma_max" in given:
        raise ValueError("with --num-sigmas 1 the grid is --sigma-min alone: --sigma-max "
                         "would be ignored.")
    _usable_folder(a.out, "--out")
    if not a.no_compilation_cache:
        cache = getattr(a, "compilation_cache_dir", None)  # (an empty one is refused)
        _usable_folder(default_cache_dir() if cache is None else cache,
                       "--compilation-cache-dir" if cache is not None else
                       "the compilation cache folder ($CURVLIB_CACHE_DIR or ~/.cache/curvlib/jax;"
                       " --no-compilation-cache turns it off)")


def _usable_folder(path: str, name: str) -> None:
    """``path`` is a writable folder, or one that can be created (nothing is created here)."""
    if not path:
        raise ValueError(f"{name} must name a folder; got {path!r}.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} {path!r} exists and is not a folder.")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):  # the nearest existing ancestor holds the new folders
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{name} {path!r} cannot be created: {parent!r} is not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path!r} is not writable ({parent!r}).")


def parse_config(argv=None, parser: argparse.ArgumentParser | None = None):
    """``(args, config)`` with every option checked; bad input exits via ``parser.error``.

    Checked before any work: every value of the task's options, the output and
    compilation-cache folders (writable, or creatable where they do not exist), and
    options the run would ignore (another task's, a cache folder with
    ``--no-compilation-cache``, ``--sigma-max`` with a one-point grid).
    """
    parser = parser or build_parser()
    a = parser.parse_args(argv)
    if a.quick:
        parser.set_defaults(**QUICK)
        a = parser.parse_args(argv)
    try:
        if a.task == "spectrum":
            cfg = SpectrumConfig(hidden=a.hidden, train_steps=a.mlp_steps, top_k=a.top_k,
                                 seed=a.seed, out=a.out, plot=not a.no_plot)
            cfg.validate()
        else:
            cfg = ProbeConfig(d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                              seq_len=a.seq_len, train_steps=a.train_steps,
                              batch_size=a.batch_size, learning_rate=a.learning_rate, k=a.k,
                              dims=tuple(a.dims), sigma_min=a.sigma_min,
                              sigma_max=a.sigma_max, num_sigmas=a.num_sigmas,
                              num_samples=a.num_samples, full_samples=a.full_samples,
                              basis_size=a.basis_size, eig_tol=a.eig_tol,
                              microbatch_size=a.microbatch_size,
                              sample_batch_size=a.sample_batch_size,
                              timing_repeats=a.timing_repeats, next_subspace=not a.no_overlap,
                              seed=a.seed, out=a.out, plot=not a.no_plot)
            cfg.validate()
        _check_paths_and_combinations(parser, a, argv)
    except ValueError as e:
        parser.error(str(e))
    return a, cfg


def main(argv=None) -> dict:
    """Run the demo; returns the report dict.

    Args:
      argv: the command line (without the program name); ``None`` reads
        ``sys.argv``. ``main(["--help"])`` lists every option with its default.

    Returns:
      The report (the dict the JSON file holds).

    Examples:
      >>> from curvlib.demo import main
      >>> report = main(["--quick", "--out", "demo_output"])  # doctest: +SKIP

      Every option is checked before any work starts:

      >>> import contextlib, io
      >>> err = io.StringIO()
      >>> with contextlib.redirect_stderr(err):
      ...     main(["--num-sigmas", "0"])
      Traceback (most recent call last):
      SystemExit: 2
      >>> print(err.getvalue().splitlines()[-1])
      python -m curvlib.demo: error: ...--num-sigmas... got 0.
    """
    a, cfg = parse_config(argv)
    if not a.no_compilation_cache:
        enable_compilation_cache(getattr(a, "compilation_cache_dir", None))
    if a.task == "spectrum":
        return run_spectrum(cfg)
    return run_probe(cfg)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
