"""The architecture as a test: imports run one way, down the layers.

Each top-level folder is one layer (README "Architecture"). A module may import
its own layer and any layer below it, never one above; `testing` is test
support that nothing in the runtime path may import. Module-level cycles are
refused everywhere, lazy imports included: a cycle hidden in a function is
still a cycle a reader has to untangle. And no module outgrows what one
reader takes in at a sitting (`MAX_LINES`).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Top to bottom. Layers on one row are peers: neither may import the other.
LAYERS: list[tuple[str, ...]] = [
    ("cli", "api"),
    ("daemon",),
    ("fs",),
    ("datasets", "staging"),
    ("cache",),
    ("store",),
    ("base",),
]
RUNTIME = {name for row in LAYERS for name in row}
# The root package (package/ in the repository): __init__, __main__.
ROOT = "s3cachefs"
# A module past this holds more than one concern: split it by what it owns.
MAX_LINES = 400


def _rank(layer: str) -> int:
    return next(i for i, row in enumerate(LAYERS) if layer in row)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for layer in [*RUNTIME, "testing"]:
        for path in sorted((REPO / layer).glob("*.py")):
            name = f"{ROOT}.{layer}" if path.stem == "__init__" else f"{ROOT}.{layer}.{path.stem}"
            found[name] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every module of ours that `path` imports, at any depth of the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from s3cachefs.cache import blockcache` imports a module too.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        out.update(name for name in names if name in known)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items()}


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_the_layer_table_names_every_package_folder() -> None:
    folders = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench", "package"}
    assert folders == RUNTIME | {"testing"}


def test_no_module_imports_a_layer_above_its_own_or_a_peer() -> None:
    wrong = []
    for module, targets in _graph().items():
        mine = _layer(module)
        for target in targets:
            theirs = _layer(target)
            if mine == theirs:
                continue
            if mine == "testing":
                if theirs in {"cli", "daemon"}:
                    wrong.append(f"{module} -> {target}")
                continue
            if theirs == "testing" or _rank(theirs) <= _rank(mine):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_import_cycles_between_modules() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []


def test_no_module_is_over_the_line_limit() -> None:
    long = {
        str(path.relative_to(REPO)): lines
        for path in _modules().values()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    # The checks above are only as good as the parser: it must see both
    # import forms, inside functions too.
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from s3cachefs.fs import core\n    import s3cachefs.daemon.app\n"
    )
    known = {"s3cachefs.fs", "s3cachefs.fs.core", "s3cachefs.daemon.app"}
    assert _imports(source, known) == known
