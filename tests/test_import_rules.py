"""Import rules, read from the source (AST, every import statement, also those inside functions):

- the engine never imports a method (not even through another module);
- methods never import the engine, studies, reporting, the CLI or the bench, nor another method (private
  shared modules such as ``methods/_channelwise.py`` aside);
- reporting never imports the engine (not even through another module): it reads results;
- nothing in the package imports ``scripts/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"cawbench": ROOT / "cawbench", "cawbench.methods": ROOT / "methods"}  # as pyproject maps them
SCRIPTS = {p.stem for p in (ROOT / "scripts").glob("*.py")}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for the package and methods/ (imported as cawbench.methods)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "cawbench" and name.startswith("cawbench.methods"):
                continue
            found[name] = path
    return found


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an import statement in ``source`` may load: ``import a.b`` gives a.b; ``from a import b``
    gives a and a.b (b may be a submodule); relative imports are resolved against ``module``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            out.update(f"{prefix}.{alias.name}" for alias in node.names)
    return out


FILES = module_files()
GRAPH = {
    name: {m for m in imports_of(path.read_text(), name, path.name == "__init__.py") if m in FILES}
    for name, path in FILES.items()
}
RAW = {name: imports_of(path.read_text(), name, path.name == "__init__.py") for name, path in FILES.items()}


def closure(start: str) -> set[str]:
    """Every package module reachable from ``start`` through import statements."""
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def engine_modules() -> list[str]:
    return [m for m in FILES if under(m, "cawbench.engine")]


def method_modules() -> list[str]:
    return [m for m in FILES if under(m, "cawbench.methods") and m != "cawbench.methods"]


def test_the_import_reader_sees_every_kind_of_import():
    source = """
import cawbench.engine
from cawbench import bench
from . import _channelwise
from .ff import FF_PAPER
def later():
    from cawbench.reporting.source import load_source
"""
    found = imports_of(source, "cawbench.methods.caw_conv")
    assert {"cawbench.engine", "cawbench.bench", "cawbench.methods._channelwise", "cawbench.methods.ff",
            "cawbench.reporting.source"} <= found  # fmt: skip
    assert "cawbench.methods.caw_conv" in FILES and "cawbench.engine" in " ".join(FILES)


@pytest.mark.parametrize("module", engine_modules())
def test_the_engine_never_imports_a_method(module):
    bad = sorted(m for m in closure(module) | RAW[module] if under(m, "cawbench.methods"))
    assert not bad, f"{module} imports {bad}: the engine runs any method through cawbench.method"


@pytest.mark.parametrize("module", method_modules())
def test_methods_import_no_engine_study_report_cli_or_other_method(module):
    forbidden = (
        "cawbench.engine",
        "cawbench.studies",
        "cawbench.reporting",
        "cawbench.cli",
        "cawbench.bench",
    )
    bad = sorted(m for m in RAW[module] if under(m, *forbidden))
    assert not bad, f"{module} imports {bad}"
    others = sorted(
        m
        for m in RAW[module]
        if under(m, "cawbench.methods") and m != "cawbench.methods" and not m.split(".")[2].startswith("_")
    )
    assert not others, f"{module} imports another method {others}; share code through a methods/_private.py"


@pytest.mark.parametrize("module", [m for m in FILES if under(m, "cawbench.reporting")])
def test_reporting_never_imports_the_engine(module):
    bad = sorted(m for m in closure(module) | RAW[module] if under(m, "cawbench.engine", "cawbench.bench"))
    assert not bad, f"{module} reaches {bad}: reports read results, never the engine"


@pytest.mark.parametrize("module", sorted(FILES))
def test_the_package_never_imports_scripts(module):
    top = {m.split(".")[0] for m in RAW[module]}
    assert not top & (SCRIPTS | {"scripts"}), f"{module} imports {sorted(top & (SCRIPTS | {'scripts'}))}"
    # nor could it: no module puts a folder on sys.path (the way a script reaches scripts/)
    calls = [n for n in ast.walk(ast.parse(FILES[module].read_text())) if isinstance(n, ast.Call)]
    edits = [
        c for c in calls if isinstance(c.func, ast.Attribute) and ast.unparse(c.func.value) == "sys.path"
    ]
    assert not edits, f"{module} edits sys.path: {[ast.unparse(c) for c in edits]}"
