"""The rooms of the repository import one way, and no module imports itself back.

Layers, lowest first (a module may import its own layer or lower ones, never higher),
each an integer, found by the longest prefix of the module's dotted name in ``LAYERS``:

    0 textenv (the MDP: env, tasks' machinery, rewards, files) and its ground floor
      textenv.lm (the language-model helpers that policies need: loading, slot decoding,
      the build cache)
    1 textenv.tasks (the built-in tasks and their data)
    2 textenv.training (SFT, reward models, the built-in models' builds)
    3 textenv/__init__ (the package's front door: it registers tasks and models)
    4 policies
    5 agents
    6 agents.cli (the console commands, the top of the installed packages)
    7 scripts (the benchmark, the one-page PPO, the README's ``python scripts/train.py``)

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


#: Dotted-name prefix -> layer, lowest first (the module docstring says what each holds).
#: ``textenv.`` is the package's modules; ``textenv`` alone is its ``__init__``.
LAYERS = {
    "textenv.": 0,
    "textenv.tasks": 1,
    "textenv.training": 2,
    "textenv": 3,
    "policies": 4,
    "agents": 5,
    "agents.cli": 6,
    "scripts": 7,
}


def layer(module: str) -> int:
    """The layer of the longest prefix in ``LAYERS`` that is ``module`` or a package above it."""
    matches = [prefix for prefix in LAYERS
               if module == prefix or module.startswith(prefix if prefix.endswith(".") else f"{prefix}.")]
    return LAYERS[max(matches, key=len)]


def test_every_module_has_an_integer_layer():
    layers = {name: layer(name) for name in module_files()}
    assert all(isinstance(value, int) for value in layers.values())
    assert layers["textenv.lm.slot_decoding"] == layers["textenv.vector"] < layers["textenv.tasks"]
    assert layers["textenv.training.sft"] < layers["textenv"] < layers["policies.lm_policy"]
    assert layers["policies.masked"] < layers["agents.training_run"] < layers["agents.cli.train"]
    assert layers["agents.cli.train"] < layers["scripts.train"]


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "policies.lm_policy" in graph["agents.algorithms"] or "policies" in graph["agents.algorithms"]
    assert "textenv.lm.models" in graph["textenv.task"]
    assert "textenv.lm.slot_decoding" in graph["policies.decoding"]
    assert "textenv.training.builtin_models" in graph["textenv"]
    assert "agents.cli.arguments" in graph["agents.cli.train"]
    assert "agents.training_run" in graph["agents.cli.pipeline"]
    assert "agents.training_run" in graph["agents.comparison"]
    assert len(graph) > 40


def test_nothing_imports_upward():
    graph = import_graph()
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if layer(target) > layer(source)
    )
    assert not upward, ("imports against the layering (textenv < tasks < training < textenv/__init__ < policies "
                        "< agents < agents.cli < scripts):\n" + "\n".join(upward))


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
    assert offenders == [], f"sys.path edits in {offenders}. Fix: import the installed package (agents.cli.*)."
    assert _edits_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')"))
