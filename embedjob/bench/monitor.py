"""What the process tree uses while a measurement runs, read from ``/proc``: the peak PSS of this
process and its descendants (decode workers, e2e worker processes), the CPU time they all used, and
the CPU time of this process alone (the one that runs the task), without the monitor's own thread."""

from __future__ import annotations

import os
import resource
import threading
import time


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _tree(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _memory_kib(pid: int) -> int:
    """Proportional set size (shared pages split between the processes that share them), or RSS."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1])
        except OSError:
            continue
    return 0


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except OSError:
        return 0


def own_cpu_seconds() -> float:
    """CPU time (user + system) of this process's threads, not of its children (decode processes
    are children, and ``RUSAGE_SELF`` leaves them out)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class TreeMonitor:
    """Samples this process and every descendant (decode workers) while a measurement runs: the
    peak of their summed PSS, and the CPU seconds they used. ``own_cpu_seconds`` is this process's
    own CPU time over the measurement, less the monitor thread's sampling: what the process that runs
    the task pays, decode processes excluded."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_kib = 0
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._start = 0.0
        self.seconds = 0.0
        self._own_start = 0.0
        self._sampling = 0.0  # CPU seconds the monitor thread spent sampling
        self.own_cpu_seconds = 0.0

    def _sample(self) -> None:
        total = 0
        for pid in _tree(os.getpid()):
            total += _memory_kib(pid)
            ticks = _cpu_ticks(pid)
            self._first.setdefault(pid, 0 if self._start_sampled else ticks)  # born during it: all of it
            self._last[pid] = ticks
        self.peak_kib = max(self.peak_kib, total)

    def __enter__(self) -> TreeMonitor:
        self._start_sampled = False
        self._sample()
        self._start_sampled = True
        self._start = time.perf_counter()
        self._own_start = own_cpu_seconds()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            t = time.thread_time()
            self._sample()
            self._sampling += time.thread_time() - t

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.own_cpu_seconds = max(0.0, own_cpu_seconds() - self._own_start - self._sampling)
        self._sample()
        self.seconds = time.perf_counter() - self._start

    @property
    def cpu_seconds(self) -> float:
        ticks = sum(self._last[p] - self._first.get(p, 0) for p in self._last)
        return ticks / os.sysconf("SC_CLK_TCK")

    def report(self) -> dict[str, float]:
        return {"peak_pss_mib": round(self.peak_kib / 1024, 1), "cpu_seconds": round(self.cpu_seconds, 2),
                "cpu_cores_busy": round(self.cpu_seconds / self.seconds, 2) if self.seconds else 0.0,
                "main_cpu_seconds": round(self.own_cpu_seconds, 3)}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def max_rss_mib() -> float:
    """Peak RSS of this process (children not included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
