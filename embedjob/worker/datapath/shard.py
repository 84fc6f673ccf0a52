"""embed_shard: one WebDataset .tar in, the per-shard outputs of embedjob.layout out.

CONTRACT (other modules code against this; keep it stable):

    embed_shard(shard: str, output: str, model: Embedder, options: EmbedOptions, *,
                stem: str | None = None, storage: Storage | None = None,
                on_progress: Callable[[int], None] | None = None,
                pool_kind: str | None = None) -> ShardResult

- ``shard``: s3:// URI or local path of the .tar; ``output``: output root URI or local folder.
- ``stem``: output stem (default: the shard's basename without .tar).
- ``model``: a loaded embedder (embedjob.worker.model.load.load_embedder), loaded once per process.
- ``on_progress(n)``: called with the number of images embedded so far (cheap; may be called often).
- ``pool_kind``: the decode pool's kind, "process" or "thread" (None: the shared pool's, "process").
- Always embeds: whether a shard needs doing is decided by its callers (the plans of the operator
  and of ``embedjob run`` choose what to run; the Celery task re-checks a delivery under its lease).
  An existing manifest is deleted first, so a redone shard is not "done" until its new outputs are.
- Raises only for shard-level failures that leave no usable output (e.g. the shard cannot be
  opened at all); a corrupt/truncated tar keeps what was read and records the error
  (``options.on_truncated == "record"``) or raises :class:`TruncatedShard` (``"fail"``).

The stages, one module each; the main process deals in batches, never in an image's bytes or pixels::

    reader thread        read.iter_tar(Storage.open_read(shard), in_place=True)   (S3 / disk stream)
      │  indexes the tar: a local .tar's images stay in the file (offset, size); a stream's (S3, a
      │  compressed tar) are read here and go out in the chunk's payload. Each image gets a row in
      │  a shared-memory batch slot (batch_slots); chunks of (offset, size, row) to the decode pool
    decode pool          decode_pool.run_chunk: read + decode + preprocess, the crop written straight
      │                  into its row; a small JSON record per image comes back (one process per CPU)
    calling thread       PreparedStream.batches: a full slot, rejected rows closed up, to the engine
      │                  as it is (zero copy on the CPU, one copy per batch into pinned memory on CUDA)
    forward thread       engine.InferenceEngine: to the device, normalise there, forward, rows back
      │                  (asynchronous: decode, copy, forward and writing overlap); the slot is free again
    calling thread       finished batches to writer.ShardWriter, in order -> commit: .npy, .parquet,
                         then the manifest

At most ``BATCH_SLOTS`` batches of crops exist per shard (the reader waits for a free slot), however
large the shard.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime

import numpy as np

from embedjob.contract import EmbedOptions
from embedjob.layout import shard_outputs, shard_stem
from embedjob.policy import PermanentError
from embedjob.storage import Storage, is_s3
from embedjob.worker.datapath.batch_slots import CROP_SHAPE, BatchSlots
from embedjob.worker.datapath.decode_pool import (
    CHUNK_BYTES,
    FAST_PREPROCESSING_ID,
    JPEG,
    REJECTED,
    Crop,
    DecodePool,
    DecodePoolBroken,
    EncodedJpeg,
    Prepared,
    Rejected,
    discard_decode_pool,
    file_identity,
    shared_decode_pool,
)
from embedjob.worker.datapath.engine import InferenceEngine
from embedjob.worker.datapath.gpu_decode import JpegDecoder, nvjpeg_decoder
from embedjob.worker.datapath.preprocess import PREPROCESSING_ID
from embedjob.worker.datapath.read import SkippedMember, TarStats, iter_tar
from embedjob.worker.datapath.write import MetadataRow, ShardWriter, shard_manifest
from embedjob.worker.host import available_cpus
from embedjob.worker.model.embedder import Embedder

log = logging.getLogger(__name__)

STAGES = ("read", "decode", "preprocess", "inference", "write", "wait")


class TruncatedShard(PermanentError):
    """A truncated or partly unreadable tar under ``spec.onTruncatedShard: fail``: the shard fails at
    once (retrying reads the same bytes) and nothing is committed."""


@dataclass
class ShardResult:
    shard: str
    stem: str
    status: str  # "done"
    images: int = 0  # rows written to the .npy
    failed: int = 0  # samples skipped and recorded in the manifest
    seconds: float = 0.0
    manifest: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0  # images per forward pass at the end (resolved once; lowered by an OOM back-off)
    tar_error: str | None = None  # a truncated or partly unreadable tar (recorded: onTruncatedShard record)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SampleInfo:
    """What the reader keeps of a sample while its image is in the decode pool."""

    key: str
    member: str
    caption: str | None = None
    json: str | None = None

    def row(self, shard: str, width: int, height: int) -> MetadataRow:
        return MetadataRow(self.key, shard, self.member, width, height, self.caption, self.json)


def decode_workers(options: EmbedOptions) -> int:
    """Decode processes: ``num_threads`` when set, else every CPU this process may use."""
    return options.num_threads if options.num_threads > 0 else available_cpus()


# Batch slots per shard: the engine's host buffers (one being filled, one launched, one finishing)
# plus one the decode processes write the next batch into.
BATCH_SLOTS = 4
# PreparedStream's rows per slot when the caller has no batch size (the benchmark's decode limit).
DEFAULT_SLOT_ROWS = 64

_END = object()


@dataclass
class _ReaderError:
    error: BaseException


@dataclass
class _Dispatched:
    """A batch as the reader sent it out: its slot's rows, in tar order, and the chunks preparing them."""

    slot: int | None
    infos: list[SampleInfo] = field(default_factory=list)  # the samples given rows 0, 1, ... of the slot
    seqs: list[int] = field(default_factory=list)  # their sample numbers in the tar
    chunks: list[Future] = field(default_factory=list)  # in row order
    skipped: list[tuple[int, SampleInfo, str]] = field(default_factory=list)  # (sample number, sample, reason)


@dataclass
class PreparedBatch:
    """A batch ready for the engine: ``crops`` (a view of the slot, rejected rows left out) holds the
    i-th kept sample's crop in row i, except at the positions of ``jpegs`` (left for the device)."""

    slot: int | None
    crops: np.ndarray  # uint8 [n, 224, 224, 3]
    jpegs: dict[int, EncodedJpeg]
    rows: list[MetadataRow]  # one per crop row
    seqs: list[int]  # their sample numbers
    failures: list[tuple[int, SampleInfo, str]]  # (sample number, sample, reason), in tar order
    paths: dict[str, int]
    decode_s: float = 0.0
    preprocess_s: float = 0.0


class PreparedStream:
    """Stages 1-3: a reader thread indexes the tar, assigns every image a row in a shared-memory batch
    slot and sends chunks of (offset, size) to the decode pool, which reads the images and writes the
    crops into their rows. :meth:`batches` yields :class:`PreparedBatch` in tar order; the caller
    gives each slot back with :meth:`release` once the engine is done with it. Use as a context
    manager: leaving it stops the reader and cancels the chunks not started yet."""

    def __init__(self, shard: str, storage: Storage, pool: DecodePool, options: EmbedOptions,
                 device_jpeg: bool = False, slots: int = BATCH_SLOTS) -> None:
        self.shard, self.storage, self.pool = shard, storage, pool
        self.max_pixels = options.max_image_pixels
        self.preprocessing = options.preprocessing
        self.device_jpeg = device_jpeg
        self.batch_size = options.batch_size if options.batch_size > 0 else DEFAULT_SLOT_ROWS
        self.stats = TarStats()
        self.read_seconds = 0.0  # reading/parsing the tar, including waiting for the source
        self.slots = BatchSlots(self.batch_size, slots)
        self._queue: queue.Queue = queue.Queue()  # bounded by the slots
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="embedjob-tar-reader", daemon=True)

    def __enter__(self) -> PreparedStream:
        self.pool.attach(self.slots)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock the reader, and free the pool of work nobody will collect
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Dispatched):
                for f in item.chunks:
                    f.cancel()
        self._thread.join()
        self.pool.detach(self.slots)
        self.slots.close()

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self.slots.release(slot)

    def batches(self) -> Iterator[PreparedBatch]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _ReaderError):
                raise item.error
            yield self._ready(item)

    def _ready(self, sent: _Dispatched) -> PreparedBatch:
        """Wait for a dispatched batch's chunks and lay its slot out for the engine."""
        records: list = []
        blobs: list[bytes] = []
        paths: dict[str, int] = {}
        decode_s = preprocess_s = 0.0
        for future in sent.chunks:
            reply, payload = future.result()
            records += reply["records"]
            decode_s += reply["decode_s"]
            preprocess_s += reply["preprocess_s"]
            for path, count in reply["paths"].items():
                paths[path] = paths.get(path, 0) + count
            if payload:
                blobs.append(payload)
        failures = list(sent.skipped)
        rows: list[MetadataRow] = []
        seqs: list[int] = []
        keep: list[int] = []
        jpegs: dict[int, EncodedJpeg] = {}
        payload = b"".join(blobs)
        pos = 0
        for i, (status, width, height, text, size) in enumerate(records):
            info = sent.infos[i]
            if status == REJECTED:
                failures.append((sent.seqs[i], info, text))
                continue
            if status == JPEG:
                jpegs[len(keep)] = EncodedJpeg(payload[pos:pos + size], width, height, 0.0)
                pos += size
            keep.append(i)
            rows.append(info.row(self.shard, width, height))
            seqs.append(sent.seqs[i])
        failures.sort(key=lambda f: f[0])
        if sent.slot is None:
            crops = self.slots.array[:0, 0] if self.slots.slots else np.empty((0, *CROP_SHAPE), np.uint8)
        else:
            slot = self.slots.array[sent.slot]
            if len(keep) < len(records):  # close the rejected images' gaps (rare: one copy of the rest)
                slot[:len(keep)] = slot[keep]
            crops = slot[:len(keep)]
        return PreparedBatch(sent.slot, crops, jpegs, rows, seqs, failures, paths, decode_s, preprocess_s)

    def __iter__(self) -> Iterator[tuple[SampleInfo, Prepared]]:
        """Per image, in tar order (the benchmark's decode limit, tests): ``(SampleInfo, Prepared)``;
        a Crop's pixels are a view of its slot, valid until the next item."""
        for batch in self.batches():
            items: list[tuple[int, SampleInfo, Prepared]] = [
                (seq, info, Rejected(reason)) for seq, info, reason in batch.failures]
            for i, (seq, row) in enumerate(zip(batch.seqs, batch.rows, strict=True)):
                info = SampleInfo(row.key, row.member, row.caption, row.json)
                item = batch.jpegs.get(i) or Crop(batch.crops[i], row.width, row.height, 0.0, 0.0, "")
                items.append((seq, info, item))
            items.sort(key=lambda x: x[0])
            try:
                for _, info, item in items:
                    yield info, item
            finally:
                self.release(batch.slot)

    # -- the reader thread --------------------------------------------------------------------------
    def _put(self, item: object) -> bool:
        if self._stop.is_set():
            return False
        self._queue.put(item)
        return True

    def _read(self) -> None:
        src = os.path.abspath(self.shard) if not is_s3(self.shard) else None
        batch = _Dispatched(None)
        items: list[list[int]] = []  # the chunk's [offset, size]
        rows: list[int] = []
        datas: list[bytes] = []  # the chunk's images, when read here (a stream, not a local tar)
        size = 0
        chunk = 1  # the first chunks are small, so that every worker has work at once
        seq = 0
        src_id: list[int] | None = None

        def send() -> None:
            nonlocal items, rows, datas, size, chunk
            if not items:
                return
            header = {"op": "chunk", "max_pixels": self.max_pixels, "preprocessing": self.preprocessing,
                      "device_jpeg": self.device_jpeg, "src": None if datas else src, "src_id": src_id, "items": items,
                      "slots": self.slots.id, "slot": batch.slot, "rows": rows}
            batch.chunks.append(self.pool.submit_chunk(header, b"".join(datas)))
            items, rows, datas, size = [], [], [], 0  # the image bytes now belong to the pool only
            chunk = min(2 * chunk, self.pool.chunk_images)

        def emit() -> bool:
            nonlocal batch
            send()
            done, batch = batch, _Dispatched(None)
            return self._put(done) if done.infos or done.skipped else True

        try:
            t = time.perf_counter()
            with self.storage.open_read(self.shard) as raw:
                try:
                    src_id = file_identity(os.fstat(raw.fileno())) if src is not None else None
                except (OSError, AttributeError, ValueError):
                    src, src_id = None, None  # not a file after all: streamed
                samples = iter_tar(raw, self.stats, in_place=src is not None)
                while True:
                    item = next(samples, _END)
                    self.read_seconds += time.perf_counter() - t
                    if item is _END:
                        break
                    seq += 1
                    if isinstance(item, SkippedMember):
                        batch.skipped.append((seq, SampleInfo(item.key, item.member), item.reason))
                    else:
                        if batch.slot is None:
                            send()  # nothing pending: only skipped members so far
                            batch.slot = self.slots.acquire(self._stop)
                            if batch.slot is None:
                                return
                        rows.append(len(batch.infos))
                        batch.infos.append(SampleInfo(item.key, item.member, item.caption, item.json))
                        batch.seqs.append(seq)
                        if item.offset >= 0:
                            items.append([item.offset, item.size])
                        else:
                            items.append([size, len(item.image)])
                            datas.append(item.image)
                        size += item.size
                        del item
                        if len(batch.infos) >= self.batch_size:
                            if not emit():
                                return
                        elif len(items) >= chunk or size >= CHUNK_BYTES:
                            send()
                    t = time.perf_counter()
            if emit():
                self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread, which re-raises
            self._put(_ReaderError(e))


def device_jpeg_decoder(options: EmbedOptions, model: Embedder) -> JpegDecoder | None:
    """The GPU JPEG decoder when the fast path decodes on the device (preprocessing "fast" on CUDA),
    else None. Raises at once, naming the field, when this worker cannot (no torchvision)."""
    if options.preprocessing != "fast" or model.device.type != "cuda":
        return None
    return nvjpeg_decoder()


class _Batches:
    """The calling thread's side of stages 4-5: prepared batches to the engine, and finished batches
    into the writer, in tar order."""

    def __init__(self, engine: InferenceEngine, writer: ShardWriter, stream: PreparedStream,
                 on_progress: Callable[[int], None] | None, timings: dict[str, float]) -> None:
        self.engine, self.writer, self.stream = engine, writer, stream
        self.on_progress, self.timings = on_progress, timings
        self.embedded = 0
        self.paths: dict[str, int] = {}  # how the embedded images were preprocessed
        self._failures: list[tuple[int, dict[str, str]]] = []  # (sample number, record): kept in tar order
        self._in_flight: collections.deque[tuple[Future, PreparedBatch]] = collections.deque()

    @property
    def failures(self) -> list[dict[str, str]]:
        return [record for _, record in sorted(self._failures, key=lambda f: f[0])]

    def _fail(self, seq: int, info: SampleInfo | MetadataRow, reason: str) -> None:
        self._failures.append((seq, {"key": info.key, "member": info.member, "reason": reason}))

    def add(self, batch: PreparedBatch) -> None:
        self.timings["decode"] += batch.decode_s
        self.timings["preprocess"] += batch.preprocess_s
        for path, count in batch.paths.items():
            self.paths[path] = self.paths.get(path, 0) + count
        for seq, info, reason in batch.failures:
            self._fail(seq, info, reason)
        if not batch.rows:
            self.stream.release(batch.slot)
        else:
            t = time.perf_counter()
            future = self.engine.submit_batch(batch.crops, batch.jpegs)
            self.timings["wait"] += time.perf_counter() - t  # for a free host buffer (the model is behind)
            # The slot is free once the forward has read it (on the forward thread: never waits on us).
            future.add_done_callback(lambda _f, slot=batch.slot: self.stream.release(slot))
            self._in_flight.append((future, batch))
        self.collect(wait=False)

    def collect(self, wait: bool) -> None:
        """Write every finished batch (all of them when ``wait``), in submission order."""
        while self._in_flight and (wait or self._in_flight[0][0].done()):
            future, batch = self._in_flight.popleft()
            t = time.perf_counter()
            result = future.result()
            self.timings["wait"] += time.perf_counter() - t  # for the model
            rows = batch.rows
            if result.rejected or result.paths:  # the device path: some rows were decoded there
                rows = []
                for i, row in enumerate(batch.rows):
                    if i in result.rejected:
                        self._fail(batch.seqs[i], row, result.rejected[i])
                        continue
                    if i in result.paths:
                        self.paths[result.paths[i]] = self.paths.get(result.paths[i], 0) + 1
                    rows.append(row)
            self.writer.add(result.rows, rows)
            self.embedded += len(rows)
            if self.on_progress is not None:
                self.on_progress(self.embedded)

    def finish(self) -> None:
        self.collect(wait=True)
        # The model's own time on this shard's batches (on CUDA, measured on the device): what
        # inference/total says is how busy this shard kept the model.
        self.timings["inference"] = self.engine.busy_seconds


def embed_shard(
    shard: str,
    output: str,
    model: Embedder,
    options: EmbedOptions,
    *,
    stem: str | None = None,
    storage: Storage | None = None,
    on_progress: Callable[[int], None] | None = None,
    pool_kind: str | None = None,
) -> ShardResult:
    """Embed every image of ``shard`` and write its outputs under ``output`` (see the module
    docstring for the contract)."""
    started = time.perf_counter()
    storage = storage or Storage()
    stem = stem or shard_stem(shard, "")
    outputs = shard_outputs(output, stem)
    if storage.exists(outputs.manifest):
        # Redoing a finished shard: it stops being "done" until the new outputs are all in place.
        storage.delete(outputs.manifest)

    jpeg_decoder = device_jpeg_decoder(options, model)  # fails first: a worker that cannot, tunes nothing
    requested_batch = options.batch_size
    options = replace(options, batch_size=model.resolve_batch_size(options.batch_size))  # 0: tuned on the device
    model.warm_up(options.batch_size)  # compiled forward only; timed and recorded in the manifest
    pool = shared_decode_pool(decode_workers(options), pool_kind)  # None: the shared pool's kind
    created = datetime.now(UTC)
    timings = dict.fromkeys(STAGES, 0.0)
    with ShardWriter(outputs, storage, dim=model.dim, dtype=options.dtype) as writer:
        try:
            with InferenceEngine(model, options.batch_size, jpeg_decoder=jpeg_decoder,
                                 max_pixels=options.max_image_pixels) as engine, \
                    PreparedStream(shard, storage, pool, options, device_jpeg=jpeg_decoder is not None) as stream:
                batches = _Batches(engine, writer, stream, on_progress, timings)
                t = time.perf_counter()
                for batch in stream.batches():
                    timings["wait"] += time.perf_counter() - t
                    batches.add(batch)
                    t = time.perf_counter()
                batches.finish()
        except DecodePoolBroken:
            discard_decode_pool(pool)  # a decoder crashed: the next shard gets a fresh pool
            raise
        timings["read"] = stream.read_seconds
        if stream.stats.error:
            if options.on_truncated == "fail":  # nothing committed: the shard is not done, a rerun retries it
                raise TruncatedShard(f"{shard}: {stream.stats.error} (spec.onTruncatedShard: fail; "
                                     f"{batches.embedded} images before the damage not committed)")
            log.warning("shard %s: %s (kept %d images read before it)", shard, stream.stats.error, batches.embedded)
        manifest = shard_manifest(
            shard=shard, stem=stem, output=output, embedded=batches.embedded, failures=batches.failures,
            stats=stream.stats, model=model.describe(),
            preprocessing=PREPROCESSING_ID if options.preprocessing == "exact" else FAST_PREPROCESSING_ID,
            preprocessing_paths=batches.paths,
            options={"batch_size": options.batch_size, "batch_size_requested": requested_batch,
                     "precision": options.precision,
                     "num_threads": pool.workers, "max_image_pixels": options.max_image_pixels},
            timings=timings, created=created,
        )
        t = time.perf_counter()
        writer.commit(manifest)
        timings["write"] = time.perf_counter() - t

    timings["total"] = seconds = time.perf_counter() - started
    return ShardResult(shard=shard, stem=stem, status="done", images=batches.embedded,
                       failed=len(manifest["failed"]), seconds=seconds, manifest=outputs.manifest, timings=timings,
                       batch_size=min(options.batch_size, model.max_batch or options.batch_size),
                       tar_error=stream.stats.error)
