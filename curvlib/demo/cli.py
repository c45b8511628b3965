"""Command line of ``python -m curvlib.demo``."""

from __future__ import annotations

import argparse
import sys

from curvlib.demo.probe import ProbeConfig, run_probe
from curvlib.demo.spectrum import SpectrumConfig, run_spectrum


def _floats(s):
    return tuple(float(x) for x in s.split(",") if x)


def _ints(s):
    return tuple(int(x) for x in s.split(",") if x)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m curvlib.demo",
        description=(
            "Delta2(D) probe of a small decoder-only transformer trained on the Python "
            "documentation (pydoc_data, offline): Delta1, full-space Delta2 and Delta2(D) by "
            "closed form, quadratic MC and direct MC over a sigma grid and D in {1,4,16}, "
            "with stage timings. Writes JSON and a PNG. '--task spectrum' runs the foundation "
            "demo instead (Hessian eigenvalues and spectral density of an MLP on digits)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    dc, sc = ProbeConfig(), SpectrumConfig()
    p.add_argument("--task", choices=("delta2", "spectrum"), default="delta2",
                   help="delta2: the transformer probe; spectrum: eigsh + SLQ of an MLP")
    p.add_argument("--out", default=dc.out, help="output folder for JSON and PNG")
    p.add_argument("--seed", type=int, default=dc.seed)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    g = p.add_argument_group("model and training (delta2)")
    g.add_argument("--d-model", type=int, default=dc.d_model)
    g.add_argument("--layers", type=int, default=dc.num_layers)
    g.add_argument("--heads", type=int, default=dc.num_heads)
    g.add_argument("--seq-len", type=int, default=dc.seq_len, help="tokens per sample")
    g.add_argument("--train-steps", type=int, default=dc.train_steps)
    g.add_argument("--batch-size", type=int, default=dc.batch_size)
    g = p.add_argument_group("probe (delta2)")
    g.add_argument("--k", type=int, default=dc.k, help="sample count k (sequences in L_k)")
    g.add_argument("--dims", type=_ints, default=dc.dims, help="nested D, comma separated")
    g.add_argument("--sigma-min", type=float, default=dc.sigma_min)
    g.add_argument("--sigma-max", type=float, default=dc.sigma_max)
    g.add_argument("--num-sigmas", type=int, default=dc.num_sigmas, help="log-spaced grid size")
    g.add_argument("--num-samples", type=int, default=dc.num_samples,
                   help="antithetic pairs per sigma for the subspace MC estimators")
    g.add_argument("--full-samples", type=int, default=dc.full_samples,
                   help="antithetic pairs per sigma for full-space Delta2")
    g.add_argument("--num-matvecs", type=int, default=dc.num_matvecs, help="Lanczos basis size")
    g.add_argument("--eig-tol", type=float, default=dc.eig_tol, help="eigsh relative tolerance")
    g.add_argument("--microbatch-size", type=int, default=None,
                   help="chunk size over the k samples (large k)")
    g.add_argument("--sample-batch-size", type=int, default=dc.sample_batch_size,
                   help="MC evaluations per vectorised chunk")
    g.add_argument("--no-overlap", action="store_true",
                   help="skip the subspace at k+1 (principal angles)")
    g = p.add_argument_group("spectrum task")
    g.add_argument("--hidden", type=int, default=sc.hidden)
    g.add_argument("--top-k", type=int, default=sc.top_k)
    g.add_argument("--mlp-steps", type=int, default=sc.train_steps)
    return p


def main(argv=None) -> dict:
    """Run the demo; returns the report dict."""
    a = build_parser().parse_args(argv)
    if a.task == "spectrum":
        cfg = SpectrumConfig(hidden=a.hidden, train_steps=a.mlp_steps, top_k=a.top_k,
                             seed=a.seed, out=a.out, plot=not a.no_plot)
        return run_spectrum(cfg)
    cfg = ProbeConfig(d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                      seq_len=a.seq_len, train_steps=a.train_steps, batch_size=a.batch_size,
                      k=a.k, dims=a.dims, sigma_min=a.sigma_min, sigma_max=a.sigma_max,
                      num_sigmas=a.num_sigmas, num_samples=a.num_samples,
                      full_samples=a.full_samples, num_matvecs=a.num_matvecs, eig_tol=a.eig_tol,
                      microbatch_size=a.microbatch_size, sample_batch_size=a.sample_batch_size,
                      next_subspace=not a.no_overlap, seed=a.seed, out=a.out,
                      plot=not a.no_plot)
    return run_probe(cfg)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
