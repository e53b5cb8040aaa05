"""CPU: cuflash's modules import each other without cycles, counting imports inside functions too,
so that each layer (validation, plan, compile, launch, ops, adapters, api) depends only on those
below it."""
import ast
from pathlib import Path

import cuflash

PACKAGE = Path(cuflash.__file__).parent


def _imports(path):
    """The cuflash modules that the module at `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cuflash."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cuflash."))
    return {name for name in found if (PACKAGE / f"{name}.py").is_file()}


def import_graph():
    return {path.stem: _imports(path) - {path.stem} for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def find_cycle(graph):
    """A list of modules forming an import cycle, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_no_import_cycle_in_cuflash():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_product_does_not_import_the_test_oracle():
    graph = import_graph()
    assert [module for module, deps in graph.items() if "reference" in deps] == []


def test_the_lower_layers_do_not_import_the_api_or_its_adapters():
    graph = import_graph()
    for low in ("params", "plan", "schedule", "launch", "tma", "device", "compile", "forward_launch", "backward_launch", "validate"):
        assert not graph[low] & {"api", "ops", "torch_ops", "jax_ops"}, f"{low} imports a layer above it"
