"""The README's optimizer and flax sections run verbatim; the flax notebook runs end to end.

Each README section's fenced ``python`` blocks are extracted from the file and
executed in order in one fresh namespace, exactly as written (no edits, no
mocks): a snippet that drifts from the library fails here. The notebook
``notebooks/flax_nnx_and_linen.ipynb`` runs at reduced size
(``CURVLIB_NOTEBOOK_QUICK=1``) and must print its checks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

SECTIONS = ["Second-order steps inside your optax loop", "Flax nnx and linen"]


def readme_section_blocks(title: str) -> list[str]:
    """The fenced ``python`` blocks of the README section headed ``title`` (any level)."""
    text = README.read_text()
    head = re.search(rf"^(#+) {re.escape(title)}\s*$", text, flags=re.M)
    assert head, f"README has no section {title!r}"
    level = len(head.group(1))
    rest = text[head.end():]
    nxt = re.search(rf"^#{{1,{level}}} ", rest, flags=re.M)
    body = rest[: nxt.start()] if nxt else rest
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.M | re.S)


def test_extraction_finds_every_block():
    """The extractor sees the blocks a reader sees (and fails on a missing section)."""
    assert len(readme_section_blocks(SECTIONS[0])) == 2
    assert len(readme_section_blocks(SECTIONS[1])) == 3
    with pytest.raises(AssertionError, match="no section"):
        readme_section_blocks("A section that does not exist")


@pytest.mark.parametrize("title", SECTIONS)
def test_readme_section_runs_verbatim(title):
    if title.startswith("Flax"):
        pytest.importorskip("flax.nnx")
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(readme_section_blocks(title)):
        code = compile(block, f"README.md[{title}][{i}]", "exec")
        exec(code, namespace)  # noqa: S102  (the README's own code)
    if title.startswith("Flax"):
        # what the section promises: one history row per refresh, real curvature numbers
        np.testing.assert_array_equal(namespace["h"]["step"], [0, 5, 10, 15])
        assert np.all(np.isfinite(namespace["h"]["sharpness"]))
        assert len(set(np.round(namespace["h"]["loss"], 8))) == 4
        assert bool(namespace["top"].converged)
        info = namespace["curvlib"].curvature_info(namespace["state"].opt_state)
        assert int(info.num_refreshes) == 2 and int(namespace["state"].step) == 10


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
