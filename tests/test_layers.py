"""The import graph by layers (docs/architecture.md, "Layout"), read from the source:

    entry point   embedjob.cli                      the CLI, `embedjob run`; imported by nothing
    tools         embedjob.bench, embedjob.dev      benchmarks and the dev stack; imported only by the CLI
    programs      embedjob.operator, embedjob.worker  never import each other
    core          embedjob.*  (the rest)            torch-free; imports none of the above

Imports inside functions count as much as those at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "embedjob"
LAYERS = {"cli": "entry", "bench": "tools", "dev": "tools", "operator": "operator", "worker": "worker"}
# What each layer may import, besides itself and the core.
ALLOWED = {
    "core": set(),
    "operator": set(),
    "worker": set(),
    "tools": {"worker", "operator", "tools"},
    "entry": {"worker", "operator", "tools", "entry"},
}


def layer_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "embedjob":
        return None
    return LAYERS.get(parts[1], "core") if len(parts) > 1 else "core"


def layer_of_file(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return LAYERS.get(rel[0], "core") if len(rel) > 1 else "core"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, text: str | None = None) -> set[str]:
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    names: set[str] = set()
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
            if node.module in ("embedjob", None) or (node.module and node.module.split(".")[0] == "embedjob"):
                names.update(f"{node.module}.{a.name}" for a in node.names if node.module)
    return names


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def crossings() -> list[str]:
    bad = []
    for path in sources():
        src = layer_of_file(path)
        for name in sorted(imported_modules(path)):
            dst = layer_of_module(name)
            if dst is None or dst == src or dst == "core":
                continue
            if dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(REPO)} ({src}) imports {name} ({dst})")
    return bad


def test_layers_import_only_downwards():
    assert crossings() == []


def test_nothing_imports_the_entry_point_layer():
    offenders = [f"{p.relative_to(REPO)} imports {n}" for p in sources() if layer_of_file(p) != "entry"
                 for n in imported_modules(p) if layer_of_module(n) == "entry"]
    assert offenders == []


def test_the_checker_sees_a_crossing():
    """The rule is not vacuous: upward and sideways imports, absolute or relative, are caught."""
    def layers(text: str, path: Path) -> set[str | None]:
        return {layer_of_module(n) for n in imported_modules(path, text)}

    assert layer_of_file(PACKAGE / "spec.py") == "core"
    assert "worker" in layers("from embedjob.worker.datapath import shard\n", PACKAGE / "spec.py")
    assert "operator" in layers("from ..operator import status\n", PACKAGE / "worker" / "host.py")
    assert "entry" in layers("import embedjob.cli.main\n", PACKAGE / "bench" / "run.py")
    assert "worker" not in ALLOWED["core"] and "operator" not in ALLOWED["worker"] and "entry" not in ALLOWED["tools"]


# Inside the worker, by role, from the top down: runtime (the Celery task and the process's life), then the
# data path (one shard's stages), then the model (checkpoint, towers, its preprocessing), then host.
WORKER_ROOMS = ["runtime", "datapath", "model", "host"]


def test_worker_rooms_import_only_downwards():
    worker = PACKAGE / "worker"
    bad = []
    for path in sorted(worker.rglob("*.py")):
        room = path.relative_to(worker).parts[0].removesuffix(".py")
        if room not in WORKER_ROOMS:
            continue
        below = set(WORKER_ROOMS[WORKER_ROOMS.index(room):])
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[:2] == ["embedjob", "worker"] and len(parts) > 2 and parts[2] not in below:
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)
