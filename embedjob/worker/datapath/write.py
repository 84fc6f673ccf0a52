"""Stage 5 — writer: a shard's ``.npy``, its aligned ``.parquet``, then its manifest, all atomic.

Embeddings are appended batch by batch to a spooled temporary file (memory stays bounded for any
shard size); metadata rows are small and kept in memory. :meth:`ShardWriter.commit` then writes, in
this order and each through ``Storage.put_atomic`` (temporary key under the output's ``_tmp/``, then
the final name):

1. ``img_emb/<stem>.npy``        ``[N, D]`` in the output dtype (a valid ``[0, D]`` array when empty)
2. ``text_emb/<stem>.npy``       with text outputs: ``[N, D]``, row i = the caption of image row i (zeros
                                 where the sample has none)
3. ``metadata/<stem>.parquet``   one row per ``.npy`` row, same order, fixed schema (even when empty); with
                                 text outputs two more columns: ``has_caption`` and ``clip_score`` (the
                                 cosine of the two rows as written, null without a caption); then a
                                 float32 column per score head (``aesthetic``, ``nsfw``)
4. ``_manifests/<stem>.json``    LAST: counts, failures, model, score heads and the quantile sketch
                                 of each score, checksums — "this shard is done"

If any step fails, what this attempt already wrote is deleted again (best effort) and the error is
raised: the manifest never exists without both data files, and no half-written file ever appears.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.layout import ShardOutputs
from embedjob.sketch import QuantileSketch
from embedjob.storage import Storage
from embedjob.worker.datapath.read import TarStats

OUTPUT_DTYPES = {"float16": np.float16, "float32": np.float32}
MANIFEST_VERSION = 1
# Embeddings stay in RAM up to this size, then spill to a temporary file.
SPOOL_BYTES = 64 * 1024 * 1024

METADATA_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("member", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("json", pa.string()),
    ]
)
# With text outputs: whether the sample had a caption (else its text row is zeros) and the image-text cosine.
TEXT_METADATA_SCHEMA = METADATA_SCHEMA.append(pa.field("has_caption", pa.bool_(), nullable=False)).append(
    pa.field("clip_score", pa.float32()))


def metadata_schema(scores: list[str], text: bool = False) -> pa.Schema:
    """The parquet schema: the fixed columns, with text outputs ``has_caption`` and ``clip_score``, then
    one float32 column per score head, in that order."""
    base = TEXT_METADATA_SCHEMA if text else METADATA_SCHEMA
    return pa.schema([*base, *(pa.field(name, pa.float32()) for name in scores)])


@dataclass(frozen=True)
class MetadataRow:
    """One ``.parquet`` row; ``width``/``height`` are the original image's size."""

    key: str
    shard: str
    member: str
    width: int
    height: int
    caption: str | None = None
    json: str | None = None


def _sha256_and_size(f: IO[bytes]) -> tuple[str, int]:
    f.seek(0)
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(1 << 20):
        h.update(chunk)
        size += len(chunk)
    f.seek(0)
    return h.hexdigest(), size


@functools.cache
def embedjob_version() -> str:
    """The installed embedjob's version (read once per process: the metadata lookup costs ~1 ms)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("embedjob")
    except PackageNotFoundError:
        return "unknown"


def shard_manifest(
    *,
    shard: str,
    stem: str,
    output: str,
    embedded: int,
    failures: list[dict[str, str]],
    stats: TarStats,
    model: dict[str, Any],
    preprocessing: str,
    preprocessing_paths: dict[str, int],
    options: dict[str, Any],
    timings: dict[str, float],
    created: datetime,
    scores: dict[str, dict[str, Any]] | None = None,
    text: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest body :meth:`ShardWriter.commit` completes and writes: counts, every failed
    sample with its reason, the tar's own error, the model, how the pixels were preprocessed
    (``preprocessing`` id, and how many images took each path), options and stage timings; with text
    outputs, ``text``: the tokenizer's identity and the caption counts (with one, missing, truncated)."""
    return {
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
        "failed": failures,
        "tar_error": stats.error,
        "model": model,
        # Each score head as loaded: architecture, where its weights came from, their sha256.
        **({"scores": scores} if scores else {}),
        "preprocessing": preprocessing,
        "preprocessing_paths": preprocessing_paths,
        "options": options,
        # The write itself is timed in ShardResult: it is not over while the manifest is written.
        "timings": {k: round(v, 4) for k, v in timings.items() if k != "write"},
        "created": created.isoformat(),
        **({"text": text} if text is not None else {}),
    }


class ShardWriter:
    """Collects one shard's embeddings and metadata rows, then commits the three outputs."""

    def __init__(self, outputs: ShardOutputs, storage: Storage, dim: int, dtype: str = "float16",
                 scores: list[str] | None = None, text: bool = False) -> None:
        if dtype not in OUTPUT_DTYPES:
            raise ValueError(f"unsupported output dtype {dtype!r} (use {' or '.join(OUTPUT_DTYPES)})")
        self.outputs = outputs
        self.storage = storage
        self.dim = int(dim)
        self.dtype = np.dtype(OUTPUT_DTYPES[dtype])
        self.rows: list[MetadataRow] = []
        self.score_names = list(scores or [])
        self._scores: dict[str, list[np.ndarray]] = {name: [] for name in self.score_names}
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - closed in close()
        self.text = text
        self._text_spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) if text else None  # noqa: SIM115
        self.has_caption: list[bool] = []
        self.clip_scores: list[float | None] = []

    def __len__(self) -> int:
        return len(self.rows)

    def as_written(self, embeddings: np.ndarray) -> np.ndarray:
        """The rows exactly as the ``.npy`` will hold them (in the output dtype); rows that already are
        come back as they are, not copied."""
        return np.ascontiguousarray(embeddings, dtype=self.dtype)

    def add(self, embeddings: np.ndarray, rows: list[MetadataRow], scores: dict[str, np.ndarray] | None = None,
            text_rows: np.ndarray | None = None, has_caption: np.ndarray | None = None) -> None:
        """Append a batch: ``embeddings[i]`` belongs to ``rows[i]``, and so does ``scores[name][i]``; with
        text outputs so do ``text_rows[i]`` (zeros without a caption) and ``has_caption[i]``."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim or embeddings.shape[0] != len(rows):
            raise ValueError(f"batch of {len(rows)} rows got embeddings of shape {embeddings.shape}, dim {self.dim}")
        scores = scores or {}
        if sorted(scores) != sorted(self.score_names) or any(len(v) != len(rows) for v in scores.values()):
            raise ValueError(f"batch of {len(rows)} rows got scores {sorted(scores)}, want {self.score_names}")
        image = self.as_written(embeddings)
        if self._text_spool is not None:
            if text_rows is None or has_caption is None or text_rows.shape != embeddings.shape \
                    or len(has_caption) != len(rows):
                raise ValueError(f"batch of {len(rows)} rows needs text rows of shape {embeddings.shape}")
            text = self.as_written(text_rows)
            # The score of the rows as written: a reader's own dot product of the two files gives it back.
            clip = np.einsum("ij,ij->i", image.astype(np.float32), text.astype(np.float32))
            self._text_spool.write(text.tobytes())
            self.has_caption.extend(bool(h) for h in has_caption)
            self.clip_scores.extend(float(x) if h else None for x, h in zip(clip, has_caption, strict=True))
        self._spool.write(image.tobytes())
        self.rows.extend(rows)
        for name, values in scores.items():
            self._scores[name].append(np.asarray(values, dtype=np.float32).reshape(-1))

    def score_columns(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) if parts else np.empty(0, np.float32)
                for name, parts in self._scores.items()}

    def sketches(self) -> dict[str, dict[str, Any]]:
        """Each score's quantile sketch (embedjob.sketch), as JSON: the job's summary merges them."""
        return {name: QuantileSketch.of(values).to_json() for name, values in self.score_columns().items()}

    # -- the three files ------------------------------------------------------------------------------
    def _npy_file(self, spool: IO[bytes] | None = None) -> IO[bytes]:
        """The spooled rows (image rows by default) behind a ``.npy`` v1 header, as one seekable
        temporary file."""
        spool = spool if spool is not None else self._spool
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (len(self.rows), self.dim),
        }
        out = tempfile.TemporaryFile()  # noqa: SIM115 - returned to the caller, who closes it
        np.lib.format.write_array_header_1_0(out, header)
        spool.seek(0)
        shutil.copyfileobj(spool, out, 1 << 20)
        return out

    def _parquet_bytes(self) -> bytes:
        columns: dict[str, Any] = {name: [getattr(r, name) for r in self.rows] for name in METADATA_SCHEMA.names}
        if self.text:
            columns |= {"has_caption": self.has_caption, "clip_score": self.clip_scores}
        columns.update({name: pa.array(v, pa.float32()) for name, v in self.score_columns().items()})
        table = pa.Table.from_pydict(columns, schema=metadata_schema(self.score_names, self.text))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write npy, parquet, then ``manifest`` (completed with file checksums, sizes, dtype, dim
        and version) — in that order. Returns the manifest as written. On failure, deletes what
        this call wrote and re-raises."""
        written: list[str] = []
        try:
            with self._npy_file() as npy:
                npy_sha, npy_size = _sha256_and_size(npy)
                self.storage.put_atomic(self.outputs.embeddings, npy, tmp_root=self.outputs.tmp_root)
                written.append(self.outputs.embeddings)
            files: dict[str, Any] = {}
            if self._text_spool is not None:
                with self._npy_file(self._text_spool) as npy:
                    text_sha, text_size = _sha256_and_size(npy)
                    self.storage.put_atomic(self.outputs.text_embeddings, npy, tmp_root=self.outputs.tmp_root)
                    written.append(self.outputs.text_embeddings)
                files["text_embeddings"] = {"uri": self.outputs.text_embeddings, "shape": [len(self.rows), self.dim],
                                            "bytes": text_size, "sha256": text_sha}
            parquet = self._parquet_bytes()
            self.storage.put_atomic(self.outputs.metadata, parquet, tmp_root=self.outputs.tmp_root)
            written.append(self.outputs.metadata)
            manifest = {
                **manifest,
                "manifest_version": MANIFEST_VERSION,
                "embedjob_version": embedjob_version(),
                "dtype": self.dtype.name,
                "dim": self.dim,
                **({"score_sketches": self.sketches()} if self.score_names else {}),
                "files": {
                    "embeddings": {
                        "uri": self.outputs.embeddings,
                        "shape": [len(self.rows), self.dim],
                        "bytes": npy_size,
                        "sha256": npy_sha,
                    },
                    "metadata": {
                        "uri": self.outputs.metadata,
                        "rows": len(self.rows),
                        "bytes": len(parquet),
                        "sha256": hashlib.sha256(parquet).hexdigest(),
                    },
                    **files,
                },
            }
            body = json.dumps(manifest, indent=2, sort_keys=True).encode()
            # If the put fails after its copy landed (e.g. the temp-key delete fails), the manifest
            # must go first: a manifest must never outlive its data files.
            written.insert(0, self.outputs.manifest)
            self.storage.put_atomic(self.outputs.manifest, body, tmp_root=self.outputs.tmp_root)
            return manifest
        except BaseException:
            for uri in written:
                try:
                    self.storage.delete(uri)
                except Exception:  # noqa: BLE001 - best effort; the original error matters more
                    pass
            raise

    def close(self) -> None:
        self._spool.close()
        if self._text_spool is not None:
            self._text_spool.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
