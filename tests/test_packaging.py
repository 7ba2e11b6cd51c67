"""Packaging and layering: everything the installed commands import is a declared dependency, so ``pip install
actstore`` (no extras) runs the demo, a harvest and an analysis with sae-lens SAEs without a missing-module error
halfway through; and the lower layers (kernels, then actstore) import nothing of the higher ones."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
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


def package_files(root: Path) -> set[str]:
    """Paths (relative to ``root``) of every file of our packages, caches left out."""
    return {
        str(path.relative_to(root)) for package in OUR_PACKAGES for path in (root / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_the_wheel_holds_every_file_of_the_packages(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in OUR_PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("actstore-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    missing = package_files(source) - in_wheel
    assert not missing, f"files of the packages that a pip-installed actstore would lack: {sorted(missing)}"


@pytest.mark.parametrize("package, must_not_import", [("kernels", {"actstore", "jobs"}), ("actstore", {"jobs"})])
def test_lower_layers_import_nothing_of_higher_ones(package, must_not_import):
    # kernels stays usable without the store, and the library without the job layer (CLI, configs)
    imported = imported_top_level_modules(ROOT / package)
    offending = {module: where for module, where in imported.items() if module in must_not_import}
    assert not offending, f"{package} must not import {sorted(must_not_import)}: {offending}"


@pytest.mark.parametrize("statement, cwd", [("import kernels", "repo"), ("import actstore", "elsewhere")])
def test_hugging_faces_kernels_beside_ours_is_named_as_the_cause(tmp_path, statement, cwd):
    # transformers >= 5.25 installs Hugging Face's `kernels`, whose import name is our Triton package's. Run from the
    # checkout, ours comes first (and transformers would fail on its missing names); elsewhere, theirs hides ours.
    site = tmp_path / "site"  # a stand-in for Hugging Face's distribution: its package and its metadata
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = object\n")
    (site / "kernels-0.18.3.dist-info").mkdir()
    (site / "kernels-0.18.3.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\n"
                                                                 "Version: 0.18.3\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", statement], cwd=ROOT if cwd == "repo" else tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: Hugging Face's `kernels` 0.18.3 is installed"), run.stderr[-2000:]
    assert "pip uninstall kernels" in last_line
