"""Code conventions the guide asks of every public function: type hints on every parameter and the return, and a
docstring whose first line says what it does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("actstore", "kernels", "jobs", "benchmarks")


def public_functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function reachable without a leading underscore: module level and in classes."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not child.name.startswith("_"):
                found.append((prefix + child.name, child))
            elif isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                visit(child, prefix + child.name + ".")

    visit(tree, "")
    return found


def convention_problems(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """What a public function lacks: untyped parameters, a return type, a docstring with a first line."""
    problems = []
    docstring = ast.get_docstring(node)
    if not docstring or not docstring.splitlines()[0].strip():
        problems.append("no docstring with a first line")
    arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
    for index, argument in enumerate(arguments):
        is_bound = index == 0 and argument.arg in ("self", "cls")
        if argument.annotation is None and not is_bound:
            problems.append(f"parameter {argument.arg} has no type")
    for starred in (node.args.vararg, node.args.kwarg):
        if starred is not None and starred.annotation is None:
            problems.append(f"parameter {starred.arg} has no type")
    if node.returns is None:
        problems.append("no return type")
    return problems


@pytest.mark.parametrize("package", CHECKED)
def test_every_public_function_is_typed_and_documented(package):
    missing = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, node in public_functions(tree):
            problems = convention_problems(node)
            if problems:
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}: {', '.join(problems)}")
    assert not missing, "public functions lacking type hints or a docstring:\n" + "\n".join(missing)


def test_the_check_sees_what_it_should():
    tree = ast.parse(
        "def ok(a: int) -> int:\n    '''Doubles.'''\n    return 2 * a\n"
        "def bare(a, *rest):\n    return a\n"
        "def _private(a):\n    return a\n"
        "class Thing:\n    def method(self, b: int):\n        '''Does.'''\n"
    )
    found = {name: convention_problems(node) for name, node in public_functions(tree)}
    assert found == {
        "ok": [],
        "bare": ["no docstring with a first line", "parameter a has no type", "parameter rest has no type",
                 "no return type"],
        "Thing.method": ["no return type"],
    }


MAX_LINE = 120


def test_no_line_of_code_is_longer_than_the_limit():
    """Every Python line of the project fits in MAX_LINE characters (the width the code is written to)."""
    long = [f"{path.relative_to(ROOT)}:{number} ({len(line)} characters)"
            for package in (*CHECKED, "tests") for path in sorted((ROOT / package).rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not long, f"lines longer than {MAX_LINE} characters:\n" + "\n".join(long)
