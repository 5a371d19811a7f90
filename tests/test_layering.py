"""The rooms of the repository import one way, and no module imports itself back.

Layers, lowest first (a module may import its own layer or lower ones, never higher):

    textenv (the MDP: env, tasks' machinery, models, rewards, decoding slots)
      < textenv.tasks (the built-in tasks and their data)
      < textenv.training (SFT, reward models, the built-in models' builds)
      < textenv/__init__ (the package's front door: it registers tasks and models)
      < policies < agents
      < textenv.cli (the console commands)
      < scripts (the benchmark, the one-page PPO, the README's ``python scripts/train.py``)

Every import counts, at module level or inside a function (a lazy import is still a
dependency, and a lazy import cycle is still a cycle), except those under
``if TYPE_CHECKING:`` (never run). A package's ``__init__`` is the node of its
package name; importing ``a.b`` is an edge to ``a.b`` only (the implicit import of the
parent package ``a`` is not counted: every submodule would otherwise form a cycle
with its package's ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("textenv", "policies", "agents", "scripts")


def module_files() -> dict[str, Path]:
    """Dotted name -> file, for every module of the rooms (scripts are ``scripts.<name>``)."""
    modules = {}
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """``(module, names imported from it, level)`` of every import that can run."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", [alias.name for alias in node.names], node.level))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    script_names = {name.split(".", 1)[1].split(".")[0] for name in modules if name.startswith("scripts.")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target, names, level in imported_names(ast.parse(path.read_text(encoding="utf-8"))):
            if level:  # relative import
                base = package.split(".")
                base = base[: len(base) - (level - 1)]
                target = ".".join([*base, target] if target else base)
            elif name.startswith("scripts.") and target.split(".")[0] in script_names:
                target = f"scripts.{target}"  # scripts import their siblings by bare name
            candidates = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]
            for candidate in candidates:
                while candidate and candidate not in modules:  # "a.b.func" -> "a.b"
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    graph[name].add(candidate)
    return graph


def layer(module: str) -> float:
    if module.startswith("textenv.cli"):
        return 2.5
    if module == "textenv":
        return 0.9
    if module.startswith("textenv.training"):
        return 0.5
    if module.startswith("textenv.tasks"):
        return 0.25
    return {"textenv": 0, "policies": 1, "agents": 2, "scripts": 3}[module.split(".")[0]]


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "policies.lm_policy" in graph["agents.algorithms"] or "policies" in graph["agents.algorithms"]
    assert "textenv.models" in graph["textenv.task"]
    assert "textenv.training.builtin_models" in graph["textenv"]
    assert "textenv.cli.arguments" in graph["textenv.cli.train"]
    assert "agents.training_run" in graph["textenv.cli.pipeline"]
    assert len(graph) > 40


def test_nothing_imports_upward():
    graph = import_graph()
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if layer(target) > layer(source)
    )
    assert not upward, "imports against the layering (textenv < tasks < training < policies < agents < cli < scripts):\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def _edits_sys_path(tree: ast.AST) -> bool:
    """A call of ``sys.path.<anything>(...)`` (insert, append, extend)."""
    return any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "path"
        and isinstance(node.func.value.value, ast.Name) and node.func.value.value.id == "sys"
        for node in ast.walk(tree)
    )


def test_nothing_edits_the_import_path():
    """Modules are found because the package is installed (and pytest's ``pythonpath``
    names scripts/ for the benchmark's tests), never by ``sys.path`` edits."""
    offenders = [
        str(path.relative_to(ROOT))
        for folder in (*ROOMS, "tests")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if _edits_sys_path(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert offenders == [], f"sys.path edits in {offenders}. Fix: import the installed package (textenv.cli.*)."
    assert _edits_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')"))
