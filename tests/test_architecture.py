"""The architecture holds (issue 13): no import cycles, no private names across modules, short functions,
few parameters, and the runtime imports neither the benchmarks nor the references."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"mlx_gpt2": REPO / "mlx_gpt2", "mlx_gpt2.convert": REPO / "convert"}
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 10
REFERENCES = ("torch", "transformers", "mlx_lm", "transformer_lens", "benchmarks")


def modules() -> dict[str, Path]:
    """Every module of the installed package by its dotted name (convert/ is installed as mlx_gpt2.convert)."""
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            if package == "mlx_gpt2" and path.is_relative_to(REPO / "mlx_gpt2" / "convert"):
                continue
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _import(node: ast.AST, package: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) of one import statement, a relative one resolved."""
    if isinstance(node, ast.Import):
        return [(alias.name, [], node.lineno) for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join([*anchor, *([base] if base else [])])
    return [(base, [alias.name for alias in node.names], node.lineno)]


def imports(name: str, path: Path, *, top_level_only: bool = False) -> list[tuple[str, list[str], int]]:
    """Every import of a module (or only those run when it is imported: not the ones inside functions)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found += _import(node, _package(name, path))
    return found


def resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The package modules an import statement loads (`from pkg import module` names a module too)."""
    result = [target] if target in known else []
    result += [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return result


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in it (a deferred import inside a function still
    ties the two together), with the packages that importing a submodule runs first."""
    known = modules()
    graph = {}
    for name, path in known.items():
        edges = set()
        for target, taken, _ in imports(name, path):
            for module in resolve(target, taken, known):
                parts = module.split(".")
                edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))  # mlx_gpt2.x.y runs mlx_gpt2.x
        graph[name] = {m for m in edges if m in known and m != name}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    for name in graph:  # a package's __init__ gathering its own submodules is how packages work
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_no_private_names_cross_modules():
    known = modules()
    crossings = []
    for name, path in known.items():
        for target, taken, line in imports(name, path):
            if target.startswith("mlx_gpt2") and target != name:
                crossings += [f"{path.relative_to(REPO)}:{line} takes {n} from {target}" for n in taken if n.startswith("_")]
    assert not crossings, crossings


def test_the_runtime_imports_no_reference_or_benchmark():
    offenders = []
    for name, path in modules().items():
        for target, _, line in imports(name, path):
            if target.split(".")[0] in REFERENCES:
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not offenders, offenders


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in modules().items():
        for fn in _functions(ast.parse(path.read_text())):
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(REPO)}:{fn.lineno} {fn.name} is {length} lines")
    assert not long, long


def test_public_functions_outside_the_cli_take_few_parameters():
    wide = []
    for name, path in modules().items():
        if name.startswith("mlx_gpt2.cli"):
            continue  # a Typer command declares its options as parameters (grouped into help panels)
        for fn in _functions(ast.parse(path.read_text())):
            a = fn.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - (1 if a.args and a.args[0].arg in ("self", "cls") else 0)
            if not fn.name.startswith("_") and count > MAX_PARAMETERS:
                wide.append(f"{path.relative_to(REPO)}:{fn.lineno} {fn.name} takes {count}")
    assert not wide, wide
