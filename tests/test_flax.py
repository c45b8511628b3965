"""The flax notebook runs end to end.

The notebook ``notebooks/flax_nnx_and_linen.ipynb`` runs at reduced size
(``CURVLIB_NOTEBOOK_QUICK=1``) and must print its checks. The README's flax and
optimizer sections run verbatim, with the flax section's promises checked, in
``tests/test_readme.py`` (every README block, in order, in one kernel).
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

def _execute(name: str, timeout: int = 900):
    """Run ``notebooks/<name>`` in a fresh kernel in quick mode; the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CURVLIB_NOTEBOOK_QUICK", "1")  # the kernel inherits the environment
        nbclient.NotebookClient(
            nb, timeout=timeout, kernel_name="python3",
            resources={"metadata": {"path": str(ROOT / "notebooks")}},
        ).execute()
    return nb


def test_flax_notebook_runs():
    pytest.importorskip("flax.nnx")
    nb = _execute("flax_nnx_and_linen.ipynb")
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []))
    assert "quick=True" in text
    for needle in ("nnx top-3 eigenvalues", "linen top-3 eigenvalues", "history rows",
                   "newton_cg (GGN)", "all checks passed"):
        assert needle in text, needle
