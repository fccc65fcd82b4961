"""The architecture, held by tests: the import graph of pipeline/ and the deps of dvc.yaml.

Layers: the core (every module of pipeline/ outside stages/ and tools/: the ground floor of errors,
params, files, charset, cli, device, and the wings) imports no command; a command (pipeline/stages/*,
pipeline/tools/*) imports the core and never another command; pipeline/__main__.py sits on top. The
wings import one way, in the order of WINGS (data, model, read, training, serving): a wing imports
only the wings before it and the ground floor, which imports no wing. `errors` imports nothing of
the project, and no imports go round in a circle. A DVC stage depends on every project module its
command imports, so that no code change leaves stale metrics behind, and on nothing more: editing
a model or a tool reruns no data stage.
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
    """A command: a DVC stage (pipeline/stages/) or another command (pipeline/tools/)."""
    return name.startswith(("pipeline.stages.", "pipeline.tools."))


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
    assert not upward, f"core modules importing a command or the CLI: {upward}"
    sideways = [(a, b) for a, deps in GRAPH.items() for b in deps if is_stage(a) and is_stage(b)]
    assert not sideways, f"commands importing commands: {sideways}"
    assert GRAPH["pipeline.errors"] <= {"pipeline"}


WINGS = ("data", "model", "read", "training", "serving")  # each may import only those before it


def wing_of(name: str) -> str | None:
    """The wing a module belongs to; None for the ground floor (pipeline/*.py) and the commands."""
    folder = MODULES[name].relative_to(PACKAGE).parts
    return folder[0] if len(folder) > 1 and folder[0] in WINGS else None


def test_wings_import_one_way():
    ground = [name for name, path in MODULES.items() if path.parent == PACKAGE and name != "pipeline.__main__"]
    assert {wing_of(name) for name in MODULES} - {None} == set(WINGS), "a wing of pipeline/ not in WINGS"
    for name in ground:
        wings = sorted({wing_of(dep) for dep in GRAPH[name]} - {None})
        assert not wings, f"{name} (ground floor) imports the {wings} wing(s)"
    backward = sorted((a, b) for a, deps in GRAPH.items() for b in deps
                      if wing_of(a) and wing_of(b) and WINGS.index(wing_of(b)) > WINGS.index(wing_of(a)))
    assert not backward, f"wings importing a later wing: {backward}"


def test_only_the_train_stage_imports_the_training_wing():
    importers = sorted({a for a, deps in GRAPH.items() for b in deps
                       if wing_of(b) == "training" and wing_of(a) != "training"})
    assert importers == ["pipeline.stages.train"], importers


def test_no_import_cycles():
    def visit(name, path):
        if name in path:
            raise AssertionError(" -> ".join(path[path.index(name):] + [name]))
        for dep in GRAPH[name]:
            visit(dep, path + [name])

    for name in GRAPH:
        visit(name, [])


def command_imports(module: str) -> set[str]:
    """What `python -m pipeline.stages.NAME` imports: that module and what it imports, transitively."""
    assert module in MODULES, f"no module {module}"
    return closure({module, "pipeline"})


def stage_deps() -> dict[str, list[Path]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {stage: [Path(d) for d in spec.get("deps", [])] for stage, spec in stages.items()}


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


def test_each_dvc_stage_depends_on_every_module_its_command_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, spec in stages.items():
        module = spec["cmd"].split()[2]  # python -m pipeline.stages.NAME ...
        assert module == f"pipeline.stages.{stage}"
        deps = [Path(d) for d in spec.get("deps", [])]
        imported = {MODULES[name].relative_to(REPO) for name in command_imports(module)}
        missing = sorted(str(path) for path in imported if not covered(path, deps))
        assert not missing, f"dvc.yaml stage {stage!r} misses deps {missing}"
        needless = sorted(str(d) for d in deps if d.parts[0] == "pipeline" and not any(covered(p, [d]) for p in imported))
        assert not needless, f"dvc.yaml stage {stage!r} depends on modules it never imports: {needless}"


def test_a_model_or_tool_change_reruns_no_data_stage():
    """Editing an architecture, or adding an option to serve, leaves generate and ingest unchanged."""
    deps = stage_deps()
    for stage in ("generate", "ingest"):
        for edited in ("pipeline/model/fast.py", "pipeline/model/ddddocr.py", "pipeline/tools/serve.py",
                       "pipeline/model/preprocess.py", "pipeline/__main__.py",
                       "pipeline/training/self_training.py", "pipeline/device.py"):
            assert not covered(Path(edited), deps[stage]), f"editing {edited} would rerun {stage}"


def test_dvc_yaml_declares_the_paths_of_pipeline_outputs():
    from pipeline import outputs

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = set()
    for spec in stages.values():
        for kind in ("outs", "metrics", "plots"):
            declared |= {next(iter(o)) if isinstance(o, dict) else o for o in spec.get(kind, [])}
    written = {str(value) for name, value in vars(outputs).items() if name.isupper()}
    assert written - declared == set(), "written by the code but not declared in dvc.yaml"


def test_the_data_stages_import_no_torch():
    """torch costs about a second of every generate and ingest; the shard writer needs none of it."""
    import subprocess
    import sys

    code = ("import sys, pipeline.stages.generate, pipeline.stages.ingest; "
            "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
