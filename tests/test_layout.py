"""The architecture, held by tests: the import graph of pipeline/ and the deps of dvc.yaml.

Layers: the core (every module of pipeline/ outside stages/, e.g. errors, params, shards, models)
imports no stage; a stage (pipeline/stages/*) imports the core and never another stage; the click
layer (pipeline/__main__.py) sits on top. `errors` imports nothing of the project, and no imports
go round in a circle. A DVC stage depends on every project module its command imports, so that
no code change leaves stale metrics behind.
"""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import REPO

PACKAGE = REPO / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(tree: ast.AST, importer: str, with_packages: bool = False) -> set[str]:
    """Project modules named by imports anywhere in `tree` (inside functions too); `with_packages`
    adds the packages that Python runs first (importing a.b.c runs a/__init__ and a/b/__init__)."""
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in MODULES:
                found.add(name)
    if with_packages:
        for name in list(found):
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES)
    found.discard(importer)
    return found


TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
GRAPH = {name: imported_modules(tree, name) for name, tree in TREES.items()}  # as written
LOADS = {name: imported_modules(tree, name, with_packages=True) for name, tree in TREES.items()}  # as run


def is_stage(name: str) -> bool:
    return name.startswith("pipeline.stages.")


def closure(start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += LOADS[name]
    return seen


def test_core_imports_no_stage_and_stages_import_no_stage():
    upward = [(a, b) for a, deps in GRAPH.items() for b in deps
              if not is_stage(a) and a != "pipeline.__main__" and (is_stage(b) or b == "pipeline.__main__")]
    assert not upward, f"core modules importing a stage or the CLI: {upward}"
    sideways = [(a, b) for a, deps in GRAPH.items() for b in deps if is_stage(a) and is_stage(b)]
    assert not sideways, f"stages importing stages: {sideways}"
    assert GRAPH["pipeline.errors"] <= {"pipeline"}


def test_no_import_cycles():
    def visit(name, path):
        if name in path:
            raise AssertionError(" -> ".join(path[path.index(name):] + [name]))
        for dep in GRAPH[name]:
            visit(dep, path + [name])

    for name in GRAPH:
        visit(name, [])


def command_imports(command: str) -> set[str]:
    """What `python -m pipeline COMMAND` imports: __main__ at module level, plus that command's function."""
    tree = TREES["pipeline.__main__"]
    top = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == command]
    assert functions, f"no click command {command} in pipeline/__main__.py"
    found = imported_modules(top, "pipeline.__main__", True) | imported_modules(functions[0], "pipeline.__main__", True)
    return closure(found | {"pipeline"}) | {"pipeline.__main__"}


def test_each_dvc_stage_depends_on_every_module_its_command_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, spec in stages.items():
        command = spec["cmd"].split()[3]  # python -m pipeline COMMAND ...
        deps = [Path(d) for d in spec.get("deps", [])]
        missing = []
        for name in sorted(command_imports(command)):
            path = MODULES[name].relative_to(REPO)
            if not any(path == d or d in path.parents for d in deps):
                missing.append(str(path))
        assert not missing, f"dvc.yaml stage {stage!r} misses deps {missing}"
