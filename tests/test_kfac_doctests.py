"""The Examples sections of ``curvlib.kronecker`` run as tests (float64 on, as in the suite).

``testpaths`` only collects ``tests/``, so ``--doctest-modules`` never reaches
``curvlib/``; the examples are written to print the same under float32 and float64.
"""

import doctest
import importlib

import pytest

MODULES = [
    "curvlib.kronecker.discovery",
    "curvlib.kronecker.curvature",
    "curvlib.kronecker.transform",
    "curvlib.kronecker.report",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name):
    module = importlib.import_module(name)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(module, optionflags=flags, report=True)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
