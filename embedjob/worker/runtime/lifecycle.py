"""A worker pod's lifecycle across its processes: graceful shutdown, liveness, readiness, GPU pinning.

Everything is shared through small files in one folder (``EMBEDJOB_HEALTH_DIR``, prepared by
``embedjob worker`` before the pool forks, like the metrics folder), so it works the same for the
threads pool (one process) and the prefork pool (one process per GPU):

    consumer          touched every few seconds by the main process's consumer loop (a Celery
                      consumer bootstep timer): a wedged loop stops touching it
    expect            how many pool processes must be ready (1, or the GPUs per pod)
    ready-<pid>       a pool process is ready: its model is loaded (``EMBEDJOB_PRELOAD_MODEL``), or
                      it needs none up front
    task-<pid>-<tid>  a shard task in flight; touched at every step forward (a batch embedded, the
                      heartbeat's progress); its content names the shard
    shutdown          SIGTERM came: its content is the wall-clock time after which shards still in
                      flight are given back (``EMBEDJOB_SHUTDOWN_DEADLINE`` after the signal)

``check()`` turns the folder into the answers of ``/healthz`` and ``/readyz`` (served by the main
process on ``EMBEDJOB_HEALTH_PORT``): live = the consumer loop ticks and no task has been stuck for
``EMBEDJOB_STALL_SECONDS``; ready = live, every pool process ready, not shutting down.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from embedjob.procs import OWNER_FILE, claim_folder, process_alive

log = logging.getLogger("embedjob.worker")

ENV = "EMBEDJOB_HEALTH_DIR"
CONSUMER_BEAT = 2.0  # seconds between the consumer loop's touches
CONSUMER_STALE = 30.0  # a consumer loop silent this long is wedged

_dir: Path | None = None
_shutdown_at: float | None = None  # this process's cached view of the shutdown file
_checked = 0.0


class GiveBack(Exception):  # noqa: N818 - an instruction, not an error report
    """The worker is shutting down and the shard cannot finish in time: abort it (nothing is
    committed), hand it back to the broker at once."""


def prepare(path: str = "", processes: int = 1) -> Path:
    """Create (or wipe) the folder, record how many pool processes must be ready, and export it to
    the children (entry point, before the pool forks). A folder owned by another live worker is
    refused (:class:`embedjob.procs.FolderInUse`)."""
    folder = Path(path) if path else Path(tempfile.mkdtemp(prefix="embedjob-health-"))
    folder.mkdir(parents=True, exist_ok=True)
    claim_folder(folder, ENV)  # a second worker on this folder would read this one's shutdown
    for child in folder.iterdir():
        if child.is_file() and child.name != OWNER_FILE:
            child.unlink()
    os.environ[ENV] = str(folder)
    configure(folder)
    expect_processes(processes)
    return folder


def expect_processes(processes: int) -> None:
    """Record how many pool processes must be ready before the worker is."""
    _touch("expect", str(processes))


def configure(folder: str | Path | None) -> None:
    global _dir, _shutdown_at, _checked
    _dir = Path(folder) if folder else None
    _shutdown_at, _checked = None, 0.0


def folder() -> Path | None:
    return _dir


def _touch(name: str, content: str | None = None) -> None:
    if _dir is None:
        return
    p = _dir / name
    try:
        if content is not None:
            tmp = p.with_name(f".{name}.tmp")
            tmp.write_text(content)
            tmp.replace(p)
        else:
            os.utime(p) if p.exists() else p.write_text("")
    except OSError as e:  # the probes then say so; a shard must not fail for it
        log.warning("health folder: cannot write %s: %s", p, e)


def _remove(name: str) -> None:
    if _dir is not None:
        (_dir / name).unlink(missing_ok=True)


# -- the consumer loop and the pool processes ---------------------------------------------------------
def consumer_beat() -> None:
    _touch("consumer")


def mark_ready(model: str = "") -> None:
    _touch(f"ready-{os.getpid()}", json.dumps({"pid": os.getpid(), "model": model, "at": time.time()}))


def process_exited(pid: int) -> None:
    _remove(f"ready-{pid}")
    if _dir is not None:
        for p in _dir.glob(f"task-{pid}-*"):
            p.unlink(missing_ok=True)


# -- shards in flight ----------------------------------------------------------------------------------
class TaskMarker:
    """``with TaskMarker(stem):`` marks one shard task in flight; ``progress()`` touches it (throttled)."""

    def __init__(self, stem: str) -> None:
        self.name = f"task-{os.getpid()}-{threading.get_ident()}"
        self.stem = stem
        self._last = 0.0

    def __enter__(self) -> TaskMarker:
        _touch(self.name, json.dumps({"stem": self.stem, "pid": os.getpid(), "started": time.time()}))
        self._last = time.monotonic()
        return self

    def progress(self) -> None:
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            _touch(self.name)

    def __exit__(self, *exc: object) -> None:
        _remove(self.name)


# -- shutdown --------------------------------------------------------------------------------------------
def begin_shutdown(deadline_seconds: float) -> None:
    """SIGTERM: shards still in flight ``deadline_seconds`` from now are given back (main process)."""
    global _shutdown_at
    _shutdown_at = time.time() + max(deadline_seconds, 0.0)
    _touch("shutdown", str(_shutdown_at))
    log.warning("shutting down: shards still running in %.0fs are given back to the queue", deadline_seconds)


def shutdown_deadline() -> float | None:
    """The wall-clock time after which shards are given back, or None (no shutdown). Read from the
    folder at most twice a second (pool children learn it from there)."""
    global _shutdown_at, _checked
    if _shutdown_at is not None or _dir is None:
        return _shutdown_at
    now = time.monotonic()
    if now - _checked >= 0.5:
        _checked = now
        try:
            _shutdown_at = float((_dir / "shutdown").read_text())
        except (OSError, ValueError):
            pass
    return _shutdown_at


def shutting_down() -> bool:
    return shutdown_deadline() is not None


def check_give_back() -> None:
    """Raise :class:`GiveBack` once the shutdown deadline has passed."""
    at = shutdown_deadline()
    if at is not None and time.time() >= at:
        raise GiveBack("worker shutting down: shard given back before the termination grace period ends")


# -- GPU pinning -------------------------------------------------------------------------------------------
_pool: dict = {"processes": 0, "pin": False, "visible": None, "per_gpu": 1, "cpus": None}
_assigned: str | None = None


def configure_pool(processes: int, pin_gpus: bool, visible: str | None, per_gpu: int = 1,
                   cpus: list[int] | None = None) -> None:
    """Entry point, before the prefork pool forks: ``processes`` children; when ``pin_gpus``, child i is
    pinned to GPU ``i // per_gpu`` (``visible``: the pod's CUDA_VISIBLE_DEVICES, read by the entry point)
    and to its own share of ``cpus`` (the CPUs the pod may use), so that its decode workers do not
    compete with its neighbours'."""
    _pool.update(processes=processes, pin=pin_gpus, visible=visible, per_gpu=max(1, int(per_gpu)),
                 cpus=sorted(cpus) if cpus else None)


def pool_processes() -> int:
    """Prefork children the entry point configured (0: the threads pool, shards in the main process)."""
    return int(_pool["processes"] or 0)


def assigned_gpu() -> str | None:
    """The GPU this pool process was pinned to, or None."""
    return _assigned


def pin_gpu(index: int) -> str | None:
    """In pool child ``index``, before CUDA is initialised: ``CUDA_VISIBLE_DEVICES`` = its own GPU, so
    ``cuda:0`` in this process is that GPU, and its CPU affinity = its share of the pod's CPUs (decode
    workers started later inherit it; ``available_cpus`` reads it). Returns the device, or None when
    pinning is off."""
    global _assigned
    if not _pool["pin"]:
        return None
    processes, per_gpu = int(_pool["processes"]), int(_pool["per_gpu"])
    _assigned = assign_gpu(index, processes, _pool["visible"], per_gpu)
    os.environ["CUDA_VISIBLE_DEVICES"] = _assigned
    share = cpu_share(index, processes, _pool["cpus"])
    if share and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, share)
    log.info("pool process %d (pid %d) pinned to GPU %s (CUDA_VISIBLE_DEVICES=%s), %d process(es) per GPU, "
             "CPUs %s", index, os.getpid(), _assigned, _assigned, per_gpu, ",".join(map(str, share)) or "all")
    return _assigned


def assign_gpu(index: int, processes: int, visible: str | None, per_gpu: int = 1) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of pool process ``index`` of ``processes``, ``per_gpu`` processes to a
    GPU: the ``index // per_gpu``-th of the devices the pod sees (``visible``: the inherited
    CUDA_VISIBLE_DEVICES, ids or UUIDs; unset or empty: 0..N-1). More GPUs asked for than visible is a
    configuration error."""
    if processes < 1 or not 0 <= index < processes:
        raise ValueError(f"pool process index {index} out of range for {processes} process(es)")
    if per_gpu < 1 or processes % per_gpu:
        raise ValueError(f"{processes} processes cannot be split {per_gpu} to a GPU")
    gpus = processes // per_gpu
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(gpus)]
    if len(devices) < gpus:
        raise ValueError(f"{gpus} GPU(s) for {processes} processes but only {len(devices)} visible device(s): "
                         f"{visible!r}")
    return devices[index // per_gpu]


def cpu_share(index: int, processes: int, cpus: list[int] | None) -> list[int]:
    """Process ``index``'s CPUs: an equal, contiguous share of ``cpus`` (the first ``len % processes``
    shares one larger). With fewer CPUs than processes, processes share CPUs round-robin. Empty when
    ``cpus`` is unknown (no pinning)."""
    if not cpus:
        return []
    if len(cpus) < processes:
        return [cpus[index % len(cpus)]]
    base, extra = divmod(len(cpus), processes)
    start = index * base + min(index, extra)
    return cpus[start:start + base + (1 if index < extra else 0)]


# -- probes -------------------------------------------------------------------------------------------------
@dataclass
class Health:
    live: bool
    ready: bool
    problems: list[str] = field(default_factory=list)
    tasks: list[dict] = field(default_factory=list)
    ready_processes: int = 0
    expected_processes: int = 1

    def to_dict(self) -> dict:
        return {"live": self.live, "ready": self.ready, "problems": self.problems, "tasks": self.tasks,
                "readyProcesses": self.ready_processes, "expectedProcesses": self.expected_processes}


def check(path: Path, stall_seconds: float, started: float, now: float | None = None,
          consumer_stale: float = CONSUMER_STALE) -> Health:
    """Liveness and readiness from the folder. ``started``: when the worker started (the consumer
    loop gets ``consumer_stale`` seconds plus the stall allowance to come up)."""
    now = time.time() if now is None else now
    problems: list[str] = []
    live = True
    shutting = (path / "shutdown").exists()
    try:
        beat = (path / "consumer").stat().st_mtime
        # A warm shutdown stops the consumer loop on purpose; then only the shards in flight count.
        if now - beat > consumer_stale and not shutting:
            live = False
            problems.append(f"consumer loop silent for {now - beat:.0f}s")
    except FileNotFoundError:
        if now - started > consumer_stale + stall_seconds:
            live = False
            problems.append(f"consumer loop not started {now - started:.0f}s after start")
        else:
            problems.append("consumer loop not started yet")
    tasks = []
    for p in sorted(path.glob("task-*")):
        try:
            pid = int(p.name.split("-")[1])
            quiet = now - p.stat().st_mtime
            info = json.loads(p.read_text() or "{}")
        except (OSError, ValueError, IndexError):
            continue
        if not process_alive(pid):
            p.unlink(missing_ok=True)
            continue
        tasks.append({"stem": info.get("stem"), "pid": pid, "quietSeconds": round(quiet, 1)})
        if quiet > stall_seconds:
            live = False
            problems.append(f"shard {info.get('stem')!r} (pid {pid}) made no progress for {quiet:.0f}s")
    try:
        expected = int((path / "expect").read_text() or 1)
    except (OSError, ValueError):
        expected = 1
    ready_pids = []
    for p in path.glob("ready-*"):
        try:
            pid = int(p.name.split("-")[1])
        except ValueError:
            continue
        if process_alive(pid):
            ready_pids.append(pid)
        else:
            p.unlink(missing_ok=True)
    if shutting:
        problems.append("shutting down")
    if len(ready_pids) < expected:
        problems.append(f"{len(ready_pids)} of {expected} pool process(es) ready (model loading)")
    ready = live and not shutting and len(ready_pids) >= expected and (path / "consumer").exists()
    return Health(live, ready, problems, tasks, len(ready_pids), expected)


def serve(port: int, addr: str, stall_seconds: float) -> ThreadingHTTPServer | None:
    """``/healthz`` (liveness) and ``/readyz`` (readiness), JSON, 200 or 503, from the main process."""
    if _dir is None:
        return None
    path, started = _dir, time.time()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            route = self.path.split("?")[0]
            if route not in ("/healthz", "/livez", "/readyz"):
                self.send_error(404)
                return
            h = check(path, stall_seconds, started)
            ok = h.ready if route == "/readyz" else h.live
            body = json.dumps(h.to_dict()).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="health-http").start()
    log.info("worker probes on http://%s:%d/healthz and /readyz", addr, port)
    return server
