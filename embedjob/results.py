"""Reading a job's results back, and the job-level manifest. Torch-free.

Only shards whose manifest exists count as results: a shard without one is not done, whatever
else is there.

>>> keys, emb = read_embeddings("s3://embeddings/laion-subset/")      # all finished shards
>>> keys, emb = read_embeddings("s3://embeddings/laion-subset/", shard="00007")
"""

from __future__ import annotations

import io
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedjob import settings
from embedjob.layout import job_manifest_uri, manifests_prefix, shard_outputs, stem_from_manifest, tmp_root
from embedjob.storage import Storage, StorageOptions


@dataclass
class ShardEmbeddings:
    stem: str
    keys: list[str]
    embeddings: np.ndarray
    manifest: dict[str, Any]


def done_stems(output_uri: str, storage: Storage | None = None, limit: int | None = None) -> set[str]:
    """Stems of every finished shard under ``output_uri`` (one paginated listing of _manifests/). With
    ``limit``, the listing stops past that many and raises ValueError (bounded memory)."""
    storage = storage or Storage()
    found = storage.list(manifests_prefix(output_uri), suffix=".json")
    if limit is not None:
        found = itertools.islice(found, limit + 1)
    stems = {stem_from_manifest(u, output_uri) for u in found}
    if limit is not None and len(stems) > limit:
        raise ValueError(f"more than {limit:,} shard manifests under {manifests_prefix(output_uri)!r}")
    return stems


class ManifestTooLarge(ValueError):
    """A shard manifest above the size cap: not read (the output prefix is the job owner's to write)."""


def read_manifest(output_uri: str, stem: str, storage: Storage | None = None,
                  max_bytes: int | None = None) -> dict[str, Any]:
    """A shard's manifest; at most ``max_bytes`` (default ``EMBEDJOB_MAX_MANIFEST_BYTES``) are read,
    a larger one raises :class:`ManifestTooLarge` without being held in memory."""
    storage = storage or Storage()
    limit = settings.load().max_manifest_bytes if max_bytes is None else max_bytes
    uri = shard_outputs(output_uri, stem).manifest
    with storage.open_read(uri) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ManifestTooLarge(f"{uri}: more than {limit} bytes (EMBEDJOB_MAX_MANIFEST_BYTES): not read")
    return json.loads(data)


def shard_counts(manifest: dict[str, Any]) -> tuple[int, int]:
    """(images embedded, samples failed) recorded in a shard manifest."""
    counts = manifest.get("counts") or {}
    return int(counts.get("embedded", 0)), int(counts.get("failed", 0))


def read_shard(output_uri: str, stem: str, storage: Storage | None = None) -> ShardEmbeddings:
    """Keys (in row order) and the embedding matrix of one finished shard."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # the operator's install has no parquet reader
        raise ImportError("reading embedjob outputs needs pyarrow: pip install 'embedjob[read]'") from e

    storage = storage or Storage()
    outputs = shard_outputs(output_uri, stem)
    manifest = json.loads(storage.read_bytes(outputs.manifest))
    emb = np.load(io.BytesIO(storage.read_bytes(outputs.embeddings)), allow_pickle=False)
    table = pq.read_table(io.BytesIO(storage.read_bytes(outputs.metadata)), columns=["key"])
    keys = table.column("key").to_pylist()
    if len(keys) != emb.shape[0]:
        raise ValueError(f"shard {stem}: {len(keys)} metadata rows but {emb.shape[0]} embeddings")
    return ShardEmbeddings(stem=stem, keys=keys, embeddings=emb, manifest=manifest)


def iter_shards(output_uri: str, storage: Storage | None = None) -> Iterator[ShardEmbeddings]:
    """Every finished shard, in stem order."""
    storage = storage or Storage()
    for stem in sorted(done_stems(output_uri, storage)):
        yield read_shard(output_uri, stem, storage)


def read_embeddings(
    uri: str, shard: str | None = None, endpoint: str | None = None, region: str | None = None
) -> tuple[list[str], np.ndarray]:
    """Keys and the ``[N, D]`` embedding matrix of a job's output: one shard (by stem) or all
    finished shards concatenated in stem order. Credentials come from the environment."""
    storage = Storage(StorageOptions(endpoint=endpoint, region=region))
    if shard is not None:
        s = read_shard(uri, shard, storage)
        return s.keys, s.embeddings
    keys: list[str] = []
    mats: list[np.ndarray] = []
    for s in iter_shards(uri, storage):
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
    shards: dict[str, dict[str, Any]],
    started_at: float | None,
    finished_at: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``_job.json`` under the output: totals, every shard with its state and counts, the
    model, timings. ``shards`` maps stem -> {state, images, failedImages, error?}."""
    finished_at = finished_at or time.time()
    totals = {
        "shards": len(shards),
        "succeeded": sum(1 for s in shards.values() if s.get("state") == "succeeded"),
        "failed": sum(1 for s in shards.values() if s.get("state") == "failed"),
        "images": sum(int(s.get("images") or 0) for s in shards.values()),
        "failedImages": sum(int(s.get("failedImages") or 0) for s in shards.values()),
    }
    seconds = (finished_at - started_at) if started_at else None
    doc = {
        "job": job,
        "model": spec.get("model"),
        "output": {"uri": output_uri, "dtype": spec.get("output", {}).get("dtype")},
        "input": spec.get("input"),
        "totals": totals,
        "timings": {
            "startedAt": started_at,
            "finishedAt": finished_at,
            "seconds": seconds,
            "imagesPerSecond": (totals["images"] / seconds) if seconds else None,
        },
        "shards": [{"stem": k, **v} for k, v in sorted(shards.items())],
        **(extra or {}),
    }
    storage.put_atomic(job_manifest_uri(output_uri), json.dumps(doc, indent=1).encode(),
                       tmp_root=tmp_root(output_uri))
    return doc
