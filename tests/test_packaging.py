"""Layout rules a user or a tool would trip over (docs/architecture.md, "Layout"): import names, the
source where its import path says (no links, no second copy),
torch-free shared modules, dev tooling apart from the runtime, and package data instead of paths into
the source checkout. The installed wheel is tested in tests/test_wheel.py."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from embedjob.bundled import CRD_FILENAME, crd_manifest, sample_shards

REPO = Path(__file__).resolve().parents[1]
PACKAGE_SOURCES = [REPO / "embedjob"]


def run_py(code: str, cwd: Path = REPO) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, capture_output=True, text=True).stdout


def source_files() -> list[Path]:
    return sorted(p for root in PACKAGE_SOURCES for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def test_bare_operator_is_the_standard_library_even_from_the_repo_root():
    out = run_py("import operator, sysconfig; print(operator.__file__); print(sysconfig.get_paths()['stdlib'])")
    module_file, stdlib = out.split()
    assert module_file.startswith(stdlib)
    # -S skips site, so nothing preloads the stdlib operator and the repo root comes first on sys.path.
    out = subprocess.run([sys.executable, "-S", "-c", "import operator; print(operator.__file__)"], cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    assert not out.strip().startswith(str(REPO / "operator")), out


def test_packages_import_under_embedjob():
    code = ("import os, embedjob.operator.status as o, embedjob.worker.runtime.task as w; "
            "print(os.path.realpath(o.__file__), os.path.realpath(w.__file__))")
    op, wk = run_py(code, cwd=Path("/")).split()
    assert op == str(REPO / "embedjob" / "operator" / "status.py")
    assert wk == str(REPO / "embedjob" / "worker" / "runtime" / "task.py")


def test_no_links_and_no_top_level_program_folders():
    """Each module has one real path, its import path: the repository holds no symbolic links, and no
    top-level operator/ or worker/ (a bare `import operator` must find the standard library)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout
    assert [line for line in listing.splitlines() if line.startswith("120000")] == []
    assert not (REPO / "operator").exists() and not (REPO / "worker").exists()


def test_shared_contract_is_torch_free():
    mods = ["embedjob", "embedjob.spec", "embedjob.storage", "embedjob.layout", "embedjob.planning",
            "embedjob.contract", "embedjob.progress", "embedjob.broker", "embedjob.results", "embedjob.bundled",
            "embedjob.cli.main"]
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {mods!r}]; "
            "import embedjob.cli.main as c; c.build_parser(); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)")
    assert run_py(code, cwd=Path("/")).strip() == "[]"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_nothing_finds_files_relative_to_its_own_source():
    """Installed commands find their files as package data, never next to a source checkout."""
    offenders = [str(p.relative_to(REPO)) for p in source_files() if "__file__" in p.read_text()]
    assert offenders == []


def test_no_script_puts_the_repo_root_first_on_sys_path():
    """./embedjob would shadow the installed package, which alone has embedjob.operator / .worker."""
    offenders = [str(p.relative_to(REPO)) for p in sorted((REPO / "scripts").glob("*.py"))
                 if "sys.path.insert(0" in p.read_text()]
    assert offenders == []


def test_packaged_crd_and_sample_shards_are_the_repository_copies():
    assert crd_manifest().name == CRD_FILENAME
    assert crd_manifest().read_bytes() == (REPO / "crds" / CRD_FILENAME).read_bytes()
    repo_shards = sorted((REPO / "examples" / "shards").glob("*.tar"))
    assert [p.name for p in sample_shards()] == [p.name for p in repo_shards] and len(repo_shards) == 3
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(sample_shards(), repo_shards, strict=True))


def test_docs_are_the_repository_own():
    """The code and docs cite docs/architecture.md and docs/operations.md, which are in the repo."""
    assert (REPO / "docs" / "architecture.md").is_file() and (REPO / "docs" / "operations.md").is_file()
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    cited = subprocess.run(["git", "grep", "-l", "-e", "DESIGN.md", "-e", "INFRA.md", "--",
                            ":!tests/test_packaging.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert cited == []
