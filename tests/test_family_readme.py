"""The README's curvature-family snippet runs verbatim."""

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_family_snippet_runs(capsys):
    text = README.read_text()
    section = text.split("### The curvature family", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md (curvature family)", "exec"), {})
    out = capsys.readouterr().out
    assert "'w1': Array(" in out and "(16, 3)" in out
