"""The package's layers point one way (rules → ops → module → engine → server/CLI): a test that
walks every import in vllm_umim (module level and inside functions) and fails on an upward one,
and on a circle between two modules of the same subpackage. The command line (argparse) lives in
``vllm_umim/cli`` only."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_umim"


def module_name(path: Path) -> str:
    """``training.teacher_cache`` for vllm_umim/training/teacher_cache.py, ``training`` for its __init__."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> list[str]:
    """Every ``vllm_umim.*`` module ``path`` imports, anywhere in the file (``from vllm_umim.x import y``
    names ``x.y`` when ``y`` is a module, else ``x``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use absolute vllm_umim.* imports")
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            candidates = [f"{node.module}.{alias.name}" for alias in node.names]
            candidates = [c if _is_module(c) else node.module for c in candidates]
        else:
            continue
        names += [c.removeprefix("vllm_umim.") for c in candidates if c.startswith("vllm_umim.")]
    return names


def _is_module(dotted: str) -> bool:
    relative = Path(*dotted.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def module_imports() -> dict[str, set[str]]:
    """{module: the vllm_umim modules it imports} (``training.cli``-style dotted names)."""
    return {module_name(path): set(imported_names(path)) - {module_name(path)} for path in PACKAGE.rglob("*.py")}


def subpackage_imports() -> dict[str, set[str]]:
    """{subpackage: subpackages it imports} (a top-level module counts as its own subpackage)."""
    graph: dict[str, set[str]] = {}
    for module, targets in module_imports().items():
        source = module.split(".")[0]
        graph.setdefault(source, set()).update(t.split(".")[0] for t in targets if t.split(".")[0] != source)
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


def module_cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Circles between modules of one subpackage, each as its sorted module names."""
    inside = {m: {t for t in targets if t.split(".")[0] == m.split(".")[0]} for m, targets in graph.items()}
    return {tuple(sorted(set(c))) for c in cycles(inside)}


def test_engine_knows_nothing_of_server_or_cli():
    graph = subpackage_imports()
    assert not graph["engine"] & {"server", "cli"}, graph["engine"]


def test_no_cycles_between_subpackages():
    graph = subpackage_imports()
    assert cycles(graph) == [], graph


def test_no_cycles_between_modules_of_a_subpackage():
    found = module_cycles(module_imports())
    assert found == set(), f"import circles inside a subpackage: {sorted(found)}"


def test_module_cycles_are_found():
    graph = {"training.cli": {"training.teacher_cache"}, "training.teacher_cache": {"training.cli", "module.batches"},
             "module.batches": set(), "engine.a": {"server.b"}, "server.b": {"engine.a"}}
    assert module_cycles(graph) == {("training.cli", "training.teacher_cache")}  # engine <-> server: the subpackage test's


def test_only_the_cli_builds_command_lines():
    users = sorted(module for module, path in ((module_name(p), p) for p in PACKAGE.rglob("*.py"))
                   if not module.startswith("cli") and any(
                       isinstance(node, (ast.Import, ast.ImportFrom)) and "argparse" in _stdlib_names(node)
                       for node in ast.walk(ast.parse(path.read_text()))))
    assert users == [], f"argparse outside vllm_umim/cli: {users}"


def _stdlib_names(node) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    return {node.module.split(".")[0]} if node.module and not node.level else set()
