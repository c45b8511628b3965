"""The foundation's docstring examples run as tests in the default ``pytest`` run.

``testpaths`` only collects ``tests/``, so ``--doctest-modules`` never reaches
``curvlib/``; this file runs the Examples sections of the operator and Krylov
modules explicitly (they are written to print the same under float32 and float64).
"""

import doctest
import importlib

import pytest

MODULES = [
    "curvlib.operators",
    "curvlib.krylov.tridiag",
    "curvlib.krylov.eigen",
    "curvlib.krylov.density",
    "curvlib.krylov.power",
    "curvlib.krylov.cg",
    "curvlib.krylov.stochastic",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name):
    module = importlib.import_module(name)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(module, optionflags=flags, report=True)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
