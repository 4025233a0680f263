"""Limits the code keeps to: short functions, and ruff format deciding the layout."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "semisup"
MAX_BODY_LINES = 80  # one screen; a docstring does not count
MAX_FORMAT_SKIPS = 10  # each with a reason beside it


def body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = function.body
    first = body[0]
    docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if docstring and isinstance(first.value.value, str) and len(body) > 1:  # type: ignore[attr-defined]
        body = body[1:]
    end = body[-1].end_lineno
    assert end is not None
    return end - body[0].lineno + 1


def long_functions(root: Path, limit: int) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            functions = ast.FunctionDef | ast.AsyncFunctionDef
            if isinstance(node, functions) and (lines := body_lines(node)) > limit:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} {lines}")
    return found


def test_no_function_body_is_longer_than_one_screen(tmp_path: Path) -> None:
    assert long_functions(PACKAGE, MAX_BODY_LINES) == []
    # the check itself sees a long body, and not a long docstring
    module = tmp_path / "pkg" / "m.py"
    module.parent.mkdir()
    statements = "\n".join(f"    x{i} = {i}" for i in range(MAX_BODY_LINES + 1))
    docstring = '    """' + "\n" * (MAX_BODY_LINES + 5) + '    """\n    return 1\n'
    module.write_text(f"def long():\n{statements}\n\n\ndef documented():\n{docstring}")
    assert long_functions(module.parent, MAX_BODY_LINES) == [
        f"pkg/m.py:1 long {MAX_BODY_LINES + 1}"
    ]


def test_ruff_format_decides_the_layout() -> None:
    skips = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "# fmt: skip" in line or "# fmt: off" in line
    ]
    assert len(skips) <= MAX_FORMAT_SKIPS, skips
