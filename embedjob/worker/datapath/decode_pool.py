"""Stages 2 + 3 on every CPU — decode and preprocess a shard's images in a pool of worker processes.

One call prepares a small chunk of images (the reader groups consecutive samples, so the per-task
cost of the pool is paid once per chunk, not per image). Each image comes back as:

- :class:`Crop`: the uint8 ``[224, 224, 3]`` crop of the reference transform (or of the opt-in
  fast path), with the original width and height;
- :class:`EncodedJpeg`: only with ``device_jpeg`` (the CUDA fast path): a baseline RGB/grey JPEG
  whose header was checked here, left encoded for the GPU's nvJPEG decoder (worker/device_decode.py);
- :class:`Rejected`: why the image cannot be embedded (recorded in the manifest, never raised).

This module and everything it imports are torch-free: a decode process costs a Python, Pillow and
numpy, not a second copy of torch.

Why processes and not threads: Pillow releases the GIL inside the JPEG decoder and the resize, but
reading the tar, ``Image.open``'s header parsing, the load loop and the numpy conversion hold it.
Threads sharing one interpreter with the model's Python code stop scaling long before a GPU is fed
(see ``embedjob bench``). The pool is created once per worker process and reused for every shard.
"""

from __future__ import annotations

import itertools
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from embedjob.worker.datapath.decode import DecodeError, load_image, open_image
from embedjob.worker.datapath.preprocess import IMAGE_SIZE, PreprocessError, reference_crop

# What a manifest records for preprocessing "fast" ("exact" records preprocess.PREPROCESSING_ID).
FAST_PREPROCESSING_ID = "embedjob-fast-v1"
# The fast CPU path decodes JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's ``draft``)
# but never below this multiple of the target, then applies the exact bicubic resize.
DRAFT_FACTOR = 2
# Images per pool task, and the bytes after which a chunk is sent even if not full: a task costs the
# worker process ~0.3 ms of its own CPU (queues, pickling, futures), so it carries several images;
# the byte cap keeps a chunk of large images short (~40 ms of decoding), so that the start and the
# end of a shard, where workers wait for the first or the last chunk, stay short too.
CHUNK_IMAGES = 16
CHUNK_BYTES = 512 * 1024


@dataclass
class Crop:
    pixels: np.ndarray  # uint8 [224, 224, 3]
    width: int  # the original image's size (for the metadata)
    height: int
    decode_s: float
    preprocess_s: float
    path: str  # "exact" | "cpu-draft": how it was made (counted in the manifest)


@dataclass
class EncodedJpeg:
    data: bytes
    width: int
    height: int
    decode_s: float  # header parsing only; the decode itself happens on the device


@dataclass
class Rejected:
    reason: str
    decode_s: float = 0.0
    preprocess_s: float = 0.0


Prepared = Crop | EncodedJpeg | Rejected


def draft_request(width: int, height: int, short_side: int = DRAFT_FACTOR * IMAGE_SIZE) -> tuple[int, int]:
    """The size to ask Pillow's ``draft`` for: the image scaled so its short side is ``short_side``
    (rounded up). ``draft`` picks the largest DCT scale (1/2, 1/4, 1/8) that stays at least this
    big on both sides, so the decoded image never has a short side below ``short_side``."""
    if width <= height:
        return short_side, -(-short_side * height // width)
    return -(-short_side * width // height), short_side


def _device_jpeg_ok(img: object, data: bytes) -> bool:
    """Worth handing to nvJPEG: a complete (ends with EOI) baseline or progressive JPEG in RGB or
    grey. CMYK, odd modes and truncated files take the CPU path, which records or converts them."""
    return getattr(img, "format", None) == "JPEG" and getattr(img, "mode", None) in ("RGB", "L") and (
        data.rstrip(b"\0")[-2:] == b"\xff\xd9")


def prepare_image(data: bytes, max_pixels: int, preprocessing: str = "exact", device_jpeg: bool = False) -> Prepared:
    """Decode + preprocess one image. Never raises: every problem is a :class:`Rejected` reason."""
    t0 = time.perf_counter()
    try:
        img = open_image(data, max_pixels)
        width, height = img.size
        if device_jpeg and _device_jpeg_ok(img, data):
            img.close()
            return EncodedJpeg(data, width, height, time.perf_counter() - t0)
        path = "exact"
        if preprocessing == "fast" and img.format == "JPEG":
            req = draft_request(width, height)
            if min(width // req[0], height // req[1]) >= 2 and img.draft(None, req) is not None:
                path = "cpu-draft"
        img = load_image(img)
    except DecodeError as e:
        return Rejected(e.reason, decode_s=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a bad image must never fail the shard
        return Rejected(f"decode: {type(e).__name__}: {e}", decode_s=time.perf_counter() - t0)
    t1 = time.perf_counter()
    try:
        crop = reference_crop(img, source_size=(width, height))
    except PreprocessError as e:
        return Rejected(e.reason, t1 - t0, time.perf_counter() - t1)
    except Exception as e:  # noqa: BLE001
        return Rejected(f"preprocess: {type(e).__name__}: {e}", t1 - t0, time.perf_counter() - t1)
    finally:
        img.close()
    return Crop(crop, width, height, t1 - t0, time.perf_counter() - t1, path)


def prepare_images(datas: list[bytes], max_pixels: int, preprocessing: str = "exact",
                   device_jpeg: bool = False) -> list[Prepared]:
    """One pool task: :func:`prepare_image` on each of ``datas``, in order."""
    return [prepare_image(d, max_pixels, preprocessing, device_jpeg) for d in datas]


class DecodePoolBroken(RuntimeError):
    """A decode worker process died (a crashing codec, the OOM killer): the shard fails and is
    retried; the next shard gets a fresh pool."""


class _DecodeProcess:
    """One decode worker: ``python -P -m embedjob.worker.datapath.decode_pool`` with length-prefixed pickles over its
    stdin/stdout. A plain subprocess, not multiprocessing: it starts the same way from a Celery
    prefork child (a daemonic process multiprocessing will not let start children), from a spawned
    ``embedjob run`` worker or from a script without a ``__main__`` guard, imports only what decoding
    needs (no torch), and exits by itself when this process dies (its stdin closes)."""

    def __init__(self, index: int) -> None:
        # -P: a source checkout's embedjob/ in the working folder must not shadow the installed package.
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "embedjob.worker.datapath.decode_pool"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self.pending: dict[int, Future] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._threads = [threading.Thread(target=self._send, name=f"embedjob-decode-send-{index}", daemon=True),
                         threading.Thread(target=self._receive, name=f"embedjob-decode-recv-{index}", daemon=True)]
        for t in self._threads:
            t.start()

    def submit(self, task_id: int, future: Future, args: tuple) -> None:
        with self._lock:
            if self._broken:
                future.set_exception(DecodePoolBroken(self._broken))
                return
            self.pending[task_id] = future
        self._inbox.put((task_id, future, args))

    def _send(self) -> None:
        pipe = self.proc.stdin
        assert pipe is not None
        try:
            while (item := self._inbox.get()) is not None:
                task_id, future, args = item
                if not future.set_running_or_notify_cancel():  # cancelled while queued here
                    with self._lock:
                        self.pending.pop(task_id, None)
                    continue
                _write_frame(pipe, (task_id, args))
        except (OSError, ValueError):
            pass  # the process is gone: _receive fails what was pending
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    def _receive(self) -> None:
        pipe = self.proc.stdout
        assert pipe is not None
        while True:
            try:
                task_id, ok, value = _read_frame(pipe)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            with self._lock:
                future = self.pending.pop(task_id, None)
            if future is not None:
                future.set_result(value) if ok else future.set_exception(RuntimeError(value))
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


def _write_frame(pipe: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.write(struct.pack("<Q", len(data)))
    pipe.write(data)
    pipe.flush()


def _read_frame(pipe: IO[bytes]) -> Any:
    header = pipe.read(8)
    if len(header) < 8:
        raise EOFError
    (size,) = struct.unpack("<Q", header)
    data = pipe.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


class DecodePool:
    """``workers`` decode processes (``kind="process"``, the default) or threads (``"thread"``, to
    compare). ``submit`` returns a Future of the chunk's results, in order."""

    def __init__(self, workers: int, kind: str = "process") -> None:
        if kind not in ("process", "thread"):
            raise ValueError(f"unknown decode pool kind {kind!r}")
        self.workers = max(1, int(workers))
        self.kind = kind
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._threads: ThreadPoolExecutor | None = None
        self._procs: list[_DecodeProcess] = []
        if kind == "process":
            self._procs = [_DecodeProcess(i) for i in range(self.workers)]
        else:
            self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="embedjob-decode")

    @property
    def chunk_images(self) -> int:
        # A thread pool has no per-task transfer cost to amortise; one image per task keeps every
        # thread busy on small shards.
        return CHUNK_IMAGES if self.kind == "process" else 1

    def submit(self, datas: list[bytes], max_pixels: int, preprocessing: str = "exact",
               device_jpeg: bool = False) -> Future:
        args = (datas, max_pixels, preprocessing, device_jpeg)
        if self._threads is not None:
            return self._threads.submit(prepare_images, *args)
        future: Future = Future()
        with self._lock:
            proc = min(self._procs, key=lambda p: p.load)  # the least busy worker
            proc.submit(next(self._ids), future, args)
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


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """The decode worker's loop: read a task, prepare its images, write the results; until EOF."""
    while True:
        try:
            task_id, args = _read_frame(stdin)
        except EOFError:
            return
        try:
            reply: tuple = (task_id, True, prepare_images(*args))
        except Exception as e:  # noqa: BLE001 - prepare_image never raises; anything else goes back
            reply = (task_id, False, f"{type(e).__name__}: {e}")
        _write_frame(stdout, reply)


def _main() -> None:
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    # Run as ``-m``, this file is __main__: serve from the module proper, so that what is pickled
    # back names embedjob.worker.datapath.decode_pool.Crop, which the worker can unpickle.
    from embedjob.worker.datapath import decode_pool as prepare

    prepare.serve(sys.stdin.buffer, out)


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


if __name__ == "__main__":
    _main()

