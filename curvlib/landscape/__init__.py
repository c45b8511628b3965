"""Layer 3: ``Delta_2^(D)``, curvature-aligned probing of loss-landscape stabilisation.

Built on [`curvlib.operators`][curvlib.operators] (``hessian_matvec``),
[`curvlib.krylov`][curvlib.krylov] (``eigsh``) and the base.

How much does the empirical loss surface near a trained point still move when
one more sample is added? ``curvlib.landscape`` measures the increment field
``L_{k+1}(w) - L_k(w)`` with the criteria of Kiselev & Grabovoy (2026):

* [`curvature_subspace`][curvlib.landscape.curvature_subspace] — the top-``D`` (signed, algebraic)
  eigenpairs of ``H^(k)`` by thick-restart Lanczos on Hessian-vector products;
* [`increment_coefficients`][curvlib.landscape.increment_coefficients] — the local quadratic model
  ``(a, c, B)``;
* estimators: [`delta2_closed_form`][curvlib.landscape.delta2_closed_form] (+
  [`delta2_closed_form_terms`][curvlib.landscape.delta2_closed_form_terms]),
  [`delta2_quadratic_mc`][curvlib.landscape.delta2_quadratic_mc],
  [`delta2_direct_mc`][curvlib.landscape.delta2_direct_mc],
  [`delta2_full_mc`][curvlib.landscape.delta2_full_mc], [`delta1`][curvlib.landscape.delta1],
  [`delta2_spectral`][curvlib.landscape.delta2_spectral],
  [`delta2_bound`][curvlib.landscape.delta2_bound];
* [`k_curve`][curvlib.landscape.k_curve] — the whole curve over ``k`` (a
  [`KCurve`][curvlib.landscape.KCurve]), with the principal angles between consecutive subspaces;
  [`curvlib.landscape.report`][curvlib.landscape.report] turns it into tables, JSON and a log-log
  plot.

Data convention: ``loss_fn(params, batch)`` is the mean loss over the leading
axis of ``batch``; ``data`` is a pytree whose leading axis is the sample order;
``L_k(w) = loss_fn(w, data[:k])``. The sample count ``k`` is data, not shape:
every compiled program serves all ``k``. Compiled programs are cached by
the program ``loss_fn`` computes (its text and constants: small arrays and NumPy
arrays by value, large JAX arrays by identity), the shapes and the static
options, so an eager call repeated with the same loss costs only its run time,
a fresh closure computing the same thing included.

The criteria, for ``w`` drawn from a probe law ``q`` concentrated at ``w*``:

    Delta_p(k+1) = E_{w ~ q} |L_{k+1}(w) - L_k(w)|^p
    Delta_1:       p = 1, q = point mass at w*
    Delta_2:       p = 2, w = w* + e,      e ~ N(0, sigma^2 I_N)
    Delta_2^(D):   p = 2, w = w* + U_D z,  z ~ N(0, sigma^2 I_D)

with ``U_D`` the orthonormal top-``D`` (algebraic) eigenvectors of ``H^(k)``,
the Hessian of ``L_k``. Around ``w*`` the increment is modelled as
``a + c^T z + z^T B z / 2`` in subspace coordinates, and its Gaussian moment is
``a^2 + sigma^2 (a tr B + ||c||^2) + sigma^4 (2 tr B^2 + (tr B)^2) / 4``.
``docs/landscape.md`` has the full mathematics, the stated bound and the
facts the tests check.

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
from curvlib.landscape.curve import KCurve, KCurveConfig, curve_slopes, fit_slope, k_curve
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
from curvlib.landscape.report import curve_table, curve_to_dict, plot_curve, save_curve_json
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
    "KCurveConfig",
    "k_curve",
    "fit_slope",
    "curve_slopes",
    "curve_table",
    "curve_to_dict",
    "save_curve_json",
    "plot_curve",
]
