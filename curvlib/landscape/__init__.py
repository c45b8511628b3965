"""Layer 3: ``Delta_2^(D)``, curvature-aligned probing of loss-landscape stabilisation.

How much does the empirical loss surface near a trained point still move when
one more sample is added? ``curvlib.landscape`` measures the increment field
``L_{k+1}(w) - L_k(w)`` with the criteria of Kiselev & Grabovoy (2026):

* :func:`curvature_subspace` — the top-``D`` (signed, algebraic) eigenpairs of
  ``H^(k)`` by thick-restart Lanczos on Hessian-vector products;
* :func:`increment_coefficients` — the local quadratic model ``(a, c, B)``;
* estimators: :func:`delta2_closed_form` (+ :func:`delta2_closed_form_terms`),
  :func:`delta2_quadratic_mc`, :func:`delta2_direct_mc`, :func:`delta2_full_mc`,
  :func:`delta1`, :func:`delta2_spectral`, :func:`delta2_bound`;
* :func:`k_curve` — the whole curve over ``k``, with tables, JSON, a log-log plot
  and the principal angles between consecutive subspaces.

Data convention: ``loss_fn(params, batch)`` is the mean loss over the leading
axis of ``batch``; ``data`` is a pytree whose leading axis is the sample order;
``L_k(w) = loss_fn(w, data[:k])``. The mathematics: ``shared/spec/delta2.md``.

References:
  N. Kiselev and A. Grabovoy, *Curvature-Aligned Probing for Local Loss-Landscape
  Stabilization*, arXiv:2604.14870 (2026).
"""

from curvlib.landscape.coefficients import (
    IncrementCoefficients,
    check_mean_loss,
    increment_coefficients,
    loss_increment,
)
from curvlib.landscape.curve import (
    KCurve,
    curve_slopes,
    curve_table,
    curve_to_dict,
    fit_slope,
    k_curve,
    plot_curve,
    save_curve_json,
)
from curvlib.landscape.estimators import (
    ClosedFormTerms,
    MonteCarloEstimate,
    delta1,
    delta2_bound,
    delta2_closed_form,
    delta2_closed_form_terms,
    delta2_direct_mc,
    delta2_full_mc,
    delta2_quadratic_mc,
    delta2_spectral,
    subspace_normals,
)
from curvlib.landscape.subspace import curvature_subspace, principal_angles

__all__ = [
    # subspace
    "curvature_subspace",
    "principal_angles",
    # coefficients
    "IncrementCoefficients",
    "increment_coefficients",
    "loss_increment",
    "check_mean_loss",
    # estimators
    "ClosedFormTerms",
    "MonteCarloEstimate",
    "delta1",
    "delta2_bound",
    "delta2_closed_form",
    "delta2_closed_form_terms",
    "delta2_direct_mc",
    "delta2_full_mc",
    "delta2_quadratic_mc",
    "delta2_spectral",
    "subspace_normals",
    # the k-curve
    "KCurve",
    "k_curve",
    "fit_slope",
    "curve_slopes",
    "curve_table",
    "curve_to_dict",
    "save_curve_json",
    "plot_curve",
]
