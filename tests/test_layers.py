"""The layout shows the architecture: every palign module imports only modules of its own layer
or of the layers below it (docs/architecture.md), and no modules import each other in a loop.
Imports inside functions and under ``TYPE_CHECKING`` count too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "palign"

#: Layer of each top-level module or package of palign, from the ground up.
LAYERS = {
    "__init__": 0, "errors": 0, "constants": 0, "progress": 0, "stopping": 0,
    "data": 1, "models": 1,
    "eval": 2, "rundir": 2,
    "pas": 3, "report": 3,
    "methods": 4,
    "config": 5,
    "runs": 6,
    "api": 7,
    "cli": 8, "__main__": 8,
}  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(("palign", *parts)).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The palign modules ``name`` imports (``from palign.x import y``: ``palign.x.y`` when
    that is a module, else ``palign.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("palign")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("palign"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules and m != name}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return LAYERS[top]


def test_every_module_has_a_layer():
    tops = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in SRC.glob("*")}
    tops -= {"conf", "py.typed", "__pycache__"}
    assert tops == set(LAYERS)


def test_no_module_imports_a_higher_layer():
    modules = _modules()
    upward = [
        f"{name} (layer {_layer(name)}) imports {other} (layer {_layer(other)})"
        for name, path in modules.items()
        for other in _imports(name, path, modules)
        if _layer(other) > _layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_loops():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    graph = {k: {m for m in v if not k.startswith(m + ".")} for k, v in graph.items()}
    state: dict[str, int] = {}
    loops = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                loops.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not loops, "\n".join(loops)
