"""embed_shard: one WebDataset .tar in, the per-shard outputs of embedjob.layout out.

CONTRACT (other modules code against this; keep it stable):

    embed_shard(shard: str, output: str, model: Embedder, options: EmbedOptions, *,
                stem: str | None = None, storage: Storage | None = None,
                on_progress: Callable[[int], None] | None = None) -> ShardResult

- ``shard``: s3:// URI or local path of the .tar; ``output``: output root URI or local folder.
- ``stem``: output stem (default: the shard's basename without .tar).
- ``model``: a loaded embedder (embedjob.worker.model.load_embedder), loaded once per process.
- ``on_progress(n)``: called with the number of images embedded so far (cheap; may be called often).
- Skips (status "skipped") when the manifest exists and options.overwrite is false.
- Raises only for shard-level failures that leave no usable output (e.g. the shard cannot be
  opened at all); a corrupt/truncated tar keeps what was read and records the error.

The stages, one module each, connected by bounded queues so memory stays flat for any shard size
and rows keep the tar's order::

    reader thread        tar_reader.iter_tar(Storage.open_read(shard))       (S3 / disk stream)
      │  submits each sample to the decode pool, puts its Future on a bounded queue (tar order)
    decode pool          decode.decode_image -> preprocess.reference_crop   (options.num_threads)
      │  Futures resolved in queue order
    calling thread       preprocess.normalize -> model.embed (batches) -> writer.ShardWriter
                         -> commit: .npy, .parquet, then the manifest

At most ``queue size + batch size`` samples are alive at once, however large the shard.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from embedjob.contract import EmbedOptions
from embedjob.layout import SHARD_SUFFIX, shard_outputs
from embedjob.results import shard_counts
from embedjob.storage import Storage
from embedjob.worker.decode import DecodeError, decode_image
from embedjob.worker.model import Embedder
from embedjob.worker.preprocess import PREPROCESSING_ID, PreprocessError, normalize, reference_crop
from embedjob.worker.tar_reader import Sample, SkippedMember, TarStats, iter_tar
from embedjob.worker.writer import MetadataRow, ShardWriter

log = logging.getLogger(__name__)

STAGES = ("read", "decode", "preprocess", "inference", "write", "wait")


@dataclass
class ShardResult:
    shard: str
    stem: str
    status: str  # "done" | "skipped"
    images: int = 0  # rows written to the .npy
    failed: int = 0  # samples skipped and recorded in the manifest
    seconds: float = 0.0
    manifest: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


# -- what travels between the stages ------------------------------------------------------------------
@dataclass
class _Prepared:
    """A decoded, resized and cropped sample, ready for a batch."""

    row: MetadataRow
    crop: np.ndarray  # uint8 [224, 224, 3]
    decode_s: float
    preprocess_s: float


@dataclass
class _Failure:
    key: str
    member: str
    reason: str
    decode_s: float = 0.0
    preprocess_s: float = 0.0

    def record(self) -> dict[str, str]:
        return {"key": self.key, "member": self.member, "reason": self.reason}


_END = object()


@dataclass
class _ReaderError:
    error: BaseException


def default_stem(shard: str) -> str:
    base = shard.rstrip("/").rsplit("/", 1)[-1]
    return base[: -len(SHARD_SUFFIX)] if base.lower().endswith(SHARD_SUFFIX) else base


def queue_size(options: EmbedOptions) -> int:
    """How many samples may wait between the reader and the model: enough to keep every decode
    thread busy while a batch is being embedded, and no more."""
    return max(2 * options.num_threads, options.batch_size)


def prepare_sample(sample: Sample, shard: str, max_pixels: int) -> _Prepared | _Failure:
    """Decode + preprocess one sample (runs in the decode pool). Never raises: every problem is a
    :class:`_Failure` with the sample's key and a reason."""
    t0 = time.perf_counter()
    try:
        img = decode_image(sample.image, max_pixels)
    except DecodeError as e:
        return _Failure(sample.key, sample.member, e.reason, decode_s=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a bad image must never fail the shard
        return _Failure(sample.key, sample.member, f"decode: {type(e).__name__}: {e}", time.perf_counter() - t0)
    t1 = time.perf_counter()
    width, height = img.size  # the original size, for the metadata
    try:
        crop = reference_crop(img)
    except PreprocessError as e:
        return _Failure(sample.key, sample.member, e.reason, t1 - t0, time.perf_counter() - t1)
    except Exception as e:  # noqa: BLE001
        reason = f"preprocess: {type(e).__name__}: {e}"
        return _Failure(sample.key, sample.member, reason, t1 - t0, time.perf_counter() - t1)
    finally:
        img.close()
    row = MetadataRow(sample.key, shard, sample.member, width, height, sample.caption, sample.json)
    return _Prepared(row, crop, t1 - t0, time.perf_counter() - t1)


class _Reader(threading.Thread):
    """Stage 1 in its own thread: streams the tar, hands samples to the decode pool, and puts the
    Futures (or reader-level failures) on the bounded queue in tar order."""

    def __init__(
        self,
        shard: str,
        storage: Storage,
        pool: ThreadPoolExecutor,
        out: queue.Queue,
        max_pixels: int,
        stop: threading.Event,
    ) -> None:
        super().__init__(name="embedjob-tar-reader", daemon=True)
        self.shard, self.storage, self.pool, self.out = shard, storage, pool, out
        self.max_pixels, self.stop = max_pixels, stop
        self.stats = TarStats()
        self.seconds = 0.0  # time spent reading/parsing (including waiting for the source)

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            t = time.perf_counter()
            with self.storage.open_read(self.shard) as raw:
                items = iter_tar(raw, self.stats)
                while True:
                    item = next(items, _END)
                    self.seconds += time.perf_counter() - t
                    if item is _END:
                        break
                    if isinstance(item, SkippedMember):
                        work: object = _Failure(item.key, item.member, item.reason)
                    else:
                        work = self.pool.submit(prepare_sample, item, self.shard, self.max_pixels)
                    del item  # the image bytes now belong to the pool only
                    if not self._put(work):
                        return
                    t = time.perf_counter()
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread, which re-raises
            self._put(_ReaderError(e))


def _read_manifest(storage: Storage, uri: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_bytes(uri))
    except Exception:  # noqa: BLE001 - a skip must not fail because an old manifest is odd
        return {}


def embed_shard(
    shard: str,
    output: str,
    model: Embedder,
    options: EmbedOptions,
    *,
    stem: str | None = None,
    storage: Storage | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ShardResult:
    """Embed every image of ``shard`` and write its outputs under ``output`` (see the module
    docstring for the contract)."""
    started = time.perf_counter()
    storage = storage or Storage()
    stem = stem or default_stem(shard)
    outputs = shard_outputs(output, stem)

    if storage.exists(outputs.manifest):
        if not options.overwrite:
            images, failed = shard_counts(_read_manifest(storage, outputs.manifest))
            return ShardResult(
                shard=shard,
                stem=stem,
                status="skipped",
                images=images,
                failed=failed,
                seconds=time.perf_counter() - started,
                manifest=outputs.manifest,
            )
        # Redoing a finished shard: it stops being "done" until the new outputs are all in place.
        storage.delete(outputs.manifest)

    created = datetime.now(UTC)
    timings = dict.fromkeys(STAGES, 0.0)
    failures: list[_Failure] = []
    embedded = 0

    stop = threading.Event()
    pending: queue.Queue = queue.Queue(maxsize=queue_size(options))
    pool = ThreadPoolExecutor(max_workers=max(1, options.num_threads), thread_name_prefix="embedjob-decode")
    reader = _Reader(shard, storage, pool, pending, options.max_image_pixels, stop)

    with ShardWriter(outputs, storage, dim=model.dim, dtype=options.dtype) as writer:
        batch: list[_Prepared] = []

        def flush() -> None:
            nonlocal embedded
            if not batch:
                return
            t = time.perf_counter()
            pixels = normalize(np.stack([p.crop for p in batch]))
            embeddings = model.embed(pixels)
            timings["inference"] += time.perf_counter() - t
            writer.add(embeddings, [p.row for p in batch])
            embedded += len(batch)
            batch.clear()
            if on_progress is not None:
                on_progress(embedded)

        reader.start()
        try:
            while True:
                t = time.perf_counter()
                item = pending.get()
                if isinstance(item, Future):
                    item = item.result()
                timings["wait"] += time.perf_counter() - t
                if item is _END:
                    break
                if isinstance(item, _ReaderError):
                    raise item.error
                timings["decode"] += item.decode_s
                timings["preprocess"] += item.preprocess_s
                if isinstance(item, _Failure):
                    failures.append(item)
                    continue
                batch.append(item)
                if len(batch) >= options.batch_size:
                    flush()
            flush()
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            reader.join()
        timings["read"] = reader.seconds

        stats = reader.stats
        if stats.error:
            log.warning("shard %s: %s (kept %d images read before it)", shard, stats.error, embedded)
        manifest = {
            "status": "done",
            "shard": shard,
            "stem": stem,
            "output": output,
            "counts": {
                "samples": embedded + len(failures),
                "embedded": embedded,
                "failed": len(failures),
                "members": stats.members,
                "ignored_members": stats.ignored_members,
                "bytes_read": stats.bytes_read,
            },
            "failed": [f.record() for f in failures],
            "tar_error": stats.error,
            "model": model.describe(),
            "preprocessing": PREPROCESSING_ID,
            "options": {
                "batch_size": options.batch_size,
                "precision": options.precision,
                "num_threads": options.num_threads,
                "max_image_pixels": options.max_image_pixels,
            },
            # The write itself is timed in ShardResult: it is not over while the manifest is written.
            "timings": {k: round(v, 4) for k, v in timings.items() if k != "write"},
            "created": created.isoformat(),
        }
        t = time.perf_counter()
        writer.commit(manifest)
        timings["write"] = time.perf_counter() - t

    seconds = time.perf_counter() - started
    timings["total"] = seconds
    return ShardResult(
        shard=shard,
        stem=stem,
        status="done",
        images=embedded,
        failed=len(failures),
        seconds=seconds,
        manifest=outputs.manifest,
        timings=timings,
    )
