"""The documentation: the API reference site and every public docstring's runnable example.

* The site (``mkdocs.yml``) builds with ``mkdocs build --strict`` (no warning), its API pages
  document every public name, and the notebooks are rendered with their committed outputs.
* Every public function (and every public class that is not a NamedTuple result or state) has
  an ``Examples:`` section that imports what it uses from curvlib.
* Those examples run as doctests, each module once, with empty globals (a name an example does
  not import is an error). ``testpaths`` only collects ``tests/``, so ``--doctest-modules``
  never reaches ``curvlib/``: this file is the one runner of the library's examples. They are
  written to print the same under float32 and float64 (conftest enables float64).
"""

from __future__ import annotations

import doctest
import html
import importlib
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import _pytest.doctest as _pytest_doctest
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The public namespaces; the report modules' functions are re-exported by their packages, and
# listed here so that a report function left out of an ``__all__`` is still checked.
NAMESPACES = ["curvlib", "curvlib.optim", "curvlib.landscape", "curvlib.kronecker", "curvlib.demo"]
REPORT_MODULES = ["curvlib.optim.report", "curvlib.landscape.report", "curvlib.kronecker.report"]
# Packages whose own docstrings are part of the documentation (module-level examples).
PACKAGES = NAMESPACES + ["curvlib.operators", "curvlib.krylov"]

_IMPORT = re.compile(r"^\s*>>> (import .*\bcurvlib\b|from curvlib(\.\w+)* import )", re.M)


def public_objects() -> dict[str, object]:
    """``{dotted public name: object}``, each object once (under its first namespace)."""
    found, seen = {}, set()
    for ns in NAMESPACES:
        module = importlib.import_module(ns)
        for name in module.__all__:
            if name.startswith("__"):
                continue
            obj = getattr(module, name)
            if id(obj) not in seen:
                seen.add(id(obj))
                found[f"{ns}.{name}"] = obj
    for mod_name in REPORT_MODULES:
        module = importlib.import_module(mod_name)
        for name, obj in vars(module).items():
            if (not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                    and obj.__module__ == mod_name and id(obj) not in seen):
                seen.add(id(obj))
                found[f"{mod_name}.{name}"] = obj
    return found


def is_record(obj) -> bool:
    """A NamedTuple (a result, state or info record): documented by its ``Attributes:``."""
    return inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def doctest_modules() -> list[str]:
    """Every module that defines a public name, and the namespace packages, once each."""
    names = {obj.__module__ for obj in public_objects().values()}
    return sorted(names | set(PACKAGES))


# ------------------------------------------------------------------ the site


def _resolve(dotted: str):
    """The object a dotted path names (a module prefix, then attributes), or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    assert "WARNING" not in log, log[-6000:]
    return out


def test_site_builds_strict_and_documents_every_public_name(site):
    pages = sorted((site / "api").rglob("*.html"))
    assert pages, "no API pages were built"
    anchors = set()
    for page in pages:
        anchors |= set(re.findall(r'id="(curvlib(?:\.\w+)+)"', page.read_text()))
    documented = {id(_resolve(a)) for a in anchors}
    missing = [name for name, obj in public_objects().items() if id(obj) not in documented]
    assert not missing, f"public names without an entry in docs/api/: {missing}"
    # the rendered docstring, not just a heading: each function's example is on its page
    text = "\n".join(html.unescape(re.sub(r"<[^>]+>", "", p.read_text())) for p in pages)
    assert "from curvlib.landscape import" in text and "curvlib.eigsh(" in text


def test_site_has_the_guides_and_the_notebooks_with_their_committed_outputs(site):
    for md in sorted((ROOT / "docs").glob("*.md")):
        page = "index.html" if md.stem == "index" else f"{md.stem}/index.html"
        assert (site / page).is_file(), f"docs/{md.name} was not built"
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for nb_path in notebooks:
        page = site / "notebooks" / nb_path.stem / "index.html"
        assert page.is_file(), f"{nb_path.name} is not rendered (add it to mkdocs.yml's nav)"
        rendered = html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))
        nb = json.loads(nb_path.read_text())
        lines = [line.strip() for cell in nb["cells"] for out in cell.get("outputs", [])
                 if out.get("output_type") == "stream"
                 for line in "".join(out["text"]).splitlines() if line.strip()]
        for line in lines[:3] + lines[-3:]:  # the committed outputs, never re-executed
            assert line in rendered, f"{nb_path.name}: output {line!r} not rendered"


# reStructuredText the site does not render: a role (``:func:`x``` shows as literal text, the
# backquotes turned into a code span) or a directive (``.. math::``, ``.. note::``) left in a
# docstring or a guide. Docstrings use Markdown: ``[`x`][curvlib.x]`` cross-references,
# ``$...$`` / ``$$...$$`` math (pymdownx.arithmatex), admonitions.
_RAW_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc|math|py:\w+):(?:`|<code)")
_RAW_DIRECTIVE = re.compile(r"^\s*\.\. [a-z][\w-]*::", re.M)


def _page_text(page: pathlib.Path) -> str:
    """The text of a built page: tags become line breaks, entities are decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "\n", page.read_text()))


def test_site_renders_no_raw_rst_markup(site):
    raw = []
    for page in sorted(site.rglob("*.html")):
        name = str(page.relative_to(site))
        raw += [f"{name}: {m.group()}" for m in _RAW_ROLE.finditer(page.read_text())]
        raw += [f"{name}: {m.group().strip()}" for m in _RAW_DIRECTIVE.finditer(_page_text(page))]
    assert not raw, f"{len(raw)} raw reStructuredText roles/directives in the site: {raw[:20]}"


def test_site_renders_math_and_cross_references(site):
    algorithms = (site / "api" / "algorithms" / "index.html").read_text()
    # hutchinson_trace's Hutch++ formula: a display block typeset by MathJax
    assert re.search(r'<div class="arithmatex">\\\[\s*\\widehat', algorithms)
    # ``[`curvlib.eigsh`][curvlib.eigsh]`` in hutchinson_trace resolves to eigsh's entry
    assert 'href="#curvlib.eigsh"><code>curvlib.eigsh</code></a>' in algorithms


def _parameters(page_html: str, identifier: str) -> list[str]:
    """The names in the Parameters table of ``identifier``'s entry on a built page."""
    start = page_html.index(f'id="{identifier}"')
    end = page_html.find('<div class="doc doc-object doc-', start)
    entry = page_html[start:end if end > 0 else None]
    if 'doc-section-title">Parameters:' not in entry:
        return []
    table = entry.split('doc-section-title">Parameters:', 1)[1].split("</table>", 1)[0]
    return re.findall(r'<tr class="doc-section-item">\s*<td>\s*<code>(\w+)</code>', table)


@pytest.mark.parametrize("page, identifier", [
    ("kfac", "curvlib.kfac"), ("optim", "curvlib.newton_cg"), ("optim", "curvlib.newton"),
    ("optim", "curvlib.bfgs"), ("optim", "curvlib.svrg")])
def test_alias_pages_list_their_parameters(site, page, identifier):
    """An alias's entry documents every parameter of its signature (not only a pointer)."""
    listed = _parameters((site / "api" / page / "index.html").read_text(), identifier)
    from curvlib._deprecation import NOT_GIVEN  # deprecated keywords are not listed

    wanted = [n for n, p in inspect.signature(_resolve(identifier)).parameters.items()
              if p.default is not NOT_GIVEN]
    assert listed == wanted, f"{identifier}: the page lists {listed}, the signature has {wanted}"


def test_returns_sections_name_no_article(site):
    """A Google ``Returns:`` read as ``name: description`` turned "An :class:`X`" into a
    returned value named "An"; every Returns table has a type and description only."""
    bad = []
    for page in sorted((site / "api").rglob("*.html")):
        for section in re.findall(r'doc-section-title">Returns:</span>.*?</table>',
                                  page.read_text(), re.S):
            if "<th>Name</th>" in section:
                bad.append(f"{page.parent.name}: {section[:200]}")
    assert not bad, bad


# ------------------------------------------------------------------ docstrings


def test_every_public_function_has_an_example_with_its_imports():
    missing, records_without_fields = [], []
    for name, obj in public_objects().items():
        doc = inspect.getdoc(obj) or ""
        if is_record(obj):
            if "Attributes:" not in doc:
                records_without_fields.append(name)
        elif "Examples:" not in doc or not _IMPORT.search(doc.split("Examples:", 1)[1]):
            missing.append(name)
    assert not missing, f"no Examples: section importing from curvlib: {missing}"
    assert not records_without_fields, f"NamedTuples without Attributes: {records_without_fields}"


@pytest.mark.parametrize("module_name", doctest_modules())
def test_examples_run(module_name, request):
    module = importlib.import_module(module_name)
    # empty globals: every example imports what it uses
    finder = doctest.DocTestFinder(exclude_empty=True)
    # the flags pyproject.toml sets for doctests (NORMALIZE_WHITESPACE, ELLIPSIS and pytest's
    # NUMBER: a float matches to the digits written, so float32 prints like float64)
    runner = doctest.DocTestRunner(checker=_pytest_doctest._get_checker(),
                                   optionflags=_pytest_doctest.get_optionflags(request.config))
    tests = [t for t in finder.find(module, module_name, globs={}) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} example(s) of {module_name} failed (see stdout)"
    defines_public = any(obj.__module__ == module_name for obj in public_objects().values()
                         if not is_record(obj))
    assert result.attempted > 0 or not defines_public, f"{module_name} has no examples"


def test_no_public_name_shadows_a_submodule():
    """``pkg.name`` is the module ``pkg/name.py`` or nothing: a function re-exported under its
    submodule's name makes ``pkg.name`` mean two things (and docs tools resolve the module)."""
    import pkgutil
    import types

    clashes = []
    for pkg in PACKAGES + ["curvlib.landscape", "curvlib.kronecker"]:
        mod = importlib.import_module(pkg)
        for info in pkgutil.iter_modules(mod.__path__):
            attr = getattr(mod, info.name, None)
            if attr is not None and not isinstance(attr, types.ModuleType):
                clashes.append(f"{pkg}.{info.name}")
    assert not clashes
