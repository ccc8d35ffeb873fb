"""The project's structure (issues 23 and 32): no import circle between its modules (module-level and lazy,
function-level imports alike; a package's `__init__` is a module of its own, which an import of any of its modules from
outside the package runs), no private name imported from another of our modules; the model package (`modeling_ltm/`,
top level) is exactly what ships to the Hub as remote code and imports nothing of the tooling (`modeling_ltm/tooling/`)
or of our other packages; no function longer than `MAX_FUNCTION_LINES`."""

import ast
import sys
from pathlib import Path

from conftest import REPO_ROOT


PACKAGES = ("modeling_ltm", "eval_harness", "hub_cards")
MODEL_PACKAGE = REPO_ROOT / "modeling_ltm"
# What remote code may import: transformers' own dependencies (huggingface_hub: the config's strict dataclasses;
# safetensors), torch, the standard library, and its sibling modules (flat `from .x import y`).
SHIPPED_IMPORT_ROOTS = {"torch", "transformers", "huggingface_hub", "safetensors"} | set(sys.stdlib_module_names)
MAX_FUNCTION_LINES = 60


def shipped_modules() -> dict[str, Path]:
    """The model package's top-level modules but `__init__.py`: what `ltm export` copies (`REMOTE_CODE_FILES`)."""
    return {path.stem: path for path in sorted(MODEL_PACKAGE.glob("*.py")) if path.name != "__init__.py"}


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
    assert graph["modeling_ltm.tooling.trainer"], "the graph is empty: the parser found no import"
    assert cycles(graph) == []


def test_no_private_name_is_imported_from_another_module():
    _, private = import_graph()
    assert private == []


def test_the_export_ships_exactly_what_save_pretrained_copies():
    """`ltm export` copies the model package's top-level modules; `save_pretrained` copies transformers'
    `get_relative_import_files` closure of the modules `auto_map` names. The two are one set: a new shipped module is
    never forgotten, no tooling module ships."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from hub_cards.export import REMOTE_CODE_FILES

    roots = [MODEL_PACKAGE / "modeling_ltm.py", MODEL_PACKAGE / "configuration_ltm.py"]
    closure = {Path(f).name for root in roots for f in (root, *get_relative_import_files(str(root)))}
    assert set(REMOTE_CODE_FILES) == closure == {path.name for path in shipped_modules().values()}
    assert {"configuration_ltm.py", "modeling_ltm.py", "inference.py", "generation_ltm.py"} <= closure


def test_shipped_modules_import_only_torch_transformers_and_each_other():
    """Every import of a shipped module, lazy ones included: the standard library, torch, transformers (and its own
    dependencies), or a sibling shipped module (flat `from .x import y`, the only form `save_pretrained` follows);
    never the tooling, eval_harness or hub_cards. An import inside `try:` with a fallback is optional (transformers'
    `check_imports` skips it too): accelerate's unwrapping in weight_checks.py."""
    shipped = shipped_modules()
    found = []
    for stem, path in shipped.items():
        tree = ast.parse(path.read_text())
        optional = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.Try) for stmt in node.body
                    for inner in ast.walk(stmt)}  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
                found += [f"{stem}: import {n}" for n in names if n.split(".")[0] not in SHIPPED_IMPORT_ROOTS]
            elif isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1 or node.module not in shipped:  # `from ..x`, `from .tooling...`, `from . import`
                    found.append(f"{stem}: from {'.' * node.level}{node.module or ''} import ...")
            elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] not in SHIPPED_IMPORT_ROOTS:
                found.append(f"{stem}: from {node.module} import ...")
    assert found == []


def long_functions(limit: int) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    # from `def` to the last line, the docstring aside (an API's documentation is not its length)
                    length = node.end_lineno - node.lineno + 1
                    first = node.body[0]
                    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                            first.value.value, str):  # fmt: skip
                        length -= first.end_lineno - first.lineno + 1
                    if length > limit:
                        found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_the_limit():
    """Every function in our packages (the model package, its tooling, eval_harness, hub_cards) fits in
    `MAX_FUNCTION_LINES` lines besides its docstring; a longer one is split into named helpers."""
    assert long_functions(MAX_FUNCTION_LINES) == []
