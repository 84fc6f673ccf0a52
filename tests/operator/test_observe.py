"""Observing and finishing a job (embedjob.operator.observe): counts from Redis, the job manifest."""

from __future__ import annotations

import json

from embedjob.layout import job_manifest_uri
from embedjob.operator import status as st
from embedjob.operator.events import JobMemory
from embedjob.operator.observe import observe
from embedjob.storage import Storage
from tests.operator.jobs import is_true, raw_spec, started, worker_finishes


def test_failed_shard_within_max_failed_shards_still_succeeds_with_job_manifest(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=3, maxFailedShards=1, retries={"perShard": 0, "backoffSeconds": 0})
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    worker_finishes(store, "0000", 4, failed=1)
    worker_finishes(store, "0001", 6)
    store.set_state("0002", "failed", error="ValueError: not a tar")
    res = rec.tick(spec, status, 1)
    assert res.status["phase"] == "Succeeded" and res.status["progress"] == "2/3"
    images = res.status["images"]
    assert (images["embedded"], images["failed"]) == (10, 1) and res.status["shards"]["failed"] == 1
    assert is_true(res.status["conditions"], "Complete")
    manifest = json.loads(Storage().read_bytes(job_manifest_uri(f"s3://{bucket}/out/")))
    assert manifest["totals"]["images"] == 10 and manifest["totals"]["failed"] == 1
    assert [s["stem"] for s in manifest["shards"]] == ["0000", "0001", "0002"]
    # finished: a later tick patches nothing; the TTL deletes it
    assert st.status_patch(res.status, rec.tick(spec, res.status, 1).status) == {}
    spec["ttlSecondsAfterFinished"] = 0
    assert rec.tick(spec, res.status, 1).delete


def test_observe_puts_every_planned_shard_in_one_bucket_with_the_totals(env):
    r, app, store, bucket = env
    plan = [(s, f"s3://{bucket}/in/{s}.tar") for s in ("0000", "0001", "0002", "0003", "0004")]
    worker_finishes(store, "0000", 7, failed=2)
    store.set_state("0001", "running", imagesSoFar=3)
    store.set_state("0002", "failed", error="x")  # counted, retry due: still queued
    store.set_state("0003", "failed", error="ValueError: bad")
    store.count_total("failures", 2)
    store.count_total("leaseExpiries")
    store.count_total("messagesLost")
    failed_infos = {"0002": {"final": False}, "0003": {"final": True, "failures": 2, "error": "ValueError: bad"}}
    obs = observe(store, JobMemory(), plan, store.states(), failed_infos)
    assert (obs.total, obs.succeeded, obs.running, obs.failed, obs.queued) == (5, 1, 1, 1, 2)
    assert (obs.images, obs.failed_images, obs.images_in_flight) == (7, 2, 3)
    assert obs.failed_shards == [st.FailedShard(stem="0003", shard=f"s3://{bucket}/in/0003.tar", attempts=2,
                                                error="ValueError: bad")]
    assert (obs.failures, obs.transient_failures, obs.lease_expiries, obs.messages_lost) == (2, 0, 1, 1)


def test_a_job_with_score_heads_gets_their_summaries_from_the_shard_sketches(env):
    """status.scores and _job.json's scores merge the sketches the shard manifests carry."""
    import numpy as np

    from embedjob.layout import shard_outputs
    from embedjob.sketch import QuantileSketch

    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2, scores={"aesthetic": {"name": "laion/aesthetic", "revision": "r1"}})
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    values = {"0000": np.linspace(1.0, 5.0, 300), "0001": np.linspace(5.0, 9.0, 100)}
    for stem, v in values.items():
        manifest = {"counts": {"embedded": v.size, "failed": 0},
                    "score_sketches": {"aesthetic": QuantileSketch.of(v).to_json()}}
        Storage().put_atomic(shard_outputs(f"s3://{bucket}/out/", stem).manifest, json.dumps(manifest).encode())
        worker_finishes(store, stem, v.size)
    res = rec.tick(spec, status, 1)
    assert res.status["phase"] == "Succeeded"
    every = np.concatenate(list(values.values()))
    summary = res.status["scores"]["aesthetic"]
    assert summary["count"] == 400 and summary["mean"] == round(float(every.mean()), 6)
    for name, q in (("p1", 0.01), ("p50", 0.5), ("p99", 0.99)):
        assert abs(np.searchsorted(np.sort(every), summary[name], side="right") / every.size - q) <= 0.01
    job = json.loads(Storage().read_bytes(job_manifest_uri(f"s3://{bucket}/out/")))
    assert job["scores"] == res.status["scores"]


def test_output_report_sends_one_report_task_and_links_it_in_the_status(env):
    from embedjob.contract import REPORT_TASK_NAME, report_task_id
    from tests.operator.jobs import QUEUE

    r, app, store, bucket = env
    spec = raw_spec(bucket, n=1, output={"uri": f"s3://{bucket}/out/", "report": True})
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    r.delete(QUEUE)  # the shard's own message: the test plays the worker
    worker_finishes(store, "0000", 3)
    res = rec.tick(spec, status, 1)
    assert res.status["phase"] == "Succeeded"
    assert res.status["report"]["uri"] == f"s3://{bucket}/out/report.html"
    assert res.status["report"]["state"] == "Requested"
    messages = [json.loads(m) for m in r.lrange(QUEUE, 0, -1)]
    assert [(m["headers"]["task"], m["headers"]["id"]) for m in messages] == [
        (REPORT_TASK_NAME, report_task_id(store.job))]

    # The job is finished; its status follows the report task's outcome once a worker records it.
    finished = res.status
    assert rec.tick(spec, finished, 1).status["report"]["state"] == "Requested"  # not yet written
    store.record_report("Written", uri=f"s3://{bucket}/out/report.html")
    done = rec.tick(spec, finished, 1)
    assert done.status["report"]["state"] == "Written" and done.status["phase"] == "Succeeded"
    assert [e.reason for e in done.events] == ["ReportWritten"]
    assert rec.tick(spec, done.status, 1).events == []  # said once
    store.record_report("Failed", error="OSError: no space left")
    failed = rec.tick(spec, finished, 1).status["report"]
    assert failed["state"] == "Failed" and "no space left" in failed["message"]


def test_no_report_unless_asked(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=1)
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    worker_finishes(store, "0000", 3)
    res = rec.tick(spec, status, 1)
    assert res.status["phase"] == "Succeeded" and "report" not in res.status


def test_the_done_table_keeps_its_sums_as_shards_come_go_and_are_replaced():
    """observe() reads the sums, not the rows: they must equal a recount after any sequence of changes."""
    from embedjob.operator.events import DoneInfo, DoneTable

    table = DoneTable()
    table.update([("a", DoneInfo(5, 1)), ("b", DoneInfo(7, 0, "truncated", True)), ("c", DoneInfo(2, 2))])
    table["a"] = DoneInfo(6, 0, "cut")  # replaced (a lease check read its manifest)
    table.pop("c")  # (its manifest was gone)
    table.pop("missing")
    rows = {"a": DoneInfo(6, 0, "cut"), "b": DoneInfo(7, 0, "truncated", True)}
    assert len(table) == 2 and "c" not in table and table.get("c").images == 0
    assert (table.images, table.failed_images, table.images_this_run) == (13, 0, 6)
    assert table.truncated == {stem: i.tar_error for stem, i in rows.items()}
    table.clear()
    assert (len(table), table.images, table.truncated) == (0, 0, {})
