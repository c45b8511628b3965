"""Layer 3: K-FAC, Kronecker-factored curvature without layer tags, and the optax transform.

Built on the base only (``curvlib._tree``, ``_validate``, ``_loss``): it computes its
own curvature factors and needs neither the operators nor the Krylov algorithms.
"""

from curvlib.kronecker.curvature import Factors, KfacCurvature, kfac_curvature
from curvlib.kronecker.discovery import Fallback, KfacLayers, Layer, find_layers
from curvlib.kronecker.report import format_layers
from curvlib.kronecker.transform import (
    KfacInfo,
    KfacStatistics,
    KfacTransformation,
    ScaleByKfacState,
    kfac,
    scale_by_kfac,
)

__all__ = [
    "find_layers",
    "format_layers",
    "KfacLayers",
    "Layer",
    "Fallback",
    "kfac_curvature",
    "KfacCurvature",
    "Factors",
    "scale_by_kfac",
    "kfac",
    "ScaleByKfacState",
    "KfacInfo",
    "KfacStatistics",
    "KfacTransformation",
]
