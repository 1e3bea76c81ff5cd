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
PACKAGES = ("zoo", "training", "serving")  # what `pip install .` installs
# The layers: the command line and the model format live inside zoo but stand above and beside its core.
LAYERS = ("zoo.cli", "zoo.model_format", "training", "serving", "zoo")
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


def layer_of(module: str) -> str:
    return next(layer for layer in LAYERS if module == layer or module.startswith(layer + "."))


def documented_layers() -> dict[str, set[str]]:
    """``PACKAGE may import A B ...`` lines of docs/architecture.md: package -> what it may import."""
    allowed = {}
    for line in ARCHITECTURE.read_text().splitlines():
        m = re.match(r"^\s*([\w.]+)\s+may import\s*(.*)$", line)
        if m:
            allowed[m.group(1)] = set(m.group(2).split()) & set(LAYERS)
    return allowed


def test_no_module_imports_back_into_itself():
    found = cycles(import_graph())
    assert not found, "import cycles (each a group of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_every_import_follows_the_documented_layers():
    allowed = documented_layers()
    assert set(allowed) == set(LAYERS), f"docs/architecture.md gives the layers of {sorted(allowed)}, not of every layer"
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if (src := layer_of(module)) != (dst := layer_of(target)) and dst not in allowed[src]
    )
    assert not wrong, "imports against docs/architecture.md's layers: " + "; ".join(wrong)


def test_the_code_a_logged_model_ships_imports_nothing_else_of_the_project():
    """MLflow copies zoo/model_format/pyfunc_model.py and zoo/imaging.py into every logged model and runs them where
    the project is not installed: the first may import the second (its fallback in a checkout), nothing else."""
    graph = import_graph()
    assert graph["zoo.model_format.pyfunc_model"] <= {"zoo.imaging"}
    assert graph["zoo.imaging"] == set()


def test_the_checker_sees_a_cycle_and_a_layer_broken(tmp_path):
    """The two checks above would pass on an empty graph: this one proves they see what they look for."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "training.tracking" in graph and "zoo.model_format.mlflow_model" in graph["training.tracking"]
    allowed = documented_layers()
    assert "serving" not in allowed["training"] and "training" not in allowed["serving"]
    assert "zoo.cli" not in allowed["training"] | allowed["serving"] | allowed["zoo.model_format"] | allowed["zoo"]


def test_pip_installs_exactly_the_three_packages():
    """A generic top-level name (``cli``) would overwrite another distribution's package of that name."""
    import configparser

    from setuptools import find_packages

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    include = config["options.packages.find"]["include"].split()
    installed = find_packages(str(ROOT), include=include)
    assert {p.split(".")[0] for p in installed} == set(PACKAGES)
    assert {"zoo.cli", "zoo.model_format"} <= set(installed)
    assert config["options.entry_points"]["console_scripts"].split() == ["zoo", "=", "zoo.cli.main:main"]


PRIVATE_USE = {
    "a private Optuna name": re.compile(r"optuna\.[\w.]*\._\w+"),
    "a study's or trial's private attribute": re.compile(r"\._(storage|study_id|trial_id)\b"),
    "setattr onto a class": re.compile(r"\bsetattr\(\s*[A-Z]\w*\s*,"),
}


def test_no_private_name_of_a_library_and_no_class_patched():
    """Optuna's private modules and attributes change without notice, and a third-party class patched
    with setattr changes for every user in the process: only public APIs."""
    found = sorted(
        f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()}"
        for path in module_files().values()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for what, pattern in PRIVATE_USE.items()
        if pattern.search(line)
    )
    assert not found, "private names or patched classes:\n" + "\n".join(found)
