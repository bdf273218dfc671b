"""The package's import graph: no circle, and arrows only point down the layers of the house
(docs/algorithm.md and README, "Where things are"):

    blocks, config, atomic, _version  <-  selection, metrics  <-  attention  <-  gate, hf
        <-  pipeline  <-  cli

Parsed with ``ast`` (imports inside functions count too), so the test needs no optional package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sketchwalk"

# Lower number = lower layer. A module may import modules of its own layer or lower ones.
LAYERS = {
    "sketchwalk._version": 0,
    "sketchwalk.atomic": 0,
    "sketchwalk.config": 0,
    "sketchwalk.blocks": 0,
    "sketchwalk.selection": 1,
    "sketchwalk.attention": 2,
    "sketchwalk.metrics": 1,  # pure functions over blocks: the oracle selector uses them
    "sketchwalk.gate": 3,
    "sketchwalk.hf": 3,
    "sketchwalk.engines": 3,  # serving-engine backends (vLLM): selection + attention
    "sketchwalk.pipeline": 4,
    "sketchwalk.cli": 5,
    "sketchwalk.__main__": 6,
    "sketchwalk.testing": 6,  # test helpers: may use anything, nothing imports them
}
KERNEL_MODULES = {
    "sketchwalk.attention.triton_prefill",
    "sketchwalk.attention.triton_decode",
    "sketchwalk.attention.triton_paged",
    "sketchwalk.attention.flex",
    "sketchwalk.selection.triton_transition",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports (a name imported from a package that is itself a
    module of the package counts as that module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("sketchwalk") and name in modules:
                found.add(name)
    return found


def _layer(module: str) -> int:
    best = None
    for prefix, layer in LAYERS.items():
        inside = module == prefix or module.startswith(prefix + ".")
        if inside and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    if best is None:
        raise AssertionError(f"{module} is in no layer of the house; add it to LAYERS")
    return best[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    assert len(modules) > 30, f"found only {len(modules)} modules under {PACKAGE}"
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_no_import_circle(graph):
    # Package __init__ files re-export their submodules; an edge from a submodule to its own
    # package's __init__ would be a circle too, so nothing is exempt.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                circle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_arrows_point_down(graph):
    bad = [
        f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
        for src, targets in graph.items()
        if src != "sketchwalk"  # the package root re-exports the public names
        for dst in targets
        if dst != "sketchwalk" and _layer(dst) > _layer(src)
    ]
    assert not bad, "imports pointing up the layers:\n" + "\n".join(sorted(bad))


def test_modules_never_import_the_package_root(graph):
    bad = sorted(
        src for src, targets in graph.items() if src != "sketchwalk" and "sketchwalk" in targets
    )
    assert not bad, f"modules importing the package root (import from the module instead): {bad}"


# Inside sketchwalk.pipeline.eval: what every task family shares sits below the task family
# modules (ppl, niah, ...: any module not named here), which sit below the command.
EVAL_PACKAGE = "sketchwalk.pipeline.eval"
EVAL_LAYERS = {"runs": 0, "report": 0, "session": 1, "results": 2, "timing": 2, "cli": 4}
EVAL_TASK_LAYER = 3


def test_eval_package_layers(graph):
    def layer(module: str) -> int:
        return EVAL_LAYERS.get(module.removeprefix(EVAL_PACKAGE + "."), EVAL_TASK_LAYER)

    members = sorted(m for m in graph if m.startswith(EVAL_PACKAGE + "."))
    assert {f"{EVAL_PACKAGE}.{m}" for m in (*EVAL_LAYERS, "ppl", "niah")} <= set(members)
    assert f"{EVAL_PACKAGE}.report" in graph[f"{EVAL_PACKAGE}.ppl"]  # the parser sees the edges
    bad = [
        f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
        for src in members
        for dst in graph[src]
        if dst.startswith(EVAL_PACKAGE + ".") and layer(dst) > layer(src)
    ]
    assert not bad, "eval package imports pointing up:\n" + "\n".join(sorted(bad))


def test_reference_imports_no_kernel(graph):
    reference = graph["sketchwalk.attention.reference"]
    assert not reference & KERNEL_MODULES, (
        f"attention/reference.py imports {reference & KERNEL_MODULES}"
    )
    source = (PACKAGE / "attention" / "reference.py").read_text()
    assert "triton" not in source.split('"""', 2)[-1], "attention/reference.py mentions triton"


def test_graph_sees_real_edges(graph):
    """The parser must find the edges the package is built on (a parser that finds nothing would
    pass every test above)."""
    assert "sketchwalk.blocks" in graph["sketchwalk.selection.prefill"]
    assert "sketchwalk.attention.reference" in graph["sketchwalk.attention.api"]
    assert "sketchwalk.attention.triton_prefill" in graph["sketchwalk.attention.api"]
    assert "sketchwalk.pipeline.validate" not in graph["sketchwalk.cli"]  # imported by name only
