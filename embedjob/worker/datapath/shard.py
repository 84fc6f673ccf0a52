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
  opened at all); a corrupt/truncated tar keeps what was read and records the error.

The stages, one module each, connected by bounded queues so memory stays flat for any shard size
and rows keep the tar's order::

    reader thread        tar_reader.iter_tar(Storage.open_read(shard))       (S3 / disk stream)
      │  chunks of images to the decode pool; the chunks' Futures on a bounded queue (tar order)
    decode pool          prepare.prepare_images: decode + preprocess        (one process per CPU)
      │  Futures resolved in queue order                                      (PreparedStream)
    calling thread       batches of uint8 crops into the engine's host buffers; finished batches to
      │                  writer.ShardWriter, in order
    forward thread       engine.InferenceEngine: to the device, normalise there, forward, rows back
                         (asynchronous: decode, copy, forward and writing overlap)
    calling thread       -> commit: .npy, .parquet, then the manifest

At most ``queue size x chunk + 3 batches`` samples are alive at once, however large the shard.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime

from embedjob.contract import EmbedOptions
from embedjob.layout import shard_outputs, shard_stem
from embedjob.storage import Storage
from embedjob.worker.datapath.decode_pool import (
    CHUNK_BYTES,
    FAST_PREPROCESSING_ID,
    Crop,
    DecodePool,
    DecodePoolBroken,
    EncodedJpeg,
    Prepared,
    Rejected,
    discard_decode_pool,
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


def queue_size(options: EmbedOptions, workers: int, chunk: int) -> int:
    """How many chunks may wait between the reader and the model: enough to keep every decode worker
    busy while a batch is being embedded, and no more."""
    return max(2 * workers, -(-options.batch_size // chunk))


_END = object()


@dataclass
class _ReaderError:
    error: BaseException


class PreparedStream:
    """Stages 1-3: a reader thread streams the tar and sends chunks of images to the decode pool;
    iterating yields ``(SampleInfo, Prepared)`` in tar order. Use as a context manager: leaving it
    stops the reader and cancels the chunks not started yet, so the shared pool is free again."""

    def __init__(self, shard: str, storage: Storage, pool: DecodePool, options: EmbedOptions,
                 device_jpeg: bool = False) -> None:
        self.shard, self.storage, self.pool = shard, storage, pool
        self.max_pixels = options.max_image_pixels
        self.preprocessing = options.preprocessing
        self.device_jpeg = device_jpeg
        self.stats = TarStats()
        self.read_seconds = 0.0  # reading/parsing the tar, including waiting for the source
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size(options, pool.workers, pool.chunk_images))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="embedjob-tar-reader", daemon=True)

    def __enter__(self) -> PreparedStream:
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
            if isinstance(item, tuple) and isinstance(item[1], Future):
                item[1].cancel()
        self._thread.join()

    def __iter__(self) -> Iterator[tuple[SampleInfo, Prepared]]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _ReaderError):
                raise item.error
            infos, work = item
            results = work.result() if isinstance(work, Future) else work
            yield from zip(infos, results, strict=True)

    # -- the reader thread --------------------------------------------------------------------------
    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        infos: list[SampleInfo] = []
        datas: list[bytes] = []
        size = 0
        chunk = 1  # the first chunks are small, so that every worker has work at once

        def send() -> bool:
            nonlocal infos, datas, size, chunk
            if not infos:
                return True
            future = self.pool.submit(datas, self.max_pixels, self.preprocessing, self.device_jpeg)
            ok = self._put((infos, future))
            infos, datas, size = [], [], 0  # the image bytes now belong to the pool only
            chunk = min(2 * chunk, self.pool.chunk_images)
            return ok

        try:
            t = time.perf_counter()
            with self.storage.open_read(self.shard) as raw:
                items = iter_tar(raw, self.stats)
                while True:
                    item = next(items, _END)
                    self.read_seconds += time.perf_counter() - t
                    if item is _END:
                        break
                    if isinstance(item, SkippedMember):
                        skipped = ([SampleInfo(item.key, item.member)], [Rejected(item.reason)])
                        if not send() or not self._put(skipped):
                            return
                    else:
                        infos.append(SampleInfo(item.key, item.member, item.caption, item.json))
                        datas.append(item.image)
                        size += len(item.image)
                        del item
                        if (len(datas) >= chunk or size >= CHUNK_BYTES) and not send():
                            return
                    t = time.perf_counter()
            if send():
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
    """The calling thread's side of stages 4-5: prepared samples into batches for the engine, and
    finished batches into the writer, in tar order."""

    def __init__(self, engine: InferenceEngine, writer: ShardWriter, shard: str, batch_size: int,
                 on_progress: Callable[[int], None] | None, timings: dict[str, float]) -> None:
        self.engine, self.writer, self.shard, self.batch_size = engine, writer, shard, batch_size
        self.on_progress, self.timings = on_progress, timings
        self.embedded = 0
        self.paths: dict[str, int] = {}  # how the embedded images were preprocessed
        self._failures: list[tuple[int, dict[str, str]]] = []  # (sample number, record): kept in tar order
        self._seq = 0
        self._batch: list[tuple[int, SampleInfo, Crop | EncodedJpeg]] = []
        self._in_flight: collections.deque[tuple[Future, list]] = collections.deque()

    @property
    def failures(self) -> list[dict[str, str]]:
        return [record for _, record in sorted(self._failures, key=lambda f: f[0])]

    def add(self, info: SampleInfo, item: Prepared) -> None:
        self._seq += 1
        if isinstance(item, Rejected):
            self._fail(self._seq, info, item.reason)
            return
        if isinstance(item, Crop):
            self.paths[item.path] = self.paths.get(item.path, 0) + 1
        self._batch.append((self._seq, info, item))
        if len(self._batch) >= self.batch_size:
            self.flush()

    def _fail(self, seq: int, info: SampleInfo, reason: str) -> None:
        self._failures.append((seq, {"key": info.key, "member": info.member, "reason": reason}))

    def flush(self) -> None:
        if self._batch:
            t = time.perf_counter()
            future = self.engine.submit([x.pixels if isinstance(x, Crop) else x for _, _, x in self._batch])
            self.timings["wait"] += time.perf_counter() - t  # for a free host buffer (the model is behind)
            self._in_flight.append((future, self._batch))
            self._batch = []
        self.collect(wait=False)

    def collect(self, wait: bool) -> None:
        """Write every finished batch (all of them when ``wait``), in submission order."""
        while self._in_flight and (wait or self._in_flight[0][0].done()):
            future, batch = self._in_flight.popleft()
            t = time.perf_counter()
            result = future.result()
            self.timings["wait"] += time.perf_counter() - t  # for the model
            rows = []
            for i, (seq, info, item) in enumerate(batch):
                if i in result.rejected:
                    self._fail(seq, info, result.rejected[i])
                    continue
                if i in result.paths:
                    self.paths[result.paths[i]] = self.paths.get(result.paths[i], 0) + 1
                rows.append(info.row(self.shard, item.width, item.height))
            self.writer.add(result.rows, rows)
            self.embedded += len(rows)
            if self.on_progress is not None:
                self.on_progress(self.embedded)

    def finish(self) -> None:
        self.flush()
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
                batches = _Batches(engine, writer, shard, options.batch_size, on_progress, timings)
                t = time.perf_counter()
                for info, item in stream:
                    timings["wait"] += time.perf_counter() - t
                    timings["decode"] += item.decode_s
                    timings["preprocess"] += getattr(item, "preprocess_s", 0.0)
                    batches.add(info, item)
                    t = time.perf_counter()
                batches.finish()
        except DecodePoolBroken:
            discard_decode_pool(pool)  # a decoder crashed: the next shard gets a fresh pool
            raise
        timings["read"] = stream.read_seconds
        if stream.stats.error:
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
                       batch_size=min(options.batch_size, model.max_batch or options.batch_size))
