"""The README's optimizer and flax sections run verbatim; the flax notebook runs end to end.

Each README section's fenced ``python`` blocks are extracted from the file and
executed in order in one fresh namespace, exactly as written (no edits, no
mocks): a snippet that drifts from the library fails here. The notebook
``notebooks/flax_nnx_and_linen.ipynb`` runs at reduced size
(``CURVLIB_NOTEBOOK_QUICK=1``) and must print its checks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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


_FLAX_CHECKS = """
import numpy as np
# what the section promises: one history row per refresh, real curvature numbers
np.testing.assert_array_equal(h["step"], [0, 5, 10, 15])
assert np.all(np.isfinite(h["sharpness"]))
assert len(set(np.round(h["loss"], 8))) == 4
assert bool(top.converged)
info = curvlib.curvature_info(state.opt_state)
assert int(info.num_refreshes) == 2 and int(state.step) == 10
print("README flax section: checks passed")
"""


@pytest.mark.parametrize("title", SECTIONS)
def test_readme_section_runs_verbatim(title):
    blocks = readme_section_blocks(title)
    if title.startswith("Flax"):
        pytest.importorskip("flax.nnx")
        # In a fresh interpreter: late in a long xdist worker, compiling this section's
        # programs crashed the worker inside XLA:CPU (jaxlib 0.10.2; twice in three full
        # runs, never on its own), and a crashed worker stalls `--dist loadfile`.
        script = "\n".join(["import jax", "jax.config.update('jax_enable_x64', True)",
                            *blocks, _FLAX_CHECKS])
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             cwd=ROOT, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "checks passed" in out.stdout
        return
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        code = compile(block, f"README.md[{title}][{i}]", "exec")
        exec(code, namespace)  # noqa: S102  (the README's own code)


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
