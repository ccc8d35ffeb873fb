"""The project's import structure (issue 23): no import circle between its modules (module-level and lazy,
function-level imports alike; a package's `__init__` is a module of its own, which an import of any of its modules from
outside the package runs), and no private name imported from another of our modules."""

import ast
from pathlib import Path

from conftest import REPO_ROOT


PACKAGES = ("modeling_ltm", "eval_harness", "hub_cards")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (REPO_ROOT / package).rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict) -> list[tuple[str, list[str]]]:
    """`(imported module, imported names)` of every import in `path`, ours only, resolved to module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    # Imports under `if TYPE_CHECKING:` never run: annotations only.
    type_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for inner in ast.walk(node)}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            found += [(module, []) for module in submodules] or [(base, names)]
    return [(module, names) for module, names in found if module.split(".")[0] in PACKAGES]


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = our_modules()
    graph, private = {name: set() for name in modules}, []
    for name, path in modules.items():
        for module, names in imports_of(name, path, modules):
            targets = {module}
            if module.split(".")[0] != name.split(".")[0]:  # from another package: its __init__ runs first
                targets |= {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
            graph[name] |= {target for target in targets if target in modules and target != name}
            private += [f"{name} imports {module}.{n}" for n in names if n.startswith("_") and module != name]
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_circle():
    graph, _ = import_graph()
    assert graph["modeling_ltm.trainer"], "the graph is empty: the parser found no import"
    assert cycles(graph) == []


def test_no_private_name_is_imported_from_another_module():
    _, private = import_graph()
    assert private == []
