"""``embedjob report``: one self-contained HTML page about a job's output, to open after the job.

No server, no CDN: the CSS, the script and the data are inline, thumbnails are ``data:`` URIs. The page
shows the totals (images, failed samples by reason, shards, model, throughput), a histogram of each score
column (``aesthetic``, ``nsfw``, ``clip_score`` when present) with a threshold slider that shows how many
images it keeps, and thumbnails of the samples at the lowest, median and highest values of each score,
read back from the input shards by their ``member`` name.

Reads the shards' manifests and the score columns of their metadata (never the embeddings), in bounded
memory (the score panels: :mod:`embedjob.report_scores`); the page itself is :mod:`embedjob.report_page`.
The thumbnails need Pillow (``embedjob[worker]``). Torch-free.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import tarfile
from collections import Counter
from collections.abc import Callable
from typing import Any

from embedjob import settings
from embedjob.layout import job_manifest_uri, report_uri, shard_outputs, tmp_root
from embedjob.report_page import render
from embedjob.report_scores import Picks, ScoreBins, ScoreStats
from embedjob.results import (
    MAX_MANIFEST_VALUES,
    ManifestUnreadable,
    done_stems,
    in_order,
    model_provenance,
    read_json_object,
    read_manifest,
    shard_record,
)
from embedjob.storage import Storage
from embedjob.tar_headers import MAX_MEMBER_BYTES, bounded_tarinfo

SCORE_COLUMNS = ("aesthetic", "nsfw", "clip_score")
# Which side of the threshold a score keeps by default (the slider's direction can be flipped).
KEEP_ABOVE = {"aesthetic": True, "nsfw": False, "clip_score": True}
THUMBS_PER_QUANTILE = 4
READ_THREADS = 16  # shards whose manifest and score columns are read at once (object-store latency)
THUMB_PX = 112
# What one shard's metadata may be for the report to read it (a worker's: its sidecars are capped at
# EMBEDJOB_MAX_METADATA_BYTES, 64 MiB by default, plus ~100 bytes a row).
MAX_METADATA_FILE_BYTES = 512 << 20
MAX_METADATA_ROWS = 1 << 24
log = logging.getLogger("embedjob.report")


def _thumbnail(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
            im = img.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a member that no longer decodes: no thumbnail
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def read_members(storage: Storage, wanted: dict[str, set[str]],
                 allowed: Callable[[str], bool] | None = None) -> dict[tuple[str, str], bytes]:
    """``(shard, member) -> bytes`` of the wanted members of each input shard (one streaming pass each).
    A shard ``allowed`` refuses is not read (its thumbnails are missing). The input is the job owner's:
    long-name and pax headers over ``EMBEDJOB_MAX_TAR_HEADER_BYTES`` are skipped unread, and a member
    over ``MAX_MEMBER_BYTES`` is not read (no thumbnail), as the worker's tar reader does."""
    found: dict[tuple[str, str], bytes] = {}
    limit = settings.load().max_tar_header_bytes
    for shard, members in sorted(wanted.items()):
        if allowed is not None and not allowed(shard):
            continue
        try:
            with (storage.open_read(shard) as f,
                  tarfile.open(fileobj=f, mode="r|*", tarinfo=bounded_tarinfo(limit, [])) as tar):
                for info in tar:
                    if (info.isfile() and info.name in members and not getattr(info, "refused", None)
                            and info.size <= MAX_MEMBER_BYTES):
                        data = tar.extractfile(info)
                        if data is not None:
                            found[(shard, info.name)] = data.read()
                    if all((shard, m) in found for m in members):
                        break
        except Exception:  # noqa: BLE001 - an input that is gone or unreadable: its thumbnails are missing
            continue
    return found


def collect(output_uri: str, storage: Storage) -> dict[str, Any]:
    """Everything the page shows from the shards' manifests, and pass 1 of each score column
    (``scores``: name -> :class:`~embedjob.report_scores.ScoreStats`; memory bounded whatever the
    output's size)."""
    stems = sorted(done_stems(output_uri, storage))
    job = _job_manifest(output_uri, storage)
    reasons: Counter[str] = Counter()
    images = failed = 0
    models = []
    seconds = 0.0
    heads: dict[str, Any] = {}
    scores: dict[str, ScoreStats] = {}

    def read(stem: str) -> tuple[dict[str, Any], dict[str, Any], Any] | None:
        try:  # the output is the job owner's to write: only what a worker writes is shown
            m = read_manifest(output_uri, stem, storage)
            record = shard_record(m)
        except ManifestUnreadable as e:
            log.warning("report: %s: %s", stem, e)
            return None
        return m, record, _score_columns_or_none(storage, output_uri, stem)

    for n, shard in enumerate(in_order(read, stems, READ_THREADS)):
        if shard is None:
            continue
        m, record, table = shard
        images += record["images"]
        failed += record["failedImages"]
        for f in _list(m.get("failed")):
            reasons[_reason_kind(str(f.get("reason", "")) if isinstance(f, dict) else "")] += 1
        if record["tarError"]:
            reasons["truncated or unreadable tar"] += 1
        models.append(record["model"])
        heads.update(_dict(m.get("scores")))
        seconds += _number(_dict(m.get("timings")).get("total"))
        for c in table.column_names if table is not None else ():
            stats = scores.setdefault(c, ScoreStats(c, THUMBS_PER_QUANTILE))
            stats.add(table.column(c).to_numpy(zero_copy_only=False), n)
    timings, totals = _dict(job.get("timings")), _dict(job.get("totals"))
    return {
        "output": output_uri,
        "job": job.get("job"),
        "totals": {"images": images, "failedImages": failed, "shards": int(_number(totals.get("shards")) or len(stems)),
                   "shardsDone": len(stems), "shardsFailed": int(_number(totals.get("failed")))},
        "failedByReason": dict(reasons.most_common()),
        "model": model_provenance(models),
        "heads": heads,
        "throughput": {"imagesPerSecond": timings.get("imagesPerSecond"), "seconds": timings.get("seconds"),
                       "shardSeconds": round(seconds, 3)},
        "summaries": job.get("scores") or {},
        "stems": stems,
        "scores": scores,
    }


def score_bins(output_uri: str, storage: Storage, stems: list[str], scores: dict[str, ScoreStats],
               ) -> dict[str, ScoreBins]:
    """Pass 2 of each score column (the histogram, the slider's counts, the median's thumbnails)."""
    bins = {name: ScoreBins(stats) for name, stats in scores.items()}

    def read(stem: str) -> Any:
        return _score_columns_or_none(storage, output_uri, stem)

    for n, table in enumerate(in_order(read, stems, READ_THREADS)):
        for c in table.column_names if table is not None else ():
            if c in bins:
                bins[c].add(table.column(c).to_numpy(zero_copy_only=False), n)
    return bins


def _score_columns_or_none(storage: Storage, output_uri: str, stem: str) -> Any:
    try:
        return _score_columns(storage, shard_outputs(output_uri, stem).metadata)
    except ValueError as e:  # too large, too many rows, not parquet (pyarrow's errors are ValueErrors)
        log.warning("report: %s: scores not read: %s", stem, e)
        return None


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def _number(x: Any) -> float:
    """A finite number, else 0 (fields of files the job owner can write)."""
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else 0.0


def _job_manifest(output_uri: str, storage: Storage) -> dict[str, Any]:
    """``_job.json`` read in bounded memory ({} when it is absent or not what the operator writes): the
    page then shows what the shards' manifests say."""
    uri = job_manifest_uri(output_uri)
    if not storage.exists(uri):
        return {}
    try:
        limit = 4 * settings.load().max_manifest_bytes
        return read_json_object(storage, uri, limit, max_values=16 * MAX_MANIFEST_VALUES)
    except ManifestUnreadable as e:
        log.warning("report: %s", e)
        return {}


def _metadata(storage: Storage, uri: str) -> Any:
    """One shard's metadata as a ``pyarrow.parquet.ParquetFile``, in bounded memory: the file is at most
    ``MAX_METADATA_FILE_BYTES`` and holds at most ``MAX_METADATA_ROWS`` rows (a small file may
    decompress to many rows), else ValueError. The output is the job owner's to write."""
    import pyarrow.parquet as pq

    with storage.open_read(uri) as f:
        data = f.read(MAX_METADATA_FILE_BYTES + 1)
    if len(data) > MAX_METADATA_FILE_BYTES:
        raise ValueError(f"{uri}: more than {MAX_METADATA_FILE_BYTES} bytes: not read")
    parquet = pq.ParquetFile(io.BytesIO(data))
    if parquet.metadata.num_rows > MAX_METADATA_ROWS:
        raise ValueError(f"{uri}: more than {MAX_METADATA_ROWS} rows: not read")
    return parquet


def _score_columns(storage: Storage, uri: str) -> Any:
    """The score columns of one shard's metadata (a pyarrow Table), or None when it has none."""
    parquet = _metadata(storage, uri)
    present = [c for c in SCORE_COLUMNS if c in parquet.schema_arrow.names]
    return parquet.read(columns=present) if present else None


def _reason_kind(reason: str) -> str:
    """A failure reason without its per-image details (sizes, offsets), so like failures group."""
    head = reason.split(":", 1)[0].strip()
    return head[:80] or "unknown"


def _locate(output_uri: str, storage: Storage, picked: set[tuple[str, int]]) -> dict[tuple[str, int], tuple]:
    """``(stem, row) -> (key, shard, member)`` of the picked rows (only their shards' metadata is read)."""
    out: dict[tuple[str, int], tuple] = {}
    for stem in sorted({s for s, _ in picked}):
        try:
            parquet = _metadata(storage, shard_outputs(output_uri, stem).metadata)
            table = parquet.read(columns=["key", "shard", "member"])
        except (ValueError, KeyError) as e:  # changed since its scores were read: no thumbnails from it
            log.warning("report: %s: thumbnails not located: %s", stem, e)
            continue
        for s, row in picked:
            if s == stem and row < table.num_rows:
                out[(s, row)] = tuple(table.column(c)[row].as_py() for c in ("key", "shard", "member"))
    return out


def thumbnails(output_uri: str, storage: Storage, stems: list[str], picks: dict[str, Picks],
               allowed: Callable[[str], bool] | None = None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """For each score, its picked samples (``THUMBS_PER_QUANTILE`` at its lowest, median and highest
    values) with their thumbnails, read from the input shards ``allowed`` accepts (the shard URIs come
    from the output's metadata)."""
    picks = {name: {g: [(v, (stems[i], row)) for v, i, row in items] for g, items in groups.items()}
             for name, groups in picks.items()}
    where = _locate(output_uri, storage, {at for groups in picks.values() for items in groups.values()
                                          for _, at in items})
    wanted: dict[str, set[str]] = {}
    for _key, shard, member in where.values():
        wanted.setdefault(shard, set()).add(member)
    data = read_members(storage, wanted, allowed)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, groups in picks.items():
        out[name] = {}
        for g, items in groups.items():
            out[name][g] = []
            for v, (stem, row) in items:
                if (stem, row) not in where:  # its metadata could not be read again
                    continue
                key, shard, member = where[(stem, row)]
                out[name][g].append({"value": v, "key": key, "member": member, "stem": stem,
                                     "src": _thumbnail(data[(shard, member)]) if (shard, member) in data else None})
    return out


def build_report(output_uri: str, storage: Storage | None = None,
                 allowed_shards: Callable[[str], bool] | None = None) -> str:
    """The report page of the job output at ``output_uri``, as one HTML string. ``allowed_shards``: the
    input shards thumbnails may be read from (None: any the storage can read)."""
    storage = storage or Storage()
    data = collect(output_uri, storage)
    if not data["totals"]["shardsDone"]:
        raise FileNotFoundError(f"no finished shards under {output_uri!r}")
    bins = score_bins(output_uri, storage, data["stems"], data["scores"])
    page = {k: v for k, v in data.items() if k not in ("scores", "stems")}
    page["panels"] = {name: {**b.panel(), "keepAbove": KEEP_ABOVE.get(name, True)} for name, b in bins.items()}
    page["thumbnails"] = thumbnails(output_uri, storage, data["stems"], {n: b.picks() for n, b in bins.items()},
                                    allowed_shards)
    return render(page)


def write_report(output_uri: str, storage: Storage, allowed_shards: Callable[[str], bool] | None = None) -> str:
    """Build the page and write it as ``report.html`` under the output (atomically). Returns its URI."""
    uri = report_uri(output_uri)
    page = build_report(output_uri, storage, allowed_shards)
    storage.put_atomic(uri, page.encode(), tmp_root=tmp_root(output_uri))
    return uri
