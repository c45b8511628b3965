"""The Examples sections of every operator module run as tests (with their imports).

``tests/test_foundation_doctests.py`` runs the package docstring of
``curvlib.operators``; the functions live in its submodules, run here.
"""

import doctest
import importlib

import pytest

MODULES = [
    "curvlib.operators.hessian",
    "curvlib.operators.gauss_newton",
    "curvlib.operators.jacobian",
    "curvlib.operators.microbatch",
    "curvlib.operators.blocks",
    "curvlib.operators.inverse",
    "curvlib.operators.streams",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name):
    module = importlib.import_module(name)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(module, optionflags=flags, report=True)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
    operators = importlib.import_module("curvlib.operators")
    public = [getattr(operators, n) for n in operators.__all__
              if getattr(getattr(operators, n), "__module__", None) == name]
    for obj in public:  # every public function of the module has an example
        if not isinstance(obj, type):
            assert obj.__doc__ and ">>>" in obj.__doc__, obj.__name__
