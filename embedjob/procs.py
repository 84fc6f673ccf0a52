"""Processes by id. Torch-free; shared by the worker's probes and the dev tooling."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as stopped; a process of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


OWNER_FILE = ".owner"


class FolderInUse(RuntimeError):
    """Another live process owns a folder that must belong to one process tree."""


def claim_folder(folder: str | os.PathLike, setting: str) -> None:
    """Make this process the owner of ``folder`` (a worker's probe or metrics folder, wiped at start),
    or raise :class:`FolderInUse` when a live process already owns it. Two workers sharing one such
    folder would wipe each other's state and read each other's shutdown: a worker would think itself
    shutting down and give back every shard it takes. ``setting`` names the variable that chose the
    folder, for the message."""
    owner = os.path.join(folder, OWNER_FILE)
    try:
        with open(owner) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid() and process_alive(pid):
        raise FolderInUse(f"{setting}={os.fspath(folder)} is in use by another worker (pid {pid}); "
                          "give each worker its own folder, or leave it unset for a fresh temporary one")
    tmp = f"{owner}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, owner)
