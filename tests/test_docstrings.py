"""Public docstring coverage of src/skdcgn must stay at or above 95%.

The source is read with `ast` (no module is imported, so the check needs neither torch nor the
optional dependencies). Counted: public module-level functions and classes, and public methods
(properties, class methods and static methods included) of public classes; public means the name
does not start with `_`, so dunder methods such as `__init__` and `__call__` are not counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "skdcgn"
THRESHOLD = 0.95
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def public_definitions(source: str) -> list[tuple[str, bool]]:
    """(qualified name, has a docstring) of every public definition counted in `source`."""
    out: list[tuple[str, bool]] = []

    def walk(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, _DEFS) or node.name.startswith("_"):
                continue
            out.append((prefix + node.name, bool(ast.get_docstring(node))))
            if isinstance(node, ast.ClassDef):
                walk(node.body, prefix + node.name + ".")  # methods of public classes only

    walk(ast.parse(source).body, "")
    return out


def coverage(root: Path) -> tuple[int, int, list[str]]:
    """(documented, total, missing as 'path.py: Qual.name') over every .py file under `root`."""
    documented, total, missing = 0, 0, []
    for path in sorted(root.rglob("*.py")):
        for name, has_doc in public_definitions(path.read_text(encoding="utf-8")):
            total += 1
            if has_doc:
                documented += 1
            else:
                missing.append(f"{path.relative_to(root).as_posix()}: {name}")
    return documented, total, missing


def test_counter_on_a_small_source():
    source = '''
def documented():
    """Yes."""

def undocumented():
    pass

def _private():
    pass

class Public:
    """A class."""

    def __init__(self):
        pass

    def method(self):
        pass

    @property
    def prop(self):
        """A property."""

    def _hidden(self):
        pass

class _Private:
    def method(self):
        pass
'''
    found = dict(public_definitions(source))
    assert found == {"documented": True, "undocumented": False, "Public": True, "Public.method": False,
                     "Public.prop": True}


def test_coverage_of_a_folder_reports_what_is_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text('def f():\n    """Doc."""\n', encoding="utf-8")
    (tmp_path / "sub" / "b.py").write_text("class C:\n    def g(self):\n        pass\n", encoding="utf-8")
    documented, total, missing = coverage(tmp_path)
    assert (documented, total) == (1, 3)
    assert missing == ["sub/b.py: C", "sub/b.py: C.g"]
    assert documented / total < THRESHOLD  # the same check as below fails on this folder


def test_counter_finds_no_definitions_in_an_empty_module():
    assert public_definitions('"""Only a module docstring."""\nX = 1\n') == []


def test_public_docstring_coverage():
    assert PACKAGE.is_dir(), PACKAGE
    documented, total, missing = coverage(PACKAGE)
    assert total > 0
    ratio = documented / total
    assert ratio >= THRESHOLD, (
        f"public docstring coverage {documented}/{total} = {ratio:.1%} < {THRESHOLD:.0%}; "
        f"missing ({len(missing)}):\n" + "\n".join(missing))
