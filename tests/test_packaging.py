"""Layout rules of DESIGN.md that a user would trip over: import names, torch-free shared modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_py(code: str, cwd: Path = REPO) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_bare_operator_is_the_standard_library_even_from_the_repo_root():
    out = run_py("import operator, sysconfig; print(operator.__file__); print(sysconfig.get_paths()['stdlib'])")
    module_file, stdlib = out.split()
    assert module_file.startswith(stdlib)
    # -S skips site, so nothing preloads the stdlib operator and the repo root comes first on sys.path.
    out = subprocess.run([sys.executable, "-S", "-c", "import operator; print(operator.__file__)"], cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    assert not out.strip().startswith(str(REPO / "operator")), out


def test_packages_import_under_embedjob():
    code = ("import os, embedjob.operator.status as o, embedjob.worker.tasks as w; "
            "print(os.path.realpath(o.__file__), os.path.realpath(w.__file__))")
    op, wk = run_py(code, cwd=Path("/")).split()
    assert op == str(REPO / "operator" / "status.py") and wk == str(REPO / "worker" / "tasks.py")


def test_shared_contract_is_torch_free():
    mods = ["embedjob", "embedjob.spec", "embedjob.storage", "embedjob.layout", "embedjob.planning",
            "embedjob.contract", "embedjob.progress", "embedjob.broker", "embedjob.results", "embedjob.cli"]
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {mods!r}]; "
            "import embedjob.cli as c; c.build_parser(); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)")
    assert run_py(code, cwd=Path("/")).strip() == "[]"
