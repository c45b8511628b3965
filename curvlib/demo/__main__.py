"""``python -m curvlib.demo``: the Delta2(D) transformer probe (``--help`` for options)."""

from curvlib.demo.cli import main

main()
