"""Packaging: everything the installed commands import is a declared dependency, so ``pip install actstore`` (no
extras) runs the demo, a harvest and an analysis with sae-lens SAEs without a missing-module error halfway through."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUR_PACKAGES = ("actstore", "kernels", "jobs")


def imported_top_level_modules(package_dir: Path) -> dict[str, str]:
    """Top-level module names imported anywhere in ``package_dir`` (also inside functions), with one file each."""
    found: dict[str, str] = {}
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_dependencies() -> set[str]:
    """Canonical names of ``[project] dependencies`` in pyproject.toml (extras not included)."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonical(Requirement(spec).name) for spec in project["dependencies"]}


def test_every_third_party_import_is_a_declared_dependency():
    declared = declared_dependencies()
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for package in OUR_PACKAGES:
        for module, where in imported_top_level_modules(ROOT / package).items():
            if module in sys.stdlib_module_names or module in OUR_PACKAGES:
                continue
            owners = {canonical(d) for d in distributions.get(module, [])}
            assert owners, f"{where} imports {module!r}, which no installed distribution provides"
            if not owners & declared:
                undeclared[module] = (where, sorted(owners))
    assert not undeclared, f"imported but not in [project] dependencies of pyproject.toml: {undeclared}"
