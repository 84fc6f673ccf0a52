"""embed_shard: one WebDataset .tar in, the per-shard outputs of embedjob.layout out.

CONTRACT (other modules code against this; keep it stable):

    embed_shard(shard: str, output: str, model: Embedder, options: EmbedOptions, *,
                stem: str | None = None, storage: Storage | None = None,
                on_progress: Callable[[int], None] | None = None,
                pool_kind: str | None = None, heads: ScoreHeads | None = None) -> ShardResult

- ``shard``: s3:// URI or local path of the .tar; ``output``: output root URI or local folder.
- ``stem``: output stem (default: the shard's basename without .tar).
- ``model``: a loaded embedder (embedjob.worker.model.load.load_embedder), loaded once per process.
- ``on_progress(n)``: called with the number of images embedded so far (cheap; may be called often).
- ``pool_kind``: the decode pool's kind, "process" or "thread" (None: the shared pool's, "process").
- ``heads``: score heads (embedjob.worker.model.heads.load_heads) run on each finished batch, on its rows
  as the ``.npy`` holds them: a float32 column each in the parquet, a quantile sketch each in the manifest.
- Always embeds: whether a shard needs doing is decided by its callers (the plans of the operator
  and of ``embedjob run`` choose what to run; the Celery task re-checks a delivery under its lease).
  An existing manifest is deleted first, so a redone shard is not "done" until its new outputs are.
- Raises only for shard-level failures that leave no usable output (e.g. the shard cannot be
  opened at all); a corrupt/truncated tar keeps what was read and records the error
  (``options.on_truncated == "record"``) or raises :class:`TruncatedShard` (``"fail"``).

The stages, one module each; the main process deals in batches, never in an image's bytes or pixels::

    reader thread        read.iter_tar(Storage.open_read(shard), in_place=True)   (S3 / disk stream)
      │  indexes the tar: a local .tar's images stay in the file (offset, size); a stream's (S3, a
      │  compressed tar) go into the shard's spool file (spool.py) in 1 MiB steps and are read from
      │  there by offset, never one by one in this process. Each image gets a row in
      │  a shared-memory batch slot (batch_slots); chunks of (offset, size, row) to the decode pool
    decode pool          decode_worker.run_chunk: read + decode + preprocess, the crop written straight
      │                  into its row; a small JSON record per image comes back (one process per CPU)
    calling thread       PreparedStream.batches: a full slot, rejected rows closed up, to the engine
      │                  as it is (zero copy on the CPU, one copy per batch into pinned memory on CUDA)
    forward thread       engine.InferenceEngine: to the device, normalise there, forward, rows back
      │                  (asynchronous: decode, copy, forward and writing overlap); the slot is free again
    calling thread       finished batches to writer.ShardWriter, in order (with text outputs, each batch's
                         captions through the text tower first: caption.caption_of, model.text) ->
                         commit: .npy (and text .npy), .parquet, then the manifest

At most ``BATCH_SLOTS`` batches of crops exist per shard (the reader waits for a free slot), however
large the shard.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime

from embedjob.contract import EmbedOptions
from embedjob.layout import shard_outputs, shard_stem
from embedjob.policy import PermanentError
from embedjob.storage import Storage
from embedjob.worker.datapath.batch import PreparedBatch, PreparedStream, SampleInfo, decode_workers
from embedjob.worker.datapath.caption import caption_of, caption_source
from embedjob.worker.datapath.crop import FAST_PREPROCESSING_ID
from embedjob.worker.datapath.decode_pool import (
    DecodePoolBroken,
    discard_decode_pool,
    shared_decode_pool,
)
from embedjob.worker.datapath.engine import InferenceEngine
from embedjob.worker.datapath.gpu_decode import JpegDecoder, nvjpeg_decoder
from embedjob.worker.datapath.write import MetadataRow, ShardWriter, shard_manifest
from embedjob.worker.model.embedder import Embedder
from embedjob.worker.model.heads import ScoreHeads
from embedjob.worker.model.text import TextEmbedder
from embedjob.worker.model.transform import DEFAULT_TRANSFORM, ImageTransform

log = logging.getLogger(__name__)

STAGES = ("read", "decode", "preprocess", "inference", "scores", "write", "wait")


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


def preprocessing_id(preprocessing: str, transform: ImageTransform) -> str:
    """What a manifest records: the model's transform id (exact), or the fast path's id (with the
    transform's when it is not OpenAI CLIP's 224 px one)."""
    if preprocessing == "exact":
        return transform.id
    return FAST_PREPROCESSING_ID if transform == DEFAULT_TRANSFORM else f"{FAST_PREPROCESSING_ID}:{transform.id}"


def device_jpeg_decoder(options: EmbedOptions, model: Embedder) -> JpegDecoder | None:
    """The GPU JPEG decoder when the fast path decodes on the device (preprocessing "fast" on CUDA),
    else None. Raises at once, naming the field, when this worker cannot (no torchvision). The resize
    and crop on the device follow the model's transform (CLIP at any size, SigLIP's squash)."""
    if options.preprocessing != "fast" or model.device.type != "cuda":
        return None
    return nvjpeg_decoder()


class _Batches:
    """The calling thread's side of stages 4-5: prepared batches to the engine, and finished batches
    into the writer, in tar order."""

    def __init__(self, engine: InferenceEngine, writer: ShardWriter, stream: PreparedStream,
                 on_progress: Callable[[int], None] | None, timings: dict[str, float],
                 heads: ScoreHeads | None = None, text: TextEmbedder | None = None,
                 json_field: str | None = None) -> None:
        self.engine, self.writer, self.stream, self.heads = engine, writer, stream, heads
        self.on_progress, self.timings = on_progress, timings
        self.text, self.json_field = text, json_field
        self.embedded = 0
        self.captions = 0  # rows with a caption (text outputs)
        self.truncated = 0  # captions cut to the context length
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
            embeddings = self.writer.as_written(result.rows)  # converted once (add keeps them as they are)
            scores = None
            if self.heads:  # on the rows as written, so the scores are reproducible from the .npy
                t = time.perf_counter()
                scores = self.heads.score(embeddings)
                self.timings["scores"] += time.perf_counter() - t
            text_rows = has_caption = None
            if self.text is not None:  # the rows that have an image row, in the same order
                t = time.perf_counter()
                out = self.text.embed([caption_of(row, self.json_field) for row in rows])
                self.timings["text"] += time.perf_counter() - t
                text_rows, has_caption = out.rows, out.has_caption
                self.captions += int(has_caption.sum())
                self.truncated += out.truncated
            self.writer.add(embeddings, rows, scores, text_rows, has_caption)
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
    heads: ScoreHeads | None = None,
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
    if options.text and model.text is None:
        raise ValueError("text outputs need the model's text tower: load_or_reuse(..., text=True)")
    text = model.text if options.text else None
    requested_batch = options.batch_size
    options = replace(options, batch_size=model.resolve_batch_size(options.batch_size))  # 0: tuned on the device
    model.warm_up(options.batch_size)  # compiled forward only; timed and recorded in the manifest
    pool = shared_decode_pool(decode_workers(options), pool_kind)  # None: the shared pool's kind
    created = datetime.now(UTC)
    timings = dict.fromkeys(STAGES + (("text",) if text is not None else ()), 0.0)
    with ShardWriter(outputs, storage, dim=model.dim, dtype=options.dtype,
                     scores=heads.names if heads else None, text=text is not None) as writer:
        try:
            with InferenceEngine(model, options.batch_size, jpeg_decoder=jpeg_decoder,
                                 max_pixels=options.max_image_pixels) as engine, \
                    PreparedStream(shard, storage, pool, options, device_jpeg=jpeg_decoder is not None,
                                   transform=model.transform) as stream:
                batches = _Batches(engine, writer, stream, on_progress, timings, heads, text,
                                   options.text_json_field)
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
            preprocessing=preprocessing_id(options.preprocessing, model.transform),
            preprocessing_paths=batches.paths,
            options={"batch_size": options.batch_size, "batch_size_requested": requested_batch,
                     "precision": options.precision,
                     "num_threads": pool.workers, "max_image_pixels": options.max_image_pixels},
            timings=timings, created=created, scores=heads.describe() if heads else None,
            text=None if text is None else {
                "tokenizer": text.tokenizer.identity(), "source": caption_source(options.text_json_field),
                "captions": batches.captions, "missing": batches.embedded - batches.captions,
                "truncated": batches.truncated},
        )
        t = time.perf_counter()
        writer.commit(manifest)
        timings["write"] = time.perf_counter() - t

    timings["total"] = seconds = time.perf_counter() - started
    return ShardResult(shard=shard, stem=stem, status="done", images=batches.embedded,
                       failed=len(manifest["failed"]), seconds=seconds, manifest=outputs.manifest, timings=timings,
                       batch_size=min(options.batch_size, model.max_batch or options.batch_size),
                       tar_error=stream.stats.error)
