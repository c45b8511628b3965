"""Notebooks run end to end at reduced size (``CURVLIB_NOTEBOOK_QUICK=1``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


class NotebookCase(NamedTuple):
    """One notebook and what its quick run must print or draw."""

    name: str
    quick_marker: str  # the notebook's own report that it ran in quick mode
    needles: tuple[str, ...]  # strings its text output must contain
    min_figures: int = 0  # image/png outputs it must produce


CASES = [
    NotebookCase(
        "second_order_optimizers.ipynb",
        "quick=True",
        ("adam(1e-2)", "optax.lbfgs", "newton_cg (GGN)", "bfgs", "svrg", "accepted"),
    ),
    NotebookCase(
        "edge_of_stability.ipynb",
        "quick=True",
        # the cell asserting the +-15% band ran
        ("late sharpness / (2/eta)",),
        min_figures=2,
    ),
    NotebookCase(
        "delta2_transformer.ipynb",
        "quick mode: True",
        ("k-curve in", "largest principal angle", "signed top eigenvalues",
         "GM speed-up over direct MC"),
    ),
    NotebookCase(
        "influence_functions.ipynb",
        "quick mode: True",
        # the dense-solve check and the leave-one-out comparison (its cell asserts r > 0.95)
        ("inverse_matvec vs numpy.linalg.solve", "leave-one-out retrainings",
         "Pearson correlation, Hessian influence vs leave-one-out retraining"),
        min_figures=1,
    ),
    NotebookCase(
        "kfac_autoencoder.ipynb",
        "quick mode: True",
        ("Kronecker-factored layer", "steps to target", "between refreshes",
         "max |curvlib - kfac-jax|"),
        min_figures=1,
    ),
]


def _execute(name: str, timeout: int = 600):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = os.environ.get("CURVLIB_NOTEBOOK_QUICK")
    os.environ["CURVLIB_NOTEBOOK_QUICK"] = "1"  # the kernel inherits the environment
    try:
        client = nbclient.NotebookClient(
            nb, timeout=timeout, kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        )
        client.execute()
    finally:
        if old is None:
            os.environ.pop("CURVLIB_NOTEBOOK_QUICK", None)
        else:
            os.environ["CURVLIB_NOTEBOOK_QUICK"] = old
    return nb


@pytest.mark.parametrize("case", CASES, ids=[c.name.removesuffix(".ipynb") for c in CASES])
def test_notebook(case: NotebookCase):
    nb = _execute(case.name)
    outputs = [out for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", [])]
    text = "".join(out.get("text", "") for out in outputs)
    assert case.quick_marker in text
    for needle in case.needles:
        assert needle in text
    figures = sum("image/png" in out.get("data", {}) for out in outputs)
    assert figures >= case.min_figures  # the figures
