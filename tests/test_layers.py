"""The house rules, read from the imports: layers only import downwards, and no module imports itself in a circle."""
import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = ("ml", "catalog", "workers", "visualsearch")
# A layer may import the layers after it in this list, never one before it.
LAYERS = (("visualsearch", "workers"), ("catalog",), ("ml",))


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            if "migrations" in parts:
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in the file (lazy imports count too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def test_no_module_imports_a_higher_layer():
    upward = [f"{module} imports {target}" for module, targets in graph().items() for target in targets
              if layer_of(target) < layer_of(module)]
    assert not upward, "\n".join(sorted(upward))


def test_catalog_imports_neither_the_workers_nor_the_project_wiring():
    wrong = [f"{module} imports {target}" for module, targets in graph().items() if module.startswith("catalog")
             for target in targets if target.split(".")[0] in ("workers", "visualsearch")]
    assert not wrong, "\n".join(sorted(wrong))


def test_there_is_no_import_circle():
    edges = {module: {t for t in targets if t != module.rpartition(".")[0]} for module, targets in graph().items()}
    circles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_no_module_of_ml_or_catalog_is_over_500_lines_and_each_says_what_it_owns():
    problems = []
    for name, path in project_modules().items():
        if not name.startswith(("ml", "catalog")) or path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        lines = len(path.read_text().splitlines())
        if lines > 500:
            problems.append(f"{path.relative_to(REPO_ROOT)}: {lines} lines")
        if not ast.get_docstring(tree):
            problems.append(f"{path.relative_to(REPO_ROOT)}: no docstring saying what it owns")
    assert not problems, "\n".join(problems)
