"""The package's shape: each layer of `orchestrator` imports only from the layers below it, the layers that
must run without Ray never import it (nor a module that does), no module imports itself in a circle, and no
source file outside `tests/` grows past 500 lines. Read from the source (every import, inside functions too);
nothing is run."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each part of the project may import (besides itself and third-party packages), in the order of the
# layers: sweep file, store, run, analysis, workflow, cli. The analysis reads the store; from the run layer it
# takes only Ray-free rules (ASHA's rungs, as Ray computes them), which the transitive Ray check holds it to.
ALLOWED = {
    "gan": set(),
    "orchestrator.sweepfile": {"gan"},
    "orchestrator.store": {"gan", "orchestrator.sweepfile"},
    "orchestrator.run": {"gan", "orchestrator.sweepfile", "orchestrator.store"},
    "orchestrator.analysis": {"gan", "orchestrator.sweepfile", "orchestrator.store", "orchestrator.run"},
    "orchestrator.workflow": {"gan", "orchestrator.sweepfile", "orchestrator.store", "orchestrator.run",
                              "orchestrator.analysis"},
    "orchestrator.cli": {"gan", "orchestrator.sweepfile", "orchestrator.store", "orchestrator.run",
                         "orchestrator.analysis", "orchestrator.workflow"},
    "bench": {"gan", "orchestrator.sweepfile", "orchestrator.store", "orchestrator.run"},
}
WITHOUT_RAY = ("gan", "orchestrator.sweepfile", "orchestrator.store", "orchestrator.analysis")


def modules() -> dict[str, Path]:
    """Every project module by dotted name (packages by their __init__)."""
    found = {}
    for top in ("gan", "orchestrator", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """The dotted names a module imports, relative imports resolved, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def part_of(name: str) -> str | None:
    """The layer a dotted name belongs to (the longest ALLOWED key it falls under)."""
    hits = [p for p in ALLOWED if name == p or name.startswith(p + ".")]
    return max(hits, key=len) if hits else None


MODULES = modules()
IMPORTS = {name: imports(name, path) for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_from_the_layers_below_its_own(name):
    own = part_of(name)
    if own is None:  # orchestrator/__init__.py: the package's docstring
        return
    upward = sorted(
        target for target in IMPORTS[name]
        if (layer := part_of(target)) is not None and layer != own and layer not in ALLOWED[own]
    )
    assert not upward, f"{MODULES[name].relative_to(ROOT)} ({own}) imports from above or beside it: {upward}"


def reached(name: str) -> set[str]:
    """Every project module `name` imports, directly or through others (with the packages on the way)."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        for target in IMPORTS[module]:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                prefix = ".".join(parts[:i])
                if prefix in MODULES and prefix not in seen:
                    seen.add(prefix)
                    todo.append(prefix)
    return seen


@pytest.mark.parametrize("name", sorted(n for n in MODULES if part_of(n) in WITHOUT_RAY))
def test_layers_that_run_without_ray_never_import_it(name):
    ray = {
        module: sorted(t for t in IMPORTS[module] if t == "ray" or t.startswith("ray."))
        for module in {name} | reached(name)
    }
    ray = {module: found for module, found in ray.items() if found}
    assert not ray, f"{MODULES[name].relative_to(ROOT)} imports Ray, through: {ray}"


def test_no_module_imports_itself_in_a_circle():
    graph = {
        name: {t for t in targets if t in MODULES and t != name and not name.startswith(t + ".")}
        for name, targets in IMPORTS.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circle: list[str] = []

    def visit(name: str, path: list[str]) -> bool:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                circle.extend([*path[path.index(target):], target] if target in path else [name, target])
                return True
            if state.get(target) is None and visit(target, [*path, target]):
                return True
        state[name] = 2
        return False

    for name in sorted(graph):
        if state.get(name) is None and visit(name, [name]):
            break
    assert not circle, " -> ".join(circle)


def test_no_source_file_outside_tests_is_over_500_lines():
    too_long = {
        str(path.relative_to(ROOT)): n
        for path in sorted(ROOT.glob("**/*.py"))
        if not path.relative_to(ROOT).parts[0].startswith((".", "tests", "site"))
        and (n := len(path.read_text().splitlines())) > 500
    }
    assert not too_long, too_long


def test_the_checks_see_a_violation_when_there_is_one(tmp_path):
    """The import reader is not blind: a store module importing the run layer, lazily, is an upward import."""
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from orchestrator.run.tuner import build_tuner\n    from . import tables\n")
    found = imports("orchestrator.store.bad", module)
    assert "orchestrator.run.tuner" in found and "orchestrator.store.tables" in found
    assert part_of("orchestrator.run.tuner") not in ALLOWED["orchestrator.store"]
