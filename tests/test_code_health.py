"""Limits the code keeps to: short functions, and ruff format deciding the layout."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "semisup"
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


def format_exceptions(folders: list[Path]) -> list[str]:
    """``path:line`` of every ``fmt: skip`` / ``fmt: off`` comment (comments only, not strings)."""
    found = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
            for token in tokens:
                text = token.string.replace(" ", "")
                if token.type == tokenize.COMMENT and ("fmt:skip" in text or "fmt:off" in text):
                    found.append(f"{path.relative_to(folder.parent)}:{token.start[0]}")
    return found


def test_ruff_format_decides_the_layout(tmp_path: Path) -> None:
    skips = format_exceptions([PACKAGE, ROOT / "tests", ROOT / "bench"])
    assert len(skips) <= MAX_FORMAT_SKIPS, skips
    # the check sees a marker in a comment, and not the same words in a string
    module = tmp_path / "pkg" / "m.py"
    module.parent.mkdir()
    module.write_text('x = [1,  2]  # fmt: skip\ny = "# fmt: off"\n')
    assert format_exceptions([module.parent]) == ["pkg/m.py:1"]
