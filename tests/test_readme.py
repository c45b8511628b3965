"""README.md runs as a notebook: every fenced ``python`` block, in order, in one kernel.

A reader copies the README's examples top to bottom into one notebook; this test does exactly
that (one cell per block, a fresh kernel, no edits, no mocks), so a block that uses a name an
earlier block redefined, or a name no block defines, fails here. ``bash`` blocks are not
Python and are not run. The compilation-cache block runs too, with ``CURVLIB_CACHE_DIR``
pointing into a temporary directory (the kernel inherits the environment), so nothing is
written to the home directory; the kernel's working directory is temporary as well.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", flags=re.M | re.S)


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of the README, in order."""
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(README.read_text())]


def python_blocks() -> list[str]:
    return [code for lang, code in readme_blocks() if lang == "python"]


def test_extraction_sees_every_fenced_block():
    """Every fence is a ``python`` or a ``bash`` block (an unlabelled fence would be skipped
    silently), and the Python blocks are the ones a reader sees."""
    blocks = readme_blocks()
    assert {lang for lang, _ in blocks} == {"python", "bash"}
    assert README.read_text().count("```python\n") == len(python_blocks()) >= 10


def test_readme_runs_as_one_notebook(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("flax.nnx")
    blocks = python_blocks()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code.rstrip("\n")) for code in blocks]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CURVLIB_CACHE_DIR", str(tmp_path / "jax_cache"))
        client = nbclient.NotebookClient(
            nb, timeout=1200, kernel_name="python3",
            resources={"metadata": {"path": str(tmp_path)}})
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as err:
            index = next((i for i, c in enumerate(nb.cells)
                          if any(o.get("output_type") == "error" for o in c.get("outputs", []))),
                         None)
            message = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # IPython's colours
            pytest.fail(f"README python block {index} (of {len(blocks)}) failed:\n{message}")
    # the cache block honoured CURVLIB_CACHE_DIR: nothing went to the home directory
    assert (tmp_path / "jax_cache").is_dir()
    text = "".join(out.get("text", "") for cell in nb.cells
                   for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    # the printed results the README promises (one per section that prints)
    for needle in ("'w1': Array(", "Delta", "K-FAC: 2 Kronecker-factored layers"):
        assert needle in text, f"{needle!r} not printed:\n{text[-3000:]}"
    before, after = map(float, re.search(r"K-FAC loss (\S+) -> (\S+)", text).groups())
    assert after < 0.5 * before, (before, after)
