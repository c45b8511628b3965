"""A fixed random sample of mutmut mutants, rerunnable before and after a redesign.

Issue 19 asks for a mutation score that a redesign of the Krylov core and of the landscape
estimators must not lower. Every mutant of those files is a day of CPU time, so the score is
measured on a fixed random sample, chosen once (seed, size and rule below) and saved by name in
``docs/mutation_sample_19.txt``; the AFTER run reruns exactly those names.

Files sampled (``FILES``): ``curvlib/krylov/{_band,eigen,linear,power,stochastic}.py`` and
``curvlib/landscape/{coefficients,estimators}.py``.

Sampling rule (default, ``--stratified``): the mutant names of each file are read from the
generated ``mutants/`` tree (every ``def x_<fn>__mutmut_<i>(`` and, for methods,
``def xǁ<Class>ǁ<method>__mutmut_<i>(``), sorted; ``N`` is split between the files in
proportion to their mutant counts (largest remainders, ties to the earlier file of ``FILES``),
and each file's share is ``random.Random(f"{seed}:{path}").sample(names, share)``. The output is
sorted. ``--simple`` instead draws ``random.Random(seed).sample(all_names, N)`` from the sorted
union. Both are deterministic given the mutants (i.e. given the source and mutmut 3.8.1).

Usage (from the repository root, mutmut 3.8.1 installed)::

    python tools/mutation_sample.py generate           # write mutants/ (no tests are run)
    python tools/mutation_sample.py counts             # mutants per file
    python tools/mutation_sample.py sample > docs/mutation_sample_19.txt   # seed 19, N 150
    python tools/mutation_sample.py functions docs/mutation_sample_19.txt  # name -> function
    python tools/mutation_sample.py functions --changed-since REF docs/mutation_sample_19.txt
    python tools/mutation_sample.py results docs/mutation_sample_19.txt    # per-file table

``functions`` prints, per sampled name, its file and function (``Class.method`` for methods);
with ``--changed-since REF`` it prints only the functions whose source differs between git
``REF`` and the working tree (or that no longer exist), so an AFTER run can tell which sampled
mutants belong to code the redesign rewrote (their names may then denote different edits, or
no longer exist: mutmut numbers a function's mutants in source order). ``results`` reads
mutmut's ``mutants/**/*.meta`` files and prints killed / survived / timeout / no tests /
not run per file and the score (killed / (killed + survived + timeout)).
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

SEED = 19
N = 150
FILES = (
    "curvlib/krylov/_band.py",
    "curvlib/krylov/eigen.py",
    "curvlib/krylov/linear.py",
    "curvlib/krylov/power.py",
    "curvlib/krylov/stochastic.py",
    "curvlib/landscape/coefficients.py",
    "curvlib/landscape/estimators.py",
)
_SEP = "\u01c1"  # mutmut's class/method separator in mangled names
_DEF = re.compile(rf"^\s*def (x(?:_\w+|{_SEP}\w+{_SEP}\w+)__mutmut_\d+)\(", re.MULTILINE)


def _module(path: str) -> str:
    return path[: -len(".py")].replace("/", ".")


def mutant_names(path: str, root: Path = Path("mutants")) -> list[str]:
    """Every mutant of one source file, as mutmut names it, sorted."""
    src = (root / path).read_text(encoding="utf-8")
    return sorted({f"{_module(path)}.{m}" for m in _DEF.findall(src)})


def _allocate(counts: dict[str, int], n: int) -> dict[str, int]:
    total = sum(counts.values())
    exact = {f: n * c / total for f, c in counts.items()}
    share = {f: int(x) for f, x in exact.items()}
    order = sorted(FILES, key=lambda f: (-(exact[f] - share[f]), FILES.index(f)))
    for f in order[: n - sum(share.values())]:
        share[f] += 1
    return share


def sample(seed: int = SEED, n: int = N, stratified: bool = True) -> list[str]:
    """The sampled mutant names (sorted)."""
    names = {f: mutant_names(f) for f in FILES}
    if not stratified:
        union = sorted(x for f in FILES for x in names[f])
        return sorted(random.Random(seed).sample(union, n))
    share = _allocate({f: len(v) for f, v in names.items()}, n)
    out = []
    for f in FILES:
        out += random.Random(f"{seed}:{f}").sample(names[f], share[f])
    return sorted(out)


def split(name: str) -> tuple[str, str]:
    """(file, function) of a mutant name; methods as ``Class.method``."""
    head, _, _ = name.partition("__mutmut_")
    module, _, mangled = head.rpartition(".")
    if mangled.startswith("x" + _SEP):
        cls, meth = mangled[2:].split(_SEP)
        func = f"{cls}.{meth}"
    else:
        func = mangled[2:]
    return module.replace(".", "/") + ".py", func


def _function_sources(text: str) -> dict[str, str]:
    out = {}
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{sub.name}"] = ast.get_source_segment(text, sub)
    return out


def changed_functions(ref: str, files) -> set[tuple[str, str]]:
    """(file, function) pairs whose source differs between git ``ref`` and the working tree."""
    out = set()
    for f in files:
        try:
            old = subprocess.run(
                ["git", "show", f"{ref}:{f}"], check=True, capture_output=True, text=True
            ).stdout
        except subprocess.CalledProcessError:
            old = ""
        new = Path(f).read_text(encoding="utf-8") if Path(f).exists() else ""
        a, b = _function_sources(old) if old else {}, _function_sources(new) if new else {}
        out |= {(f, fn) for fn in a if a.get(fn) != b.get(fn)}
    return out


_STATUS = {0: "survived", 1: "killed", 3: "killed", -24: "timeout", 24: "timeout", 36: "timeout",
           152: "timeout", 255: "timeout", 33: "no tests", 34: "skipped", 35: "suspicious",
           37: "caught by type check", None: "not run", 5: "no tests", 2: "check was interrupted",
           -11: "segfault", -9: "segfault"}


def status_of(exit_code) -> str:
    """mutmut's reading of a worker exit code (``mutmut.stats.status_by_exit_code``)."""
    try:
        from mutmut.stats import status_by_exit_code

        s = status_by_exit_code[exit_code]
        return "not run" if s == "not checked" else s
    except (ImportError, KeyError):
        return _STATUS.get(exit_code, f"exit {exit_code}")


def results(names: list[str]) -> list[tuple[str, Counter]]:
    """Per-file status counts of ``names`` from ``mutants/**/*.meta``."""
    codes = {}
    for f in FILES:
        meta = Path("mutants") / (f + ".meta")
        if meta.exists():
            codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    rows = []
    for f in FILES:
        c = Counter(status_of(codes.get(x)) for x in names if split(x)[0] == f)
        rows.append((f, c))
    return rows


def _read_names(p: str) -> list[str]:
    return [ln.strip() for ln in Path(p).read_text(encoding="utf-8").splitlines() if ln.strip()]


def _generate() -> None:
    # mutmut 3.8.1's generation step of ``mutmut run``, without the stats and test passes.
    from mutmut.__main__ import (
        copy_also_copy_files,
        copy_src_dir,
        create_mutants,
        setup_source_paths,
        store_lines_covered_by_tests,
    )
    from mutmut.mutation.trampoline import set_mutant_under_test

    set_mutant_under_test("mutant_generation")
    Path("mutants").mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    store_lines_covered_by_tests()
    print(create_mutants(2), file=sys.stderr)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("generate")
    sub.add_parser("counts")
    s = sub.add_parser("sample")
    s.add_argument("--seed", type=int, default=SEED)
    s.add_argument("-n", type=int, default=N)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--stratified", dest="stratified", action="store_true", default=True)
    g.add_argument("--simple", dest="stratified", action="store_false")
    fn = sub.add_parser("functions")
    fn.add_argument("names_file")
    fn.add_argument("--changed-since", metavar="REF")
    r = sub.add_parser("results")
    r.add_argument("names_file")
    a = ap.parse_args(argv)
    if a.cmd == "generate":
        _generate()
    elif a.cmd == "counts":
        counts = {f: len(mutant_names(f)) for f in FILES}
        share = _allocate(counts, N)
        for f in FILES:
            print(f"{f}\t{counts[f]}\t{share[f]}")
        print(f"total\t{sum(counts.values())}\t{N}")
    elif a.cmd == "sample":
        print("\n".join(sample(a.seed, a.n, a.stratified)))
    elif a.cmd == "functions":
        names = _read_names(a.names_file)
        changed = changed_functions(a.changed_since, FILES) if a.changed_since else None
        for x in names:
            f, func = split(x)
            if changed is None or (f, func) in changed:
                print(f"{x}\t{f}\t{func}")
    elif a.cmd == "results":
        names = _read_names(a.names_file)
        cols = ["killed", "survived", "timeout", "no tests", "not run"]
        tot = Counter()
        print("| file | sampled | " + " | ".join(cols) + " | other |")
        for f, c in results(names):
            tot += c
            other = sum(v for k, v in c.items() if k not in cols)
            print(f"| `{f}` | {sum(c.values())} | " + " | ".join(str(c[k]) for k in cols)
                  + f" | {other} |")
        other = sum(v for k, v in tot.items() if k not in cols)
        print(f"| total | {sum(tot.values())} | " + " | ".join(str(tot[k]) for k in cols)
              + f" | {other} |")
        run = tot["killed"] + tot["survived"] + tot["timeout"]
        if run:
            print(f"score (killed / run) = {tot['killed']} / {run} = {tot['killed'] / run:.3f}")
        survived = [x for x in names if _code(x) == "survived"]
        if survived:
            print("survived:\n" + "\n".join(survived))


def _code(name: str) -> str:
    meta = Path("mutants") / (split(name)[0] + ".meta")
    if not meta.exists():
        return "not run"
    return status_of(json.loads(meta.read_text())["exit_code_by_key"].get(name))


if __name__ == "__main__":
    main()
