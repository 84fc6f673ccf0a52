"""A job run again over a finished output (embedjob.operator.done_before): accept reads the output's
listing only, and the ticks read the found-done shards' manifests a slice at a time, so the job starts
at once however many are done; it finishes only when every count is read, so ``status.images`` and
``_job.json`` are exact. Real Redis and SeaweedFS (tests/operator/conftest.py)."""

from __future__ import annotations

import json

import pytest

from embedjob import results
from embedjob.contract import task_id
from embedjob.layout import job_manifest_uri, shard_outputs
from embedjob.operator import done_before
from embedjob.operator import status as st
from embedjob.operator.events import JobMemory
from embedjob.operator.reconcile import Reconciler
from embedjob.settings import Settings
from embedjob.storage import Storage, StorageError
from tests.operator.jobs import queued_ids, raw_spec, started, worker_finishes, write_manifest


@pytest.fixture()
def reads(monkeypatch):
    """The manifests read for their counts (embedjob.operator.done_before), two a tick; ``reads.all``:
    every manifest read, whoever reads it."""
    seen = Reads()
    real_records, real_manifest = done_before.read_shard_records, results.read_manifest

    def records(output_uri, stems, storage=None, threads=16, **kw):
        seen.extend(stems)
        return real_records(output_uri, stems, storage, threads, **kw)

    def manifest(output_uri, stem, storage=None, max_bytes=None):
        seen.all.append(stem)
        return real_manifest(output_uri, stem, storage, max_bytes)

    monkeypatch.setattr(done_before, "read_shard_records", records)
    monkeypatch.setattr(results, "read_manifest", manifest)
    monkeypatch.setattr(done_before, "CHUNK", 2)
    monkeypatch.setattr(done_before, "READ_SECONDS", 0.0)
    return seen


class Reads(list):
    def __init__(self) -> None:
        super().__init__()
        self.all: list[str] = []


def _finished_output(bucket: str, stems: list[str]) -> dict[str, tuple[int, int]]:
    counts = {stem: (10 + i, i % 3) for i, stem in enumerate(stems)}
    for stem, (images, failed) in counts.items():
        write_manifest(bucket, stem, images, failed)
    return counts


def test_accept_reads_no_manifest_and_the_ticks_count_the_done_shards_a_slice_at_a_time(env, reads):
    r, app, store, bucket = env
    counts = _finished_output(bucket, [f"{i:04d}" for i in range(5)])  # 5 of 8 done
    spec = raw_spec(bucket, n=8)
    status, rec = started(r, app, store, spec)
    assert reads.all == []
    assert status["shards"]["succeeded"] == 5 and status["images"]["countsPending"] == 5
    assert status["images"]["embedded"] == 0 and status["phase"] == "Pending"

    res = rec.tick(spec, status, 1)  # sends the rest at once, and reads two manifests
    assert sorted(queued_ids(r)) == sorted(task_id(store.job, f"{i:04d}", 1) for i in (5, 6, 7))
    assert len(reads) == 2 and res.status["images"]["countsPending"] == 3
    assert res.status["images"]["embedded"] == sum(counts[s][0] for s in sorted(reads))
    seen = []
    while res.status["images"]["countsPending"]:
        seen.append(res.status["images"]["countsPending"])
        res = rec.tick(spec, res.status, 1)
    assert seen == [3, 1]
    assert sorted(reads) == sorted(counts) == sorted(reads.all)  # each once, by this step only
    images = res.status["images"]
    assert (images["embedded"], images["failed"]) == (sum(c[0] for c in counts.values()),
                                                     sum(c[1] for c in counts.values()))
    assert images["embeddedThisRun"] == 0 and res.status["imagesPerSecond"] == 0.0  # none of it is this run's


def test_a_job_over_a_finished_output_succeeds_only_once_every_count_is_read(env, reads):
    r, app, store, bucket = env
    counts = _finished_output(bucket, [f"{i:04d}" for i in range(5)])
    spec = raw_spec(bucket, n=5)
    status, rec = started(r, app, store, spec)
    phases = []
    for _ in range(10):
        res = rec.tick(spec, status, 1)
        status = res.status
        phases.append(status["phase"])
        if status["phase"] == "Succeeded":
            break
        complete = st.get_condition(status["conditions"], "Complete")
        assert complete["status"] == "False" and complete["reason"] == "InProgress"
        assert "5/5 shards done; reading the counts of" in complete["message"]
        assert not Storage().exists(job_manifest_uri(f"s3://{bucket}/out/"))
    assert phases == ["Running", "Running", "Succeeded"]
    assert status["images"]["embedded"] == sum(c[0] for c in counts.values()) and status["imagesPerSecond"] == 0.0
    job = json.loads(Storage().read_bytes(job_manifest_uri(f"s3://{bucket}/out/")))
    assert {s["stem"]: (s["images"], s["failedImages"], s["previousRun"]) for s in job["shards"]} == {
        stem: (*c, True) for stem, c in counts.items()}
    assert job["totals"]["images"] == status["images"]["embedded"] and job["totals"]["imagesThisRun"] == 0
    assert queued_ids(r) == []


def test_a_new_operator_goes_on_counting_from_redis_and_reads_each_manifest_once(env, reads):
    r, app, store, bucket = env
    counts = _finished_output(bucket, [f"{i:04d}" for i in range(7)])
    spec = raw_spec(bucket, n=8)
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    assert status["images"]["countsPending"] == 5
    other = Reconciler(store, app, JobMemory(), Settings(min_queued=10_000))  # the operator restarted
    status = other.tick(spec, status, 1).status
    assert status["images"]["countsPending"] == 3
    while status["images"]["countsPending"]:
        status = other.tick(spec, status, 1).status
    assert sorted(reads) == sorted(counts)
    worker_finishes(store, "0007", 4)
    status = other.tick(spec, status, 1).status
    assert status["phase"] == "Succeeded"
    assert status["images"]["embedded"] == sum(c[0] for c in counts.values()) + 4
    assert status["images"]["embeddedThisRun"] == 4


def test_a_manifest_gone_since_planning_is_embedded_again(env, reads):
    r, app, store, bucket = env
    _finished_output(bucket, ["0000", "0001"])
    spec = raw_spec(bucket, n=3)
    status, rec = started(r, app, store, spec)
    Storage().delete(shard_outputs(f"s3://{bucket}/out/", "0001").manifest)
    res = rec.tick(spec, status, 1)
    assert queued_ids(r) == [task_id(store.job, "0002", 1)]  # sent before the manifests were read
    assert store.states() == {"0000": "succeeded", "0001": "queued", "0002": "queued"}
    assert res.status["shards"]["succeeded"] == 1 and res.status["images"]["embedded"] == 10
    gone = [e for e in res.events if e.reason == "ManifestGone"]
    assert len(gone) == 1 and "0001" in gone[0].message
    res = rec.tick(spec, res.status, 1)  # the next tick sends it
    assert sorted(queued_ids(r)) == sorted(task_id(store.job, s, 1) for s in ("0001", "0002"))
    assert not [e for e in res.events if e.reason == "MessageLost"]
    worker_finishes(store, "0001", 6)
    worker_finishes(store, "0002", 3)
    res = rec.tick(spec, res.status, 1)
    assert res.status["phase"] == "Succeeded" and res.status["images"]["embedded"] == 19
    assert res.status["images"]["embeddedThisRun"] == 9


def test_a_storage_outage_while_counting_leaves_the_counts_pending_and_the_tick_goes_on(env, reads, monkeypatch):
    r, app, store, bucket = env
    counts = _finished_output(bucket, ["0000", "0001"])
    spec = raw_spec(bucket, n=3)
    status, rec = started(r, app, store, spec)
    real = results.read_manifest

    def down(output_uri, stem, storage=None, max_bytes=None):
        raise StorageError("GetObject", output_uri + stem, "ConnectionRefused", "down", transient=True)

    monkeypatch.setattr(results, "read_manifest", down)
    res = rec.tick(spec, status, 1)
    assert queued_ids(r) == [task_id(store.job, "0002", 1)]  # the rest was still sent
    assert res.status["images"]["countsPending"] == 2 and store.state("0000") == "succeeded"
    monkeypatch.setattr(results, "read_manifest", real)
    worker_finishes(store, "0002", 1)
    res = rec.tick(spec, res.status, 1)
    assert res.status["phase"] == "Succeeded"
    assert res.status["images"]["embedded"] == sum(c[0] for c in counts.values()) + 1


def test_jobs_beyond_the_readers_allowed_at_once_read_on_a_later_tick(env, reads):
    """The operator is shared: while ``READERS`` jobs are reading, another one's tick reads nothing
    (and still sends its work); it reads once a reader is free."""
    r, app, store, bucket = env
    _finished_output(bucket, ["0000", "0001"])
    spec = raw_spec(bucket, n=3)
    status, rec = started(r, app, store, spec)
    held = 0
    while done_before.READERS.acquire(blocking=False):
        held += 1
    try:
        res = rec.tick(spec, status, 1)
    finally:
        for _ in range(held):
            done_before.READERS.release()
    assert held == 2 and reads == [] and res.status["images"]["countsPending"] == 2
    assert queued_ids(r) == [task_id(store.job, "0002", 1)]
    res = rec.tick(spec, res.status, 1)
    assert sorted(reads) == ["0000", "0001"] and res.status["images"]["countsPending"] == 0


def test_a_forged_status_neither_skips_the_counting_nor_sticks(env, reads):
    """The status is the job owner's to patch: a forged countsPending of 0 (or of 10**12), images and
    shards counts are replaced by the next tick's, which still reads the manifests before finishing."""
    r, app, store, bucket = env
    counts = _finished_output(bucket, [f"{i:04d}" for i in range(5)])
    spec = raw_spec(bucket, n=5)
    status, rec = started(r, app, store, spec)
    for forged in (0, 10**12):
        status = {**status, "images": {"embedded": 10**15, "failed": -1, "soFar": 0, "embeddedThisRun": 10**15,
                                       "countsPending": forged},
                  "shards": {"total": 5, "queued": 0, "running": 0, "succeeded": 5, "failed": 0}}
        status = rec.tick(spec, status, 1).status
        assert status["phase"] == "Running" and status["images"]["embeddedThisRun"] == 0
        assert status["images"]["countsPending"] == 5 - len(reads) and status["images"]["embedded"] < 100
    status = rec.tick(spec, status, 1).status
    assert status["phase"] == "Succeeded" and status["images"]["countsPending"] == 0
    assert status["images"]["embedded"] == sum(c[0] for c in counts.values())
