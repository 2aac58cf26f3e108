"""The code's shape: imports run one way (web / API -> domain <- workers -> engine), the workers' modules do not
import each other in a cycle, the engine imports no Django, and no function of the workers is long.

Imports are read with ``ast``, at module level and inside functions alike: a function-level import written to
dodge a cycle is still an edge of it.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DJANGO = ("django", "rest_framework", "audit_service", "celery")
MAX_FUNCTION_LINES = 60


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file. ``from a import b`` counts as importing ``a`` and ``a.b``
    (``b`` may be a module); relative imports are resolved."""
    package = module_name(root, path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def forbidden_imports(root: Path, files: list[Path], banned: tuple[str, ...]) -> list[str]:
    """"file:line imports module" for each import in ``files`` of a module under a package in ``banned``."""
    found = []
    for path in files:
        for line, module in imports(root, path):
            if module.split(".")[0] in banned:
                found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return sorted(set(found))


def import_cycles(root: Path, package: str) -> list[str]:
    """The import cycles among the top-level modules of ``package`` (its files, not its subpackages), each once,
    as "a (file:line) -> b (file:line) -> a": the line is where the module imports the next one."""
    folder = root / package.replace(".", "/")
    modules = {f"{package}.{p.stem}": p for p in folder.glob("*.py") if p.name != "__init__.py"}
    edges = {name: {} for name in modules}
    for name, path in modules.items():
        for line, module in imports(root, path):
            target = next((m for m in modules if module == m or module.startswith(m + ".")), None)
            if target and target != name:
                edges[name].setdefault(target, f"{path.relative_to(root)}:{line}")
    cycles = set()

    def visit(name: str, trail: list[str]) -> None:
        for target in edges[name]:
            if target in trail:
                loop = trail[trail.index(target):]
                first = loop.index(min(loop))  # one way to write each cycle: from its first module by name
                loop = loop[first:] + loop[:first] + [loop[first]]
                cycles.add(" -> ".join(f"{a} ({edges[a][b]})" for a, b in zip(loop, loop[1:])) + f" -> {loop[0]}")
            else:
                visit(target, trail + [target])

    for name in sorted(modules):
        visit(name, [name])
    return sorted(cycles)


def long_functions(root: Path, files: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} has {lines} lines")
    return found


def web_and_api_files(root: Path) -> list[Path]:
    app = root / "audit_service"
    return sorted([*app.glob("*/api.py"), *app.glob("*/serializers.py"), *(app / "web").rglob("*.py")])


def test_the_web_pages_and_the_api_do_not_import_the_workers():
    assert web_and_api_files(REPO), "the API and web files were not found"
    assert forbidden_imports(REPO, web_and_api_files(REPO), ("workers",)) == []


def test_the_modules_of_the_workers_do_not_import_each_other_in_a_cycle():
    assert import_cycles(REPO, "workers") == []


def test_the_engine_imports_nothing_of_django_or_celery():
    files = sorted((REPO / "workers" / "engine").rglob("*.py"))
    assert files
    assert forbidden_imports(REPO, files, DJANGO) == []


def test_no_function_of_the_workers_is_longer_than_60_lines():
    assert long_functions(REPO, sorted((REPO / "workers").glob("*.py"))) == []


def test_the_checks_find_a_forbidden_import_a_cycle_and_a_long_function(tmp_path):
    def write(rel: str, text: str) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)

    write("workers/__init__.py", "")
    write("workers/tasks.py", "from workers import sharded\n")
    write("workers/sharded.py", "def start():\n    from .tasks import run_audit\n")
    write("workers/steps.py", "import workers.engine.stages\n")
    write("workers/engine/__init__.py", "")
    write("workers/engine/stages.py", "def f():\n    from django.conf import settings\n")
    write("audit_service/audits/serializers.py", "from .models import Audit\n")
    write("audit_service/web/views.py", "def progress():\n    from workers.sharded import shard_progress\n")
    write("workers/long.py", "def run():\n" + "    pass\n" * MAX_FUNCTION_LINES)

    assert forbidden_imports(tmp_path, web_and_api_files(tmp_path), ("workers",)) == [
        "audit_service/web/views.py:2 imports workers.sharded",
        "audit_service/web/views.py:2 imports workers.sharded.shard_progress"]
    assert import_cycles(tmp_path, "workers") == [
        "workers.sharded (workers/sharded.py:2) -> workers.tasks (workers/tasks.py:1) -> workers.sharded"]
    assert forbidden_imports(tmp_path, sorted((tmp_path / "workers/engine").rglob("*.py")), DJANGO) == [
        "workers/engine/stages.py:2 imports django.conf", "workers/engine/stages.py:2 imports django.conf.settings"]
    assert long_functions(tmp_path, sorted((tmp_path / "workers").glob("*.py"))) == [
        f"workers/long.py:1 run has {MAX_FUNCTION_LINES + 1} lines"]
