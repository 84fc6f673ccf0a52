"""Reading a job's results back, and the job-level manifest. Torch-free.

Only shards whose manifest exists count as results: a shard without one is not done, whatever
else is there.

>>> keys, emb = read_embeddings("s3://embeddings/laion-subset/")      # all finished shards
>>> keys, emb = read_embeddings("s3://embeddings/laion-subset/", shard="00007")
>>> keys, txt = read_embeddings("s3://embeddings/laion-subset/", kind="text")  # outputs: [image, text]
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from embedjob import settings
from embedjob.layout import job_manifest_uri, manifests_prefix, shard_outputs, stem_from_manifest, tmp_root
from embedjob.sketch import QuantileSketch, merge_summaries
from embedjob.storage import Storage, StorageError, StorageOptions

KINDS = ("image", "text")  # img_emb/ | text_emb/ (spec.outputs)
log = logging.getLogger("embedjob.results")


@dataclass
class ShardEmbeddings:
    stem: str
    keys: list[str]
    embeddings: np.ndarray
    manifest: dict[str, Any]


class TooManyManifests(ValueError):
    """More shard manifests under an output than one job plans (``EMBEDJOB_MAX_SHARDS``)."""


def done_stems(output_uri: str, storage: Storage | None = None, limit: int | None = None) -> set[str]:
    """Stems of every finished shard under ``output_uri`` (one paginated listing of _manifests/). The
    listing stops past ``limit`` (default ``EMBEDJOB_MAX_SHARDS``, the most a job plans) and raises
    :class:`TooManyManifests`: the output prefix is the job owner's to write, and what lists it (the operator, a
    shared worker's report) holds every stem."""
    storage = storage or Storage()
    limit = settings.load().max_shards if limit is None else limit
    found = itertools.islice(storage.list(manifests_prefix(output_uri), suffix=".json"), limit + 1)
    stems = {stem_from_manifest(u, output_uri) for u in found}
    if len(stems) > limit:
        raise TooManyManifests(f"more than {limit:,} shard manifests under {manifests_prefix(output_uri)!r} "
                               "(EMBEDJOB_MAX_SHARDS)")
    return stems


class ManifestUnreadable(ValueError):
    """A shard manifest that is not what a worker writes, so it is not read: too large, too many JSON
    values, not JSON (nested past the parser's depth included), not an object, or a field of another
    type or range than the worker's. The output prefix is the job owner's to write, and the shared
    operator reads it: whatever lies there costs bounded memory and time, and can only make that
    shard's counts unknown (the shard is done: its manifest exists)."""


class ManifestTooLarge(ManifestUnreadable):
    """A shard manifest above the size cap: not read (the output prefix is the job owner's to write)."""


# What identifies the model in its records; the rest of a manifest's model block (device, precision,
# compile warm-up) describes one run.
_PROVENANCE_KEYS = ("id", "revision", "path", "name", "family", "dim", "weightsSha256")

# JSON values (counted as separators and openers, an upper bound) a manifest may hold. A worker's holds
# about four per failed sample and one per sketch point; parsing costs up to ~70 bytes of memory per
# value (an empty object), so the cap bounds a parse at ~18 MB whatever the bytes are.
MAX_MANIFEST_VALUES = 1 << 18
# A count above this is not a shard's (a shard has at most a few million samples).
MAX_SHARD_COUNT = 1 << 40
# What a record keeps of a tar error (the status and _job.json show it).
MAX_TAR_ERROR_CHARS = 500
# A model provenance value longer than this is not a worker's (ids, paths and sha256s are short).
MAX_PROVENANCE_CHARS = 1024


class _ParseBudget:
    """Bytes of owner-written JSON being read and parsed at once in this process, shared by every
    thread (the operator reads 16 manifests at a time per job, and several jobs plan at once). A read
    holds ``PARSE_COST`` × its size until parsed; one larger than the whole budget holds all of it. One
    hold per read, never nested: no deadlock."""

    def __init__(self, total: int) -> None:
        self.total, self.free = total, total
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        n = min(n, self.total)
        with self._cond:
            self._cond.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self._cond:
                self.free += n
                self._cond.notify_all()


# Parsing costs about the bytes, their decoded text and the objects (values capped above): 3 x the size.
PARSE_COST = 3
PARSE_BUDGET = _ParseBudget(96 << 20)  # two 16 MiB manifests at once; small ones are not held back


def read_json_object(storage: Storage, uri: str, max_bytes: int, max_values: int = MAX_MANIFEST_VALUES,
                     ) -> dict[str, Any]:
    """The JSON object at ``uri``, read in bounded memory and time: one over ``max_bytes`` bytes raises
    :class:`ManifestTooLarge` (unread when the store says its size), at most ``max_values`` JSON values are parsed,
    anything but a JSON object raises :class:`ManifestUnreadable`, and the reads and parses of every
    thread together hold at most :data:`PARSE_BUDGET`. For what a job owner can write and a shared
    process reads."""
    with storage.open_read(uri) as f:
        size = Storage.size_of(f)
        if size is not None and size > max_bytes:
            raise ManifestTooLarge(f"{uri}: more than {max_bytes} bytes: not read")
        with PARSE_BUDGET.hold(PARSE_COST * (max_bytes if size is None else size)):
            data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise ManifestTooLarge(f"{uri}: more than {max_bytes} bytes: not read")
            if data.count(b",") + data.count(b"[") + data.count(b"{") >= max_values:
                raise ManifestUnreadable(f"{uri}: more than {max_values} JSON values: not read")
            try:
                doc = json.loads(data)
            except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested past the parser's depth
                raise ManifestUnreadable(f"{uri}: not JSON ({type(e).__name__}): not read") from None
            del data
    if not isinstance(doc, dict):
        raise ManifestUnreadable(f"{uri}: not a JSON object: not read")
    return doc


def read_manifest(output_uri: str, stem: str, storage: Storage | None = None,
                  max_bytes: int | None = None) -> dict[str, Any]:
    """A shard's manifest; at most ``max_bytes`` (default ``EMBEDJOB_MAX_MANIFEST_BYTES``) are read,
    a larger one raises :class:`ManifestTooLarge` without being held in memory. A manifest that is
    not a JSON object of at most :data:`MAX_MANIFEST_VALUES` values raises :class:`ManifestUnreadable`."""
    limit = settings.load().max_manifest_bytes if max_bytes is None else max_bytes
    try:
        return read_json_object(storage or Storage(), shard_outputs(output_uri, stem).manifest, limit)
    except ManifestTooLarge as e:
        raise ManifestTooLarge(f"{e} (EMBEDJOB_MAX_MANIFEST_BYTES)") from None


def shard_counts(manifest: dict[str, Any]) -> tuple[int, int]:
    """(images embedded, samples failed) recorded in a shard manifest; :class:`ManifestUnreadable` when
    they are not counts."""
    counts = manifest.get("counts") or {}
    if not isinstance(counts, dict):
        raise ManifestUnreadable("manifest counts: not an object")
    images, failed = counts.get("embedded", 0), counts.get("failed", 0)
    for name, n in (("embedded", images), ("failed", failed)):
        if type(n) is not int or not 0 <= n <= MAX_SHARD_COUNT:
            raise ManifestUnreadable(f"manifest counts.{name}: not a count ({str(n)[:40]!r})")
    return images, failed


def shard_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the job-level records (``_job.json``, the status, ``embedjob run``'s summary) keep of a
    finished shard, from its manifest: its counts, the tar's own error (a truncated or partly
    unreadable shard: the samples after the damage are lost) and the model that embedded it (its
    provenance fields). :class:`ManifestUnreadable` when a field is not what a worker writes."""
    images, failed = shard_counts(manifest)
    tar_error = manifest.get("tar_error") or None
    if tar_error is not None and not isinstance(tar_error, str):
        raise ManifestUnreadable("manifest tar_error: not a string")
    model = manifest.get("model")
    if model is not None:
        if not isinstance(model, dict):
            raise ManifestUnreadable("manifest model: not an object")
        model = {k: model[k] for k in _PROVENANCE_KEYS if model.get(k) is not None}
        for k, v in model.items():
            if not (type(v) is int or (isinstance(v, str) and len(v) <= MAX_PROVENANCE_CHARS)):
                raise ManifestUnreadable(f"manifest model.{k}: not a short string or an integer")
    return {"images": images, "failedImages": failed,
            "tarError": tar_error[:MAX_TAR_ERROR_CHARS] if tar_error else None, "model": model}


def read_shard_record(output_uri: str, stem: str, storage: Storage | None = None) -> dict[str, Any]:
    """:func:`shard_record` of the shard's manifest (:class:`ManifestUnreadable` when it cannot be)."""
    manifest = read_manifest(output_uri, stem, storage)
    try:
        return shard_record(manifest)
    except ManifestUnreadable as e:
        raise ManifestUnreadable(f"{shard_outputs(output_uri, stem).manifest}: {e}: not read") from None


UNREAD_RECORD = {"images": 0, "failedImages": 0, "tarError": None, "model": None, "unread": True}


def read_shard_records(output_uri: str, stems: Iterable[str], storage: Storage | None = None,
                       threads: int = 16, *, gone_ok: bool = False) -> dict[str, dict[str, Any] | None]:
    """:func:`shard_record` of each finished shard in ``stems`` (manifests read in parallel). With
    ``gone_ok``, a manifest that no longer exists gives None instead of raising."""
    storage = storage or Storage()

    def one(stem: str) -> tuple[str, dict[str, Any] | None]:
        try:
            return stem, read_shard_record(output_uri, stem, storage)
        except ManifestUnreadable as e:  # done (its manifest exists), but its counts are not read
            log.warning("%s", e)
            return stem, dict(UNREAD_RECORD)
        except StorageError as e:
            if gone_ok and e.missing:
                return stem, None
            raise

    return dict(in_order(one, list(stems), threads))


def read_score_sketches(output_uri: str, stem: str, storage: Storage | None = None) -> dict[str, QuantileSketch] | None:
    """The score sketches a finished shard's manifest carries (``{score: sketch}``, parsed here: a
    caller holds sketches of bounded size, not manifests); None when the manifest, or its sketches,
    are not a worker's (the output is the job owner's to write), or when it is gone."""
    try:
        raw = read_manifest(output_uri, stem, storage).get("score_sketches") or {}
        if not isinstance(raw, dict):
            raise ManifestUnreadable("score_sketches: not an object")
        return {str(name): QuantileSketch.from_json(d) for name, d in raw.items()}
    except ValueError as e:  # ManifestUnreadable included
        log.warning("%s: score sketches not read: %s", shard_outputs(output_uri, stem).manifest, e)
    except StorageError as e:
        if not e.missing:
            raise
        log.warning("%s: gone: its score sketches are not merged", shard_outputs(output_uri, stem).manifest)
    return None


def read_score_summaries(output_uri: str, stems: Iterable[str], storage: Storage | None = None,
                         threads: int = 16, chunk: int = 256) -> dict[str, dict[str, Any]]:
    """Per score: count, mean and quantiles over the finished shards ``stems``, merged from the quantile
    sketches their manifests carry (no score is read back). Manifests are read ``chunk`` at a time, in
    parallel, and merged as they come: memory stays bounded however many shards there are."""
    storage = storage or Storage()
    stems = list(stems)
    return merge_summaries(in_order(lambda stem: read_score_sketches(output_uri, stem, storage), stems, threads,
                                    chunk)) if stems else {}


T = TypeVar("T")


def in_order(read: Callable[[str], T], stems: list[str], threads: int = 16, chunk: int | None = None) -> Iterator[T]:
    """``read(stem)`` of each stem, in order, ``threads`` at a time (object-store latency); at most
    ``chunk`` (default ``2 * threads``) results are held, so a consumer that merges them as they come
    runs in bounded memory however many shards there are."""
    chunk = chunk or 2 * threads
    if not stems:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(stems)))) as pool:
        for i in range(0, len(stems), chunk):
            yield from pool.map(read, stems[i:i + chunk])




def model_provenance(models: Iterable[dict[str, Any] | None]) -> dict[str, Any] | list[dict[str, Any]] | None:
    """The model that embedded the shards, as their manifests record it (never what a spec implied):
    one record, or a list when shards were embedded by different models; None when none is known."""
    seen: list[dict[str, Any]] = []
    for m in models:
        if not m:
            continue
        rec = {k: m[k] for k in _PROVENANCE_KEYS if m.get(k) is not None}
        if rec and rec not in seen:
            seen.append(rec)
    if not seen:
        return None
    return seen[0] if len(seen) == 1 else seen


def read_shard(output_uri: str, stem: str, storage: Storage | None = None, kind: str = "image") -> ShardEmbeddings:
    """Keys (in row order) and the embedding matrix of one finished shard: its image rows
    (``img_emb/``), or with ``kind="text"`` its caption rows (``text_emb/``, same rows, zeros where a
    sample has no caption: the metadata's ``has_caption``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # the operator's install has no parquet reader
        raise ImportError("reading embedjob outputs needs pyarrow: pip install 'embedjob[read]'") from e

    storage = storage or Storage()
    outputs = shard_outputs(output_uri, stem)
    manifest = json.loads(storage.read_bytes(outputs.manifest))
    if kind == "text" and "text_embeddings" not in manifest.get("files", {}):
        raise FileNotFoundError(f"shard {stem} under {output_uri!r} has no text embeddings "
                                "(its job did not have spec.outputs: [image, text])")
    uri = outputs.text_embeddings if kind == "text" else outputs.embeddings
    emb = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    table = pq.read_table(io.BytesIO(storage.read_bytes(outputs.metadata)), columns=["key"])
    keys = table.column("key").to_pylist()
    if len(keys) != emb.shape[0]:
        raise ValueError(f"shard {stem}: {len(keys)} metadata rows but {emb.shape[0]} embeddings")
    return ShardEmbeddings(stem=stem, keys=keys, embeddings=emb, manifest=manifest)


def iter_shards(output_uri: str, storage: Storage | None = None, kind: str = "image") -> Iterator[ShardEmbeddings]:
    """Every finished shard, in stem order (``kind``: as :func:`read_shard`)."""
    storage = storage or Storage()
    for stem in sorted(done_stems(output_uri, storage)):
        yield read_shard(output_uri, stem, storage, kind)


def read_embeddings(
    uri: str, shard: str | None = None, endpoint: str | None = None, region: str | None = None,
    kind: str = "image",
) -> tuple[list[str], np.ndarray]:
    """Keys and the ``[N, D]`` embedding matrix of a job's output: one shard (by stem) or all
    finished shards concatenated in stem order; ``kind="text"``: the caption rows (``text_emb/``),
    aligned with the image rows. Credentials come from the environment."""
    storage = Storage(StorageOptions(endpoint=endpoint, region=region))
    if shard is not None:
        s = read_shard(uri, shard, storage, kind)
        return s.keys, s.embeddings
    keys: list[str] = []
    mats: list[np.ndarray] = []
    for s in iter_shards(uri, storage, kind):
        keys.extend(s.keys)
        mats.append(s.embeddings)
    if not mats:
        raise FileNotFoundError(f"no finished shards under {uri!r}")
    return keys, np.concatenate(mats, axis=0)


def write_job_manifest(
    storage: Storage,
    output_uri: str,
    *,
    job: str,
    spec: dict[str, Any],
    shards: Mapping[str, Mapping[str, Any]],
    started_at: float | None,
    finished_at: float | None = None,
    extra: dict[str, Any] | None = None,
    scores: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``_job.json`` under the output: totals, every shard with its state and counts, the
    model, timings. ``shards`` maps stem -> {state, images, failedImages, tarError?, model?, error?,
    previousRun?}: every planned shard, including those an earlier run finished (their counts come
    from their manifests), so the totals describe the output whatever run wrote it. The rate counts
    only the images this run embedded (``imagesThisRun``). The model is what the shard manifests
    record (:func:`model_provenance`); the spec's model block is kept as ``modelRequested``. ``scores``:
    the score summaries (:func:`read_score_summaries`), kept as ``scores``.

    In bounded memory for any number of shards: ``shards`` may build its values on demand (the
    operator's does), it is read twice, a value at a time (the totals, then the shards, one a line,
    written through a spooled temporary file). Returns the document without its ``shards``."""
    finished_at = finished_at or time.time()
    totals = dict.fromkeys(("shards", "succeeded", "failed", "images", "failedImages", "truncatedShards",
                            "imagesThisRun", "shardsThisRun"), 0)
    truncated: list[str] = []
    models: list[dict[str, Any]] = []
    for stem, s in shards.items():
        totals["shards"] += 1
        if s.get("state") == "failed":
            totals["failed"] += 1
        if s.get("state") != "succeeded":
            continue
        images = int(s.get("images") or 0)
        totals["succeeded"] += 1
        totals["images"] += images
        totals["failedImages"] += int(s.get("failedImages") or 0)
        if not s.get("previousRun"):
            totals["imagesThisRun"] += images
            totals["shardsThisRun"] += 1
        if s.get("tarError"):
            truncated.append(stem)
        if s.get("model") and s["model"] not in models:
            models.append(s["model"])
    truncated.sort()
    totals["truncatedShards"] = len(truncated)
    seconds = (finished_at - started_at) if started_at else None
    doc = {
        "job": job,
        "model": model_provenance(models),
        "modelRequested": spec.get("model"),
        "output": {"uri": output_uri, "dtype": spec.get("output", {}).get("dtype")},
        "input": spec.get("input"),
        "totals": totals,
        "dataLoss": {"truncatedShards": truncated},
        "timings": {
            "startedAt": started_at,
            "finishedAt": finished_at,
            "seconds": seconds,
            # What this run embedded over its own time: shards done before it are not counted.
            "imagesPerSecond": (totals["imagesThisRun"] / seconds) if seconds else None,
            "rateCounts": "images embedded by this run",
        },
        **(extra or {}),
    }
    if scores:
        doc["scores"] = scores
    with tempfile.SpooledTemporaryFile(max_size=16 << 20) as f:
        head = json.dumps(doc, indent=1)
        f.write(head[:-2].encode() + b',\n "shards": [')  # (head ends with "\n}")
        for i, stem in enumerate(sorted(shards)):
            entry = {"stem": stem, **{k: v for k, v in shards[stem].items() if k != "model"}}
            f.write((",\n  " if i else "\n  ").encode() + json.dumps(entry).encode())
        f.write(b"\n ]\n}\n")
        f.seek(0)
        storage.put_atomic(job_manifest_uri(output_uri), f, tmp_root=tmp_root(output_uri))
    return doc
