"""Facts about the machine a worker runs on: the CPUs it may use and the device it computes on.

Torch-free at import (the decode processes import this and must stay torch-free): only
:func:`resolve_device` imports torch, through :mod:`embedjob.worker.model.torch_env`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from embedjob.worker.model import ModelLoadError

if TYPE_CHECKING:
    import torch


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup v2 CPU quota (a
    container limited to 4 CPUs on a 64-core node must not start 64 threads)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def resolve_device(device: str = "auto") -> torch.device:
    """auto: CUDA when torch sees a GPU, else the CPU; cpu / cuda[:N]: as asked, if this machine has
    it. Raises :class:`~embedjob.worker.model.ModelLoadError`."""
    from embedjob.worker.model.torch_env import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {device!r} (use auto, cpu or cuda)")
    return dev
