"""The code's shape, over the whole tree (``audit_service``, ``workers``, ``clip_audit_client``, ``manage.py``;
generated migrations left out): every module sits in one room, a room imports only the rooms it may (``MAY_IMPORT``,
the layers of docs/system.md), no modules import each other in a circle, no function is longer than 60 lines,
the engine imports no Django or Celery and the client no torch, Django or server code.

Imports are read with ``ast``, at module level and inside functions alike: a function-level import written to
dodge a cycle is still an edge of it. Each rule is tested on the real tree and on a small tree that breaks it.
"""
from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("audit_service", "workers", "clip_audit_client")
MAX_FUNCTION_LINES = 60

# rooms, first match wins: a pattern matches a module and what is under it; "*" is one name
ROOMS = (
    ("client", ("clip_audit_client",)),
    ("celery app", ("workers.celery",)),
    # the engine's modules the web process may use: light (no torch at import) and stable
    ("engine doors", ("workers.engine.config", "workers.engine.errors", "workers.engine.stages",
                      "workers.engine.jsonsafe", "workers.engine.imagefiles", "workers.engine.registration",
                      "workers.engine.rounds", "workers.engine.checklist", "workers.engine.columns")),
    ("engine", ("workers.engine",)),
    ("case study", ("workers.casestudy",)),
    ("workers", ("workers",)),
    ("web and API", ("audit_service.web", "audit_service.*.api", "audit_service.*.serializers")),
    ("entry points", ("audit_service.urls", "audit_service.settings", "audit_service.wsgi", "audit_service.cli",
                      "audit_service.*.management", "manage")),
    ("domain", ("audit_service",)),
)
# the rooms each room may import besides itself
MAY_IMPORT = {
    "client": set(),
    "celery app": set(),
    "engine doors": {"engine"},  # a door loads what it checks with inside the call
    "engine": {"engine doors"},
    "case study": {"engine", "engine doors"},
    "workers": {"domain", "engine", "engine doors", "celery app"},
    "web and API": {"domain", "engine doors"},
    "domain": {"engine doors", "celery app"},
    "entry points": {"client", "celery app", "engine doors", "case study", "web and API", "domain"},
}
# libraries a room must not import
BANNED = {
    "client": ("torch", "open_clip", "numpy", "django", "rest_framework", "celery"),
    "engine": ("django", "rest_framework", "celery"),
    "engine doors": ("django", "rest_framework", "celery"),
    "case study": ("django", "rest_framework", "celery"),
}


def source_files(root: Path) -> list[Path]:
    files = [p for package in PACKAGES for p in (root / package).rglob("*.py") if "migrations" not in p.parts]
    return sorted(files + [p for p in [root / "manage.py"] if p.exists()])


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


def room_of(module: str) -> str | None:
    parts = module.split(".")
    for room, patterns in ROOMS:
        for pattern in patterns:
            wanted = pattern.split(".")
            if len(parts) >= len(wanted) and all(fnmatchcase(p, w) for p, w in zip(parts, wanted)):
                return room
    return None


def layer_breaks(root: Path, files: list[Path]) -> list[str]:
    """"file:line: room imports module (room)" for each import of a room the importing room may not use, and
    for each banned library."""
    found = set()
    for path in files:
        here = room_of(module_name(root, path))
        named = imports(root, path)
        # ``from a import b`` is judged by what it names (a.b), not by the package a it goes through
        named = [(line, m) for line, m in named if not any(n == line and o.startswith(m + ".") for n, o in named)]
        for line, module in named:
            there = room_of(module) if module.split(".")[0] in (*PACKAGES, "manage") else None
            where = f"{path.relative_to(root)}:{line}"
            if there and there != here and there not in MAY_IMPORT[here]:
                found.add(f"{where}: {here} imports {module} ({there})")
            if module.split(".")[0] in BANNED.get(here, ()):
                found.add(f"{where}: {here} imports {module}")
    return sorted(found)


def import_graph(root: Path, files: list[Path]) -> dict[str, dict[str, str]]:
    """module -> {module it imports: "file:line"}, among the given files' modules (an import of a name inside a
    module is an edge to the module)."""
    modules = {module_name(root, p): p for p in files}
    edges = {name: {} for name in modules}
    for name, path in modules.items():
        for line, module in imports(root, path):
            parts = module.split(".")
            target = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules),
                          None)
            if target and target != name:
                edges[name].setdefault(target, f"{path.relative_to(root)}:{line}")
    return edges


def import_cycles(root: Path, files: list[Path]) -> list[str]:
    """One circle per group of modules that import each other (a strongly connected component), written from
    its first module by name: "a (file:line) -> b (file:line) -> a"; the line is where a module imports the next."""
    edges = import_graph(root, files)
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(_shortest_circle(edges, group) for group in groups)


def _shortest_circle(edges: dict[str, dict[str, str]], group: set[str]) -> str:
    start = min(group)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(edges[path[-1]]):
            if w == start:
                loop = path + [start]
                return " -> ".join(f"{a} ({edges[a][b]})" for a, b in zip(loop, loop[1:])) + f" -> {start}"
            if w in group and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"no circle through {start}")


def long_functions(root: Path, files: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} has {lines} lines")
    return found


def test_every_module_sits_in_a_room():
    files = source_files(REPO)
    assert len(files) > 100, "the tree was not found"
    assert [str(p.relative_to(REPO)) for p in files if room_of(module_name(REPO, p)) is None] == []


def test_each_room_imports_only_the_rooms_below_it():
    assert layer_breaks(REPO, source_files(REPO)) == []


def test_no_modules_import_each_other_in_a_circle():
    assert import_cycles(REPO, source_files(REPO)) == []


def test_no_function_is_longer_than_60_lines():
    assert long_functions(REPO, source_files(REPO)) == []


def test_the_checks_find_a_forbidden_import_a_circle_and_a_long_function(tmp_path):
    def write(rel: str, text: str) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)

    for package in ("audit_service", "audit_service/audits", "audit_service/web", "workers", "workers/engine",
                    "clip_audit_client"):
        write(f"{package}/__init__.py", "")
    write("workers/tasks.py", "from workers import sharded\n")
    write("workers/sharded.py", "def start():\n    from .tasks import run_audit\n")
    write("workers/engine/stages.py", "def f():\n    from django.conf import settings\n")
    write("workers/engine/sae.py", "from workers.storage import fetch\n")
    write("workers/storage.py", "")
    write("audit_service/audits/serializers.py", "from .models import Audit\n")
    write("audit_service/audits/models.py", "from workers.engine.sae import TopKSAE\n")
    write("audit_service/web/views.py", "def progress():\n    from workers.sharded import shard_progress\n")
    write("clip_audit_client/cli.py", "import torch\nfrom audit_service.audits import models\n")
    write("workers/long.py", "def run():\n" + "    pass\n" * MAX_FUNCTION_LINES)
    write("audit_service/audits/migrations/0001_initial.py", "def run():\n" + "    pass\n" * MAX_FUNCTION_LINES)

    files = source_files(tmp_path)
    assert layer_breaks(tmp_path, files) == [
        "audit_service/audits/models.py:1: domain imports workers.engine.sae.TopKSAE (engine)",
        "audit_service/web/views.py:2: web and API imports workers.sharded.shard_progress (workers)",
        "clip_audit_client/cli.py:1: client imports torch",
        "clip_audit_client/cli.py:2: client imports audit_service.audits.models (domain)",
        "workers/engine/sae.py:1: engine imports workers.storage.fetch (workers)",
        "workers/engine/stages.py:2: engine doors imports django.conf.settings"]
    assert import_cycles(tmp_path, files) == [
        "workers.sharded (workers/sharded.py:2) -> workers.tasks (workers/tasks.py:1) -> workers.sharded"]
    assert long_functions(tmp_path, files) == [f"workers/long.py:1 run has {MAX_FUNCTION_LINES + 1} lines"]


def test_a_circle_of_three_is_found_once_through_its_first_module(tmp_path):
    for rel, text in (("workers/__init__.py", ""), ("workers/a.py", "import workers.b\n"),
                      ("workers/b.py", "from workers import c\n"), ("workers/c.py", "def f():\n    import workers.a\n"),
                      ("workers/d.py", "import workers.a\n")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert import_cycles(tmp_path, source_files(tmp_path)) == [
        "workers.a (workers/a.py:1) -> workers.b (workers/b.py:1) -> workers.c (workers/c.py:2) -> workers.a"]
