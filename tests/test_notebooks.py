"""Notebooks run end to end at reduced size (``CURVLIB_NOTEBOOK_QUICK=1``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


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


def test_second_order_optimizers_notebook():
    nb = _execute("second_order_optimizers.ipynb")
    text = "".join(
        out.get("text", "")
        for cell in nb.cells if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "quick=True" in text
    for name in ("adam(1e-2)", "optax.lbfgs", "newton_cg (GGN)", "bfgs", "svrg"):
        assert name in text
    assert "accepted" in text


def test_edge_of_stability_notebook():
    nb = _execute("edge_of_stability.ipynb")
    outputs = [out for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", [])]
    text = "".join(out.get("text", "") for out in outputs)
    assert "quick=True" in text
    assert "late sharpness / (2/eta)" in text  # the cell asserting the +-15% band ran
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 2  # the figures


def test_delta2_transformer_notebook():
    nb = _execute("delta2_transformer.ipynb")
    text = "".join(
        out.get("text", "")
        for cell in nb.cells if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "quick mode: True" in text
    for needle in ("k-curve in", "largest principal angle", "signed top eigenvalues",
                   "GM speed-up over direct MC"):
        assert needle in text
