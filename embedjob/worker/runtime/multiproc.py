"""The multiprocess folder of the worker's metrics, prepared by ``embedjob worker`` before anything
imports prometheus_client (it picks its file-backed values at import time, from
``PROMETHEUS_MULTIPROC_DIR``). Kept free of prometheus_client imports for that reason."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from embedjob.procs import OWNER_FILE, claim_folder
from embedjob.settings import set_library_env

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare(path: str = "") -> str:
    """Create (or wipe) the folder and export it to this process and the pool children it forks.
    ``path`` empty: a fresh temporary folder. Returns the folder. A folder owned by another live
    worker is refused (:class:`embedjob.procs.FolderInUse`)."""
    folder = Path(path) if path else Path(tempfile.mkdtemp(prefix="embedjob-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    claim_folder(folder, ENV)  # wiping another live worker's values would corrupt its /metrics
    for child in folder.iterdir():  # wiped: values of a previous run must not leak into this one
        if child.is_dir():
            shutil.rmtree(child)
        elif child.name != OWNER_FILE:
            child.unlink()
    set_library_env(ENV, str(folder))
    return str(folder)
