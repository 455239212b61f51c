"""The package's layers point one way (rules → ops → module → engine → server/CLI): a test that
walks every import in vllm_umim (module level and inside functions) and fails on an upward one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_umim"


def subpackage_imports() -> dict[str, set[str]]:
    """{subpackage: subpackages it imports} (a top-level module counts as its own subpackage)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        source = parts[0]
        targets = graph.setdefault(source, set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}: relative import; use absolute vllm_umim.* imports")
            for name in names:
                if name.startswith("vllm_umim."):
                    target = name.split(".")[1]
                    if target != source:
                        targets.add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, stack, done = [], [], set()

    def visit(node):
        if node in stack:
            found.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            visit(target)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    return found


def test_engine_knows_nothing_of_server_or_cli():
    graph = subpackage_imports()
    assert not graph["engine"] & {"server", "cli"}, graph["engine"]


def test_no_cycles_between_subpackages():
    graph = subpackage_imports()
    assert cycles(graph) == [], graph
