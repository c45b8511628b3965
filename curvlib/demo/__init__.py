"""``python -m curvlib.demo``: the Delta2(D) probe of a small transformer, and a spectrum demo.

* `curvlib.demo.data` — offline data: the Python documentation text
  (``pydoc_data``, shipped with CPython) and scikit-learn's bundled digits;
* `curvlib.demo.models` — a flax decoder-only transformer and an MLP, their
  mean losses, and a compiled training loop (reused by the benchmarks);
* `curvlib.demo.probe` — the transformer probe (the default task), its
  options (`ProbeConfig`, checked before any work)
  and its stages: the closed-form route as eager calls (answered on their first call),
  the Monte Carlo estimators compiled in a background thread while the model trains;
* `curvlib.demo.spectrum` — top Hessian eigenvalues and spectral density
  (``--task spectrum``);
* `curvlib.demo.report` — console tables (100 columns) and figures;
* `curvlib.demo.cli` — the command line (``--help``, ``--quick``, the
  persistent compilation cache).

Needs the ``demo`` extra (flax, scikit-learn, matplotlib, tqdm).
"""

from curvlib.demo.cli import main

__all__ = ["main"]
