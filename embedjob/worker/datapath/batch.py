"""Batches of prepared images in tar order, from one shard: the reader thread indexes the tar
(read.py) and sends chunks of images to the decode pool (decode_pool.py), each image with its row in
a shared-memory batch slot (batch_slots.py); :class:`PreparedStream` hands the caller whole
:class:`PreparedBatch` es, the rejected images' rows closed up, in tar order.

At most ``queue size x chunk`` images are read ahead, and ``BATCH_SLOTS`` batches exist, however
large the shard.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from embedjob.contract import EmbedOptions
from embedjob.storage import Storage, is_s3
from embedjob.worker.datapath.batch_slots import BatchSlots
from embedjob.worker.datapath.crop import Crop, EncodedJpeg, Prepared, Rejected
from embedjob.worker.datapath.decode_pool import (
    CHUNK_BYTES,
    DecodePool,
)
from embedjob.worker.datapath.decode_worker import JPEG, JPEG_IN_SLOT, REJECTED, file_identity
from embedjob.worker.datapath.read import SkippedMember, TarStats, is_plain_tar, iter_tar
from embedjob.worker.datapath.spool import Spool
from embedjob.worker.datapath.write import MetadataRow
from embedjob.worker.host import available_cpus
from embedjob.worker.model.transform import DEFAULT_TRANSFORM, ImageTransform

log = logging.getLogger(__name__)


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
# The fast path on CUDA: JPEG room per slot, per row (batch_slots.py). A batch's images share it, so
# a large JPEG fits where small ones left room; what does not fit comes back through the pipe.
JPEG_ROOM_PER_ROW = 256 * 1024

_END = object()


@dataclass
class _ReaderError:
    error: BaseException


@dataclass
class _Dispatched:
    """A batch as the reader sent it out: its slot's rows, in tar order, and the chunks preparing them."""

    slot: int | None
    first_offset: int = -1  # where its first image starts in the tar (a spool frees the bytes below)
    infos: list[SampleInfo] = field(default_factory=list)  # the samples given rows 0, 1, ... of the slot
    seqs: list[int] = field(default_factory=list)  # their sample numbers in the tar
    chunks: list[Future] = field(default_factory=list)  # in row order
    jpeg_at: list[int] = field(default_factory=list)  # per row: its place in the slot's JPEG room (-1: none)
    jpeg_used: int = 0  # bytes of the JPEG room reserved so far
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
                 device_jpeg: bool = False, slots: int = BATCH_SLOTS,
                 transform: ImageTransform = DEFAULT_TRANSFORM) -> None:
        self.shard, self.storage, self.pool = shard, storage, pool
        self.max_pixels = options.max_image_pixels
        self.preprocessing = options.preprocessing
        self.device_jpeg = device_jpeg
        self.transform = transform  # the model's (embedjob.worker.model.transform)
        self.batch_size = options.batch_size if options.batch_size > 0 else DEFAULT_SLOT_ROWS
        self.stats = TarStats()
        self.read_seconds = 0.0  # reading/parsing the tar, including waiting for the source
        self.slots = BatchSlots(self.batch_size, slots, transform.crop,
                                jpeg_room=self.batch_size * JPEG_ROOM_PER_ROW if device_jpeg else 0)
        self.spool: Spool | None = None  # a stream's (S3, compressed) tar, made by the reader thread
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
        if self.spool is not None:  # a decoder still reading it keeps its own descriptor until detached
            self.pool.detach(self.spool)
            self.spool.close()

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
            if status == JPEG_IN_SLOT:  # a view of its slot's JPEG room: no copy here
                at = sent.jpeg_at[i]
                jpegs[len(keep)] = EncodedJpeg(self.slots.jpegs[sent.slot][at:at + size], width, height, 0.0)
            elif status == JPEG:  # no room left for it: it came in the payload
                jpegs[len(keep)] = EncodedJpeg(payload[pos:pos + size], width, height, 0.0)
                pos += size
            keep.append(i)
            rows.append(info.row(self.shard, width, height))
            seqs.append(sent.seqs[i])
        failures.sort(key=lambda f: f[0])
        if sent.slot is None:
            crops = self.slots.array[:0, 0] if self.slots.slots else np.empty(
                (0, self.transform.crop, self.transform.crop, 3), np.uint8)
        else:
            slot = self.slots.array[sent.slot]
            if len(keep) < len(records):  # close the rejected images' gaps (rare: one copy of the rest)
                slot[:len(keep)] = slot[keep]
            crops = slot[:len(keep)]
        return PreparedBatch(sent.slot, crops, jpegs, rows, seqs, failures, paths, decode_s, preprocess_s)

    def __iter__(self) -> Iterator[tuple[SampleInfo, Prepared]]:
        """Per image, in tar order (tests): ``(SampleInfo, Prepared)``; a Crop's pixels (and an
        EncodedJpeg's bytes in the JPEG room) are a view of its slot, valid until the next item."""
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
        live: collections.deque[_Dispatched] = collections.deque()  # sent, with images, maybe not decoded yet
        items: list[list[int]] = []  # the chunk's [offset, size]
        rows: list[int] = []
        room = self.slots.jpeg_room  # the fast path on CUDA: each image's place in it (batch.jpeg_at)
        datas: list[bytes] = []  # the chunk's images, when read here (a stream that is not a tar the spool can index)
        size = 0
        chunk = 1  # the first chunks are small, so that every worker has work at once
        seq = 0
        src_id: list[int] | None = None
        spool: Spool | None = None

        def send() -> None:
            nonlocal items, rows, datas, size, chunk
            if not items:
                return
            header = {"op": "chunk", "max_pixels": self.max_pixels, "preprocessing": self.preprocessing,
                      "device_jpeg": self.device_jpeg, "src": None if datas else src, "src_id": src_id,
                      "spool": spool.id if spool is not None and not datas else None, "items": items,
                      "slots": self.slots.id, "slot": batch.slot, "rows": rows,
                      "transform": self.transform.to_dict()}
            if room:  # the chunk's rows are consecutive rows of the batch
                header["jpeg_at"] = batch.jpeg_at[rows[0]:rows[-1] + 1]
            batch.chunks.append(self.pool.submit_chunk(header, b"".join(datas)))
            items, rows, datas, size = [], [], [], 0  # the image bytes now belong to the pool only
            chunk = min(2 * chunk, self.pool.chunk_images)
            if spool is not None:  # free the spool's bytes every decoder is done with
                while live and live[0] is not batch and all(f.done() for f in live[0].chunks):
                    live.popleft()
                spool.release_below(live[0].first_offset if live else spool.tell())

        def emit() -> bool:
            nonlocal batch
            send()
            done, batch = batch, _Dispatched(None)
            return self._put(done) if done.infos or done.skipped else True

        try:
            t = time.perf_counter()
            with self.storage.open_read(self.shard) as raw:
                source = raw
                try:
                    src_id = file_identity(os.fstat(raw.fileno())) if src is not None else None
                except (OSError, AttributeError, ValueError):
                    src, src_id = None, None  # not a file after all: streamed
                if src is None or not is_plain_tar(raw):  # S3, a compressed tar: through a spool
                    src, src_id = None, None
                    spool = self.spool = source = Spool(raw, self.stats)
                    self.pool.attach(spool)
                samples = iter_tar(source, self.stats, in_place=True)
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
                        if item.offset >= 0:
                            if batch.first_offset < 0:
                                batch.first_offset = item.offset
                                live.append(batch)
                            items.append([item.offset, item.size])
                        else:
                            items.append([size, len(item.image)])
                            datas.append(item.image)
                        rows.append(len(batch.infos))
                        if room:  # reserve the image's size in the room, if it fits
                            fits = batch.jpeg_used + items[-1][1] <= room
                            batch.jpeg_at.append(batch.jpeg_used if fits else -1)
                            batch.jpeg_used += items[-1][1] if fits else 0
                        batch.infos.append(SampleInfo(item.key, item.member, item.caption, item.json))
                        batch.seqs.append(seq)
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
