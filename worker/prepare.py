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

import multiprocessing as mp
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from embedjob.worker.decode import DecodeError, load_image, open_image
from embedjob.worker.preprocess import IMAGE_SIZE, PreprocessError, reference_crop

PREPROCESSING_MODES = ("exact", "fast")
# What a manifest records for preprocessing "fast" ("exact" records preprocess.PREPROCESSING_ID).
FAST_PREPROCESSING_ID = "embedjob-fast-v1"
# The fast CPU path decodes JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's ``draft``)
# but never below this multiple of the target, then applies the exact bicubic resize.
DRAFT_FACTOR = 2
# Images per pool task, and the bytes after which a chunk is sent even if not full.
CHUNK_IMAGES = 4
CHUNK_BYTES = 1 << 20


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


class DecodePool:
    """``workers`` decode processes (``kind="process"``, the default) or threads. ``submit`` returns
    a Future of the chunk's results, in order."""

    def __init__(self, workers: int, kind: str = "process") -> None:
        if kind not in ("process", "thread"):
            raise ValueError(f"unknown decode pool kind {kind!r}")
        self.workers = max(1, int(workers))
        self.kind = kind
        self._executor: Executor
        if kind == "process":
            # spawn, not fork: the worker process has torch's OpenMP pool, a heartbeat thread and
            # Redis connections, none of which survive a fork safely.
            self._executor = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        else:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="embedjob-decode")

    @property
    def chunk_images(self) -> int:
        # A thread pool has no per-task transfer cost to amortise; one image per task keeps every
        # thread busy on small shards.
        return CHUNK_IMAGES if self.kind == "process" else 1

    def submit(self, datas: list[bytes], max_pixels: int, preprocessing: str = "exact",
               device_jpeg: bool = False) -> Future:
        return self._executor.submit(prepare_images, datas, max_pixels, preprocessing, device_jpeg)

    def warm_up(self) -> None:
        """Start every worker now (a spawned process takes a fraction of a second to import)."""
        futures = [self.submit([], 1) for _ in range(self.workers * 2)]
        for f in futures:
            f.result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


_pool: DecodePool | None = None
_pool_lock = threading.Lock()
# "process" in production; ``embedjob bench --decode-pool thread`` switches it to compare.
default_pool_kind = "thread"


def shared_decode_pool(workers: int, kind: str | None = None) -> DecodePool:
    """The worker process's decode pool, created on first use and reused for every shard (a new
    size or kind replaces it)."""
    global _pool
    kind = kind or default_pool_kind
    with _pool_lock:
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

