"""The import graph of the project's packages: no cycle, and no import against the layering that
docs/architecture.md writes down (the test reads the layers from there, so the two cannot drift).

Every import counts, those inside functions too: a lazy import that runs back is still a cycle
to whoever reads the code. `from pkg import name` is an import of ``pkg.name`` when that is a module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("zoo", "model_format", "training", "serving", "cli")
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its file."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def documented_layers() -> dict[str, set[str]]:
    """``PACKAGE may import A B ...`` lines of docs/architecture.md: package -> what it may import."""
    allowed = {}
    for line in ARCHITECTURE.read_text().splitlines():
        m = re.match(r"^\s*(\w+)\s+may import\s*(.*)$", line)
        if m:
            allowed[m.group(1)] = set(re.findall(r"\b(?:%s)\b" % "|".join(PACKAGES), m.group(2)))
    return allowed


def test_no_module_imports_back_into_itself():
    found = cycles(import_graph())
    assert not found, "import cycles (each a group of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_every_import_follows_the_documented_layers():
    allowed = documented_layers()
    assert set(allowed) == set(PACKAGES), f"docs/architecture.md gives the layers of {sorted(allowed)}, not of every package"
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if (src := module.split(".")[0]) != (dst := target.split(".")[0]) and dst not in allowed[src]
    )
    assert not wrong, "imports against docs/architecture.md's layers: " + "; ".join(wrong)


def test_the_code_a_logged_model_ships_imports_nothing_else_of_the_project():
    """MLflow copies model_format/pyfunc_model.py and zoo/imaging.py into every logged model and runs them where
    the project is not installed: the first may import the second (its fallback in a checkout), nothing else."""
    graph = import_graph()
    assert graph["model_format.pyfunc_model"] <= {"zoo.imaging"}
    assert graph["zoo.imaging"] == set()


def test_the_checker_sees_a_cycle_and_a_layer_broken(tmp_path):
    """The two checks above would pass on an empty graph: this one proves they see what they look for."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "training.tracking" in graph and "model_format.mlflow_model" in graph["training.tracking"]
    allowed = documented_layers()
    assert "serving" not in allowed["training"] and "training" not in allowed["serving"]
    assert "cli" not in allowed["training"] | allowed["serving"] | allowed["model_format"] | allowed["zoo"]
