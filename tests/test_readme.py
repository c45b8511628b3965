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


def section_blocks(title: str) -> list[str]:
    """The fenced ``python`` blocks of the README section headed ``title`` (any level)."""
    text = README.read_text()
    head = re.search(rf"^(#+) {re.escape(title)}\s*$", text, flags=re.M)
    assert head, f"README has no section {title!r}"
    level = len(head.group(1))
    rest = text[head.end():]
    nxt = re.search(rf"^#{{1,{level}}} ", rest, flags=re.M)
    body = rest[: nxt.start()] if nxt else rest
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.M | re.S)


_FLAX_CHECKS = """\
import numpy as np
# what the section promises: one history row per refresh, real curvature numbers
np.testing.assert_array_equal(h["step"], [0, 5, 10, 15])
assert np.all(np.isfinite(h["sharpness"]))
assert len(set(np.round(h["loss"], 8))) == 4
assert bool(top.converged)
info = curvlib.curvature_info(state.opt_state)
assert int(info.num_refreshes) == 2 and int(state.step) == 10
print("README flax section: checks passed")"""


def test_section_extraction_sees_the_blocks_a_reader_sees():
    """The section extractor sees each section's blocks (and fails on a missing section)."""
    assert len(section_blocks("Second-order steps inside your optax loop")) == 2
    assert len(section_blocks("Flax nnx and linen")) == 3
    assert set(section_blocks("Flax nnx and linen")) <= set(python_blocks())
    with pytest.raises(AssertionError, match="no section"):
        section_blocks("A section that does not exist")


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
    # what the flax section promises, checked right after its last block
    flax_end = blocks.index(section_blocks("Flax nnx and linen")[-1])
    nb.cells.insert(flax_end + 1, nbformat.v4.new_code_cell(_FLAX_CHECKS))
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
    for needle in ("'w1': Array(", "Delta", "K-FAC: 2 Kronecker-factored layers",
                   "README flax section: checks passed"):
        assert needle in text, f"{needle!r} not printed:\n{text[-3000:]}"
    before, after = map(float, re.search(r"K-FAC loss (\S+) -> (\S+)", text).groups())
    assert after < 0.5 * before, (before, after)
