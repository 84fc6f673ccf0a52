"""What the process tree uses while a measurement runs, read from ``/proc``: the peak PSS of this
process and its descendants (decode workers, e2e worker processes), the CPU time they all used, and
the CPU time of this process alone (the one that runs the task), without the monitor's own thread."""

from __future__ import annotations

import os
import re
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
    return _cpu_ticks_of(f"/proc/{pid}/stat") or 0


def own_cpu_seconds() -> float:
    """CPU time (user + system) of this process's threads, not of its children (decode processes
    are children, and ``RUSAGE_SELF`` leaves them out)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _thread_group(name: str) -> str:
    """A thread's name without its numbers: the decode sender of worker 3 and of worker 5, or two
    shards' forward threads, count together."""
    return re.sub(r"\d+", "N", name)


class ThreadCpu:
    """The CPU time of this process's threads over a measurement, by thread name (Python's name where
    the thread is a Python thread, the kernel's ``comm`` otherwise: torch's and CUDA's own threads).
    Which of the worker's threads pays for what: the question ``main_cpu_ms_per_image`` alone cannot
    answer.

    Threads that end during the measurement (one forward thread per shard) report their own
    ``time.thread_time()`` as they end: :meth:`start` wraps ``threading.Thread.run`` until :meth:`stop`
    (the bench's probe; nothing in the worker changes). Threads still running at the end are read
    from ``/proc/self/task``, less what they had used at the start."""

    def __init__(self) -> None:
        self._first: dict[int, int] = {}
        self._ended: dict[str, float] = {}
        self._lock = threading.Lock()
        self._original_run = None
        self.seconds: dict[str, float] = {}

    def start(self) -> None:
        self._first = {tid: ticks for tid, ticks, _ in _threads()}
        original = self._original_run = threading.Thread.run
        ended, lock = self._ended, self._lock

        def run(thread: threading.Thread) -> None:
            try:
                original(thread)
            finally:
                with lock:
                    name = _thread_group(thread.name)
                    ended[name] = ended.get(name, 0.0) + time.thread_time()

        threading.Thread.run = run  # type: ignore[method-assign]

    def stop(self) -> dict[str, float]:
        """CPU seconds per thread group, largest first."""
        if self._original_run is not None:
            threading.Thread.run = self._original_run  # type: ignore[method-assign]
            self._original_run = None
        hz = os.sysconf("SC_CLK_TCK")
        with self._lock:
            out = dict(self._ended)
        for tid, ticks, name in _threads():
            out[name] = out.get(name, 0.0) + (ticks - self._first.get(tid, 0)) / hz
        self.seconds = dict(sorted(((k, round(v, 3)) for k, v in out.items() if v > 0), key=lambda kv: -kv[1]))
        return self.seconds


def _threads() -> list[tuple[int, int, str]]:
    """(id, CPU ticks, name group) of this process's running threads."""
    python = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []
    out = []
    for tid in tids:
        ticks = _cpu_ticks_of(f"/proc/self/task/{tid}/stat")
        if ticks is None:
            continue
        name = python.get(tid)
        if name is None:
            try:  # not a Python thread: torch's intra-op pool, CUDA's, the JIT's
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f"native:{f.read().strip()}"
            except OSError:
                name = "native:?"
        out.append((tid, ticks, _thread_group(name)))
    return out


def _cpu_ticks_of(path: str) -> int | None:
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


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
        self.threads = ThreadCpu()

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
        self.threads.start()
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
        self.threads.stop()
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
                "main_cpu_seconds": round(self.own_cpu_seconds, 3),
                "main_cpu_seconds_by_thread": {k: v for k, v in self.threads.seconds.items()
                                               if k != "bench-monitor"}}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def max_rss_mib() -> float:
    """Peak RSS of this process (children not included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
