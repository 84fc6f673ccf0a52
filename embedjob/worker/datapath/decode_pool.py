"""Stages 2 + 3 on every CPU — decode and preprocess a shard's images in a pool of worker processes.

One task prepares a small chunk of images (the reader groups consecutive samples, so the per-task
cost of the pool is paid once per chunk, not per image). The decode process reads the images itself
(by offset from a local tar, or from the task's payload for a stream), writes each crop straight
into its row of a shared-memory batch slot (batch_slots.py) and answers with one small JSON record
per image; tasks and answers are a JSON header plus raw bytes, never pickles. :func:`prepare_image`,
the work on one image, gives:

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
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from embedjob.worker.datapath.batch_slots import BatchSlots, map_slots
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
    """:func:`prepare_image` on each of ``datas``, in order (in this process)."""
    return [prepare_image(d, max_pixels, preprocessing, device_jpeg) for d in datas]


# -- one pool task: a chunk of images ---------------------------------------------------------------
# A task is a small JSON header plus a raw payload, both ways; no pickles. The header of a chunk:
#   {"op": "chunk", "max_pixels", "preprocessing", "device_jpeg",
#    "src": a local tar file the decoder reads the images from (by offset), or null: from the payload,
#    "src_id": [st_dev, st_ino, st_size, st_mtime_ns] of the file the reader indexed (a file put in
#              its place since is refused, never read),
#    "items": [[offset, size], ...]   (in the file, or in the payload),
#    "slots": the BatchSlots id the crops go into, "slot": its slot, "rows": [row, ...]
#             (or "slots": null: the crops come back in the reply's payload)}
# The reply: {"records": [[status, width, height, text, payload bytes], ...], "decode_s",
# "preprocess_s", "paths": {path: count}} plus a payload (the crops when not in slots, the encoded
# JPEGs of the device path). status: CROP (text = its path), JPEG, REJECTED (text = the reason).
CROP, JPEG, REJECTED = 0, 1, 2


def file_identity(st: os.stat_result) -> list[int]:
    """What tells one version of a file from another: device, inode, size, modification time."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


class _Sources:
    """The decode side's open tar files (a few: two shards may be in flight), each the very file the
    reader indexed (``src_id``)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._files: dict[tuple, int] = {}

    def read(self, path: str, identity: list[int] | None, offset: int, size: int) -> bytes:
        key = (path, *(identity or ()))
        fd = self._files.get(key)
        if fd is None:
            while len(self._files) >= self.keep:
                os.close(self._files.pop(next(iter(self._files))))
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if identity is not None and file_identity(os.fstat(fd)) != list(identity):
                os.close(fd)
                raise RuntimeError(f"{path} changed while its shard was being read")
            self._files[key] = fd
        return os.pread(fd, size, offset)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


def run_chunk(header: dict, payload: bytes | memoryview, slots: dict[int, np.ndarray],
              sources: _Sources) -> tuple[dict, list[bytes]]:
    """Prepare one chunk (see above); ``slots`` maps the attached BatchSlots ids to their arrays."""
    src = header.get("src")
    view = memoryview(payload)
    out = None
    if header.get("slots") is not None:
        out = slots.get(header["slots"])
        if out is None:
            raise RuntimeError(f"batch slots {header['slots']} are not attached")
        out = out[header["slot"]]
    rows = header.get("rows") or []
    records: list[list] = []
    blobs: list[bytes] = []
    paths: dict[str, int] = {}
    decode_s = preprocess_s = 0.0
    for k, (offset, size) in enumerate(header["items"]):
        data = sources.read(src, header.get("src_id"), offset, size) if src else bytes(view[offset:offset + size])
        if src and len(data) != size:
            item: Prepared = Rejected(f"decode: short read ({len(data)} of {size} bytes)")
        else:
            item = prepare_image(data, header["max_pixels"], header["preprocessing"], header["device_jpeg"])
        decode_s += item.decode_s
        if isinstance(item, Crop):
            preprocess_s += item.preprocess_s
            paths[item.path] = paths.get(item.path, 0) + 1
            if out is not None:
                out[rows[k]] = item.pixels
                records.append([CROP, item.width, item.height, item.path, 0])
            else:
                blobs.append(item.pixels.tobytes())
                records.append([CROP, item.width, item.height, item.path, len(blobs[-1])])
        elif isinstance(item, EncodedJpeg):
            blobs.append(item.data)
            records.append([JPEG, item.width, item.height, "", len(item.data)])
        else:
            preprocess_s += item.preprocess_s
            records.append([REJECTED, 0, 0, item.reason, 0])
    return {"records": records, "decode_s": decode_s, "preprocess_s": preprocess_s, "paths": paths}, blobs


def unpack_prepared(reply: dict, payload: bytes) -> list[Prepared]:
    """The :class:`Prepared` items of a chunk whose crops came back in the payload."""
    out: list[Prepared] = []
    pos = 0
    for status, width, height, text, size in reply["records"]:
        blob, pos = payload[pos:pos + size], pos + size
        if status == CROP:
            pixels = np.frombuffer(blob, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, 3)
            out.append(Crop(pixels, width, height, 0.0, 0.0, text))
        elif status == JPEG:
            out.append(EncodedJpeg(blob, width, height, 0.0))
        else:
            out.append(Rejected(text))
    return out


class DecodePoolBroken(RuntimeError):
    """A decode worker process died (a crashing codec, the OOM killer): the shard fails and is
    retried; the next shard gets a fresh pool."""


_ATTACH = "attach"
_DETACH = "detach"


class _DecodeProcess:
    """One decode worker: ``python -P -m embedjob.worker.datapath.decode_pool`` with length-prefixed
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
                [sys.executable, "-P", "-m", "embedjob.worker.datapath.decode_pool", str(child_fds.fileno())],
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

    def attach(self, slots: BatchSlots) -> None:
        self._inbox.put((_ATTACH, slots))

    def detach(self, slots: BatchSlots) -> None:
        self._inbox.put((_DETACH, slots))

    def _send(self) -> None:
        pipe = self.proc.stdin
        assert pipe is not None
        try:
            while (item := self._inbox.get()) is not None:
                if item[0] == _ATTACH:
                    slots = item[1]
                    with slots._lock:  # not closed meanwhile: its fd is still ours to send
                        if slots.closed:
                            continue
                        socket.send_fds(self._fds, [b"s"], [slots.fd])
                    _write_frame(pipe, {"op": _ATTACH, "slots": slots.id, "count": slots.slots,
                                        "batch_size": slots.batch_size})
                    continue
                if item[0] == _DETACH:
                    _write_frame(pipe, {"op": _DETACH, "slots": item[1].id})
                    continue
                task_id, future, header, payload = item
                if not future.set_running_or_notify_cancel():  # cancelled while queued here
                    with self._lock:
                        self.pending.pop(task_id, None)
                    continue
                _write_frame(pipe, {**header, "id": task_id}, payload)
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
                reply, payload = _read_frame(pipe)
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


_FRAME = struct.Struct("<II")


def _write_frame(pipe: IO[bytes], header: dict, payload: bytes | list[bytes] = b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = payload if isinstance(payload, list) else [payload]
    pipe.write(_FRAME.pack(len(head), sum(len(p) for p in parts)))
    pipe.write(head)
    for part in parts:
        pipe.write(part)
    pipe.flush()


def _read_exact(pipe: IO[bytes], size: int) -> bytes:
    data = pipe.read(size)
    if len(data) < size:
        raise EOFError
    return data


def _read_frame(pipe: IO[bytes]) -> tuple[dict, bytes]:
    head_size, payload_size = _FRAME.unpack(_read_exact(pipe, _FRAME.size))
    header = json.loads(_read_exact(pipe, head_size))
    if not isinstance(header, dict):
        raise ValueError("a frame's header must be a JSON object")
    return header, _read_exact(pipe, payload_size) if payload_size else b""


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
        self._slots: dict[int, np.ndarray] = {}  # the thread pool's view of the attached slots
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

    def attach(self, slots: BatchSlots) -> None:
        """Let every decode worker write into ``slots`` (before the first chunk that uses them)."""
        if self._threads is not None:
            self._slots[slots.id] = slots.array
        for proc in self._procs:
            proc.attach(slots)

    def detach(self, slots: BatchSlots) -> None:
        self._slots.pop(slots.id, None)
        for proc in self._procs:
            proc.detach(slots)

    def _run_in_thread(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        sources = getattr(self._sources, "files", None)
        if sources is None:
            sources = self._sources.files = _Sources()
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
               device_jpeg: bool = False) -> Future:
        """Prepare ``datas``; the Future gives their :class:`Prepared` items, in order."""
        items, pos = [], 0
        for d in datas:
            items.append([pos, len(d)])
            pos += len(d)
        header = {"op": "chunk", "max_pixels": max_pixels, "preprocessing": preprocessing,
                  "device_jpeg": device_jpeg, "src": None, "items": items, "slots": None}
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


def serve(stdin: IO[bytes], stdout: IO[bytes], fds: socket.socket | None = None) -> None:
    """The decode worker's loop: read a task, prepare its images, write the results; until EOF."""
    attached: dict[int, tuple[Any, np.ndarray]] = {}
    views: dict[int, np.ndarray] = {}
    sources = _Sources()
    while True:
        try:
            header, payload = _read_frame(stdin)
        except EOFError:
            return
        op = header.get("op")
        if op == _ATTACH:
            assert fds is not None
            _, received, _, _ = socket.recv_fds(fds, 1, 1)  # one byte: exactly one sendmsg's fd
            try:
                mm, array = map_slots(received[0], header["count"], header["batch_size"])
            finally:
                for fd in received:
                    os.close(fd)
            attached[header["slots"]] = (mm, array)
            views[header["slots"]] = array
            continue
        if op == _DETACH:
            views.pop(header["slots"], None)
            mm, _ = attached.pop(header["slots"], (None, None))
            del _
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass
            continue
        try:
            reply, blobs = run_chunk(header, payload, views, sources)
        except Exception as e:  # noqa: BLE001 - prepare_image never raises; anything else goes back
            reply, blobs = {"error": f"{type(e).__name__}: {e}"}, []
        reply["id"] = header.get("id")
        _write_frame(stdout, reply, blobs)


def _main() -> None:
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    fds = socket.socket(fileno=int(sys.argv[1])) if len(sys.argv) > 1 else None
    from embedjob.worker.datapath import decode_pool as prepare

    prepare.serve(sys.stdin.buffer, out, fds)


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

