"""The multiprocess folder of the worker's metrics, prepared by ``embedjob worker`` before anything
imports prometheus_client (it picks its file-backed values at import time, from
``PROMETHEUS_MULTIPROC_DIR``). Kept free of prometheus_client imports for that reason."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from embedjob.settings import set_library_env

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare(path: str = "") -> str:
    """Create (or wipe) the folder and export it to this process and the pool children it forks.
    ``path`` empty: a fresh temporary folder. Returns the folder."""
    folder = Path(path) if path else Path(tempfile.mkdtemp(prefix="embedjob-metrics-"))
    if folder.exists():
        for child in folder.iterdir():  # wiped: values of a previous run must not leak into this one
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    set_library_env(ENV, str(folder))
    return str(folder)
