"""Stages 2 + 3 on every CPU — decode and preprocess a shard's images in a pool of worker processes.

One task prepares a small chunk of images (the reader groups consecutive samples, so the per-task
cost of the pool is paid once per chunk, not per image). The decode process reads the images itself
(by offset from a local tar, or from the task's payload for a stream), writes each crop straight
into its row of a shared-memory batch slot (batch_slots.py) and answers with one small JSON record
per image; tasks and answers are a JSON header plus raw bytes, never pickles. The work on one image
is :func:`embedjob.worker.datapath.crop.prepare_image`.

This module and everything it imports are torch-free: a decode process costs a Python, Pillow and
numpy, not a second copy of torch.

Why processes and not threads: Pillow releases the GIL inside the JPEG decoder and the resize, but
reading the tar, ``Image.open``'s header parsing, the load loop and the numpy conversion hold it.
Threads sharing one interpreter with the model's Python code stop scaling long before a GPU is fed
(see ``embedjob bench``). The pool is created once per worker process and reused for every shard.
"""

from __future__ import annotations

import itertools
import queue
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor

import numpy as np

from embedjob.worker.datapath.batch_slots import BatchSlots
from embedjob.worker.datapath.decode_worker import (
    ATTACH,
    DETACH,
    Sources,
    read_frame,
    run_chunk,
    unpack_prepared,
    write_frame,
)
from embedjob.worker.datapath.spool import Spool
from embedjob.worker.model.transform import DEFAULT_TRANSFORM, ImageTransform

# Images per pool task, and the bytes after which a chunk is sent even if not full: a task costs the
# worker process ~0.3 ms of its own CPU (queues, pickling, futures), so it carries several images;
# the byte cap keeps a chunk of large images short (~40 ms of decoding), so that the start and the
# end of a shard, where workers wait for the first or the last chunk, stay short too.
CHUNK_IMAGES = 16
CHUNK_BYTES = 512 * 1024


class DecodePoolBroken(RuntimeError):
    """A decode worker process died (a crashing codec, the OOM killer): the shard fails and is
    retried; the next shard gets a fresh pool."""


class _DecodeProcess:
    """One decode worker: ``python -P -m embedjob.worker.datapath.decode_worker`` with length-prefixed
    frames (JSON header + raw payload) over its stdin/stdout, and a Unix socket that passes it the
    batch slots' file descriptors. A plain subprocess, not multiprocessing: it starts the same way
    from a Celery prefork child (a daemonic process multiprocessing will not let start children),
    from a spawned ``embedjob run`` worker or from a script without a ``__main__`` guard, imports
    only what decoding needs (no torch), and exits by itself when this process dies (its stdin
    closes)."""

    def __init__(self, index: int) -> None:
        self._fds, child_fds = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # -P: a source checkout's embedjob/ in the working folder must not shadow the installed package.
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "embedjob.worker.datapath.decode_worker", str(child_fds.fileno())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, pass_fds=(child_fds.fileno(),))
        finally:
            child_fds.close()
        self.pending: dict[int, Future] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._threads = [threading.Thread(target=self._send, name=f"embedjob-decode-send-{index}", daemon=True),
                         threading.Thread(target=self._receive, name=f"embedjob-decode-recv-{index}", daemon=True)]
        for t in self._threads:
            t.start()

    def submit(self, task_id: int, future: Future, header: dict, payload: bytes) -> None:
        with self._lock:
            if self._broken:
                future.set_exception(DecodePoolBroken(self._broken))
                return
            self.pending[task_id] = future
        self._inbox.put((task_id, future, header, payload))

    def attach(self, shared: BatchSlots | Spool) -> None:
        self._inbox.put((ATTACH, shared))

    def detach(self, shared: BatchSlots | Spool) -> None:
        self._inbox.put((DETACH, shared))

    def _send(self) -> None:
        pipe = self.proc.stdin
        assert pipe is not None
        try:
            while (item := self._inbox.get()) is not None:
                if item[0] == ATTACH:
                    shared = item[1]
                    with shared._lock:  # not closed meanwhile: its fd is still ours to send
                        if shared.closed:
                            continue
                        socket.send_fds(self._fds, [b"s"], [shared.fd])
                    if isinstance(shared, Spool):
                        write_frame(pipe, {"op": ATTACH, "spool": shared.id})
                    else:
                        write_frame(pipe, {"op": ATTACH, "slots": shared.id, "count": shared.slots,
                                            "batch_size": shared.batch_size, "crop": shared.crop,
                                            "jpeg_room": shared.jpeg_room})
                    continue
                if item[0] == DETACH:
                    kind = "spool" if isinstance(item[1], Spool) else "slots"
                    write_frame(pipe, {"op": DETACH, kind: item[1].id})
                    continue
                task_id, future, header, payload = item
                try:
                    running = future.set_running_or_notify_cancel()  # False: cancelled while queued here
                except RuntimeError:  # already failed by _receive: the process died meanwhile
                    running = False
                if not running:
                    with self._lock:
                        self.pending.pop(task_id, None)
                    continue
                write_frame(pipe, {**header, "id": task_id}, payload)
        except (OSError, ValueError):
            pass  # the process is gone: _receive fails what was pending
        finally:
            try:
                pipe.close()
            except OSError:
                pass
            self._fds.close()

    def _receive(self) -> None:
        pipe = self.proc.stdout
        assert pipe is not None
        while True:
            try:
                reply, payload = read_frame(pipe)
                task_id = reply["id"]
            except (EOFError, OSError, ValueError, KeyError, TypeError):
                break
            with self._lock:
                future = self.pending.pop(task_id, None)
            if future is not None:
                if "error" in reply:
                    future.set_exception(RuntimeError(reply["error"]))
                else:
                    future.set_result((reply, payload))
        code = self.proc.wait()
        with self._lock:
            self._broken = f"a decode worker process exited with code {code}"
            pending, self.pending = self.pending, {}
        for future in pending.values():
            try:
                future.set_exception(DecodePoolBroken(self._broken))
            except InvalidStateError:  # cancelled meanwhile
                pass

    @property
    def load(self) -> int:
        return len(self.pending)

    def close(self, timeout: float = 10.0) -> None:
        self._inbox.put(None)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in self._threads:
            t.join(timeout)


class DecodePool:
    """``workers`` decode processes (``kind="process"``, the default) or threads (``"thread"``, to
    compare). :meth:`submit_chunk` returns a Future of a chunk's ``(reply, payload)``;
    :meth:`submit`, a Future of the chunk's :class:`Prepared` items, in order."""

    def __init__(self, workers: int, kind: str = "process") -> None:
        if kind not in ("process", "thread"):
            raise ValueError(f"unknown decode pool kind {kind!r}")
        self.workers = max(1, int(workers))
        self.kind = kind
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._threads: ThreadPoolExecutor | None = None
        self._procs: list[_DecodeProcess] = []
        # the thread pool's view of the attached slots: id -> (crops, JPEG rooms)
        self._slots: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._spools: dict[int, int] = {}  # and of the attached spools (id -> file descriptor)
        self._sources = threading.local()
        if kind == "process":
            self._procs = [_DecodeProcess(i) for i in range(self.workers)]
        else:
            self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="embedjob-decode")

    @property
    def chunk_images(self) -> int:
        # A thread pool has no per-task transfer cost to amortise; one image per task keeps every
        # thread busy on small shards.
        return CHUNK_IMAGES if self.kind == "process" else 1

    def attach(self, shared: BatchSlots | Spool) -> None:
        """Let every decode worker write into the batch slots, or read from the spool, ``shared``
        (before the first chunk that uses them)."""
        if self._threads is not None:
            if isinstance(shared, Spool):
                self._spools[shared.id] = shared.fd
            else:
                self._slots[shared.id] = (shared.array, shared.jpegs)
        for proc in self._procs:
            proc.attach(shared)

    def detach(self, shared: BatchSlots | Spool) -> None:
        (self._spools if isinstance(shared, Spool) else self._slots).pop(shared.id, None)
        for proc in self._procs:
            proc.detach(shared)

    def _run_in_thread(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        sources = getattr(self._sources, "files", None)
        if sources is None:
            sources = self._sources.files = Sources(spools=self._spools)
        reply, blobs = run_chunk(header, payload, self._slots, sources)
        return reply, b"".join(blobs)

    def submit_chunk(self, header: dict, payload: bytes = b"") -> Future:
        """Send one chunk (the header described above ``run_chunk``)."""
        if self._threads is not None:
            return self._threads.submit(self._run_in_thread, header, payload)
        future: Future = Future()
        with self._lock:
            proc = min(self._procs, key=lambda p: p.load)  # the least busy worker
            proc.submit(next(self._ids), future, header, payload)
        return future

    def submit(self, datas: list[bytes], max_pixels: int, preprocessing: str = "exact",
               device_jpeg: bool = False, transform: ImageTransform = DEFAULT_TRANSFORM) -> Future:
        """Prepare ``datas``; the Future gives their :class:`Prepared` items, in order."""
        items, pos = [], 0
        for d in datas:
            items.append([pos, len(d)])
            pos += len(d)
        header = {"op": "chunk", "max_pixels": max_pixels, "preprocessing": preprocessing,
                  "device_jpeg": device_jpeg, "src": None, "items": items, "slots": None,
                  "transform": transform.to_dict()}
        future: Future = Future()
        inner = self.submit_chunk(header, b"".join(datas))

        def done(f: Future) -> None:
            if f.cancelled():
                future.cancel()
                return
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(unpack_prepared(*f.result()))
            except BaseException as e:  # noqa: BLE001 - delivered through the Future
                future.set_exception(e)

        inner.add_done_callback(done)
        _cancel_with(future, inner)
        return future

    def warm_up(self) -> None:
        """Wait until every worker has started (a new process takes a fraction of a second)."""
        futures = [self.submit([], 1) for _ in range(self.workers)]
        for f in futures:
            f.result()

    def shutdown(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
        for proc in self._procs:
            proc.close()


def _cancel_with(outer: Future, inner: Future) -> None:
    """Cancelling ``outer`` (still pending) cancels ``inner`` too."""
    cancel = outer.cancel

    def both() -> bool:
        inner.cancel()
        return cancel()

    outer.cancel = both  # type: ignore[method-assign]


_pool: DecodePool | None = None
_pool_lock = threading.Lock()


def shared_decode_pool(workers: int, kind: str | None = None) -> DecodePool:
    """The worker process's decode pool, created on first use and reused for every shard (a new
    size or kind replaces it). ``kind``: "process" (production) or "thread"; None keeps the shared
    pool's kind, or "process" for a new one."""
    global _pool
    with _pool_lock:
        kind = kind or (_pool.kind if _pool is not None else "process")
        if _pool is not None and (_pool.workers, _pool.kind) != (max(1, workers), kind):
            _pool.shutdown()
            _pool = None
        if _pool is None:
            _pool = DecodePool(workers, kind)
        return _pool


def discard_decode_pool(pool: DecodePool | None = None) -> None:
    """Shut the shared pool down (a broken pool after a crashed decoder, tests, the benchmark's cold
    start). With ``pool``, only if it is still the shared one."""
    global _pool
    with _pool_lock:
        if _pool is not None and (pool is None or pool is _pool):
            _pool.shutdown()
            _pool = None


