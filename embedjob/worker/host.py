"""Facts about the machine a worker runs on: the CPUs it may use.

Torch-free (the decode processes import this and must stay torch-free); the device is resolved
where torch is, in :mod:`embedjob.worker.model.torch_env`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


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
