"""Accepting a job (embedjob.operator.accept): validation, the plan recorded in Redis before anything is
enqueued, and plan failures named in the status."""

from __future__ import annotations

import datetime as dt
import json

from embedjob.contract import task_id
from embedjob.operator import status as st
from embedjob.operator.accept import accept
from embedjob.operator.events import JobMemory
from embedjob.operator.reconcile import Reconciler
from tests.operator.jobs import QUEUE, queued_ids, raw_spec, started, write_manifest


def test_invalid_spec_fails_naming_the_field(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket)
    spec["output"] = {"uri": f"s3://{bucket}/in/emb/"}
    acc = accept(store, spec, {}, 1)
    assert not acc.ok and acc.status["phase"] == "Failed"
    cond = st.get_condition(acc.status["conditions"], "Failed")
    assert cond["status"] == "True" and cond["reason"] == "InvalidSpec" and "spec.output.uri" in cond["message"]
    assert r.get(store.key("plan")) is None and queued_ids(r) == []


def test_plan_recorded_then_enqueue_once_with_deterministic_ids(env):
    r, app, store, bucket = env
    write_manifest(bucket, "0001", embedded=7, failed=1)  # finished before: counted, not redone
    status, rec = started(r, app, store, raw_spec(bucket))
    assert status["plan"]["total"] == 4 and status["plan"]["doneAtStart"] == 1
    assert status["progress"] == "1/4" and queued_ids(r) == []  # nothing enqueued before the plan is stored

    res = rec.tick(raw_spec(bucket), status, 1)
    ids = queued_ids(r)
    assert sorted(ids) == sorted(task_id(store.job, s, 1) for s in ("0000", "0002", "0003"))
    images = res.status["images"]
    assert res.status["phase"] == "Running" and (images["embedded"], images["failed"]) == (7, 1)
    assert res.status["shards"] == {"total": 4, "queued": 3, "running": 0, "succeeded": 1, "failed": 0}
    assert store.states() == {"0000": "queued", "0001": "succeeded", "0002": "queued", "0003": "queued"}
    msg = json.loads(r.lrange(QUEUE, 0, 0)[0])
    assert "secret" not in json.dumps(msg).lower() and "AWS" not in json.dumps(msg)

    # Idempotent: a second tick (and a second operator with empty memory) sends nothing more.
    rec.tick(raw_spec(bucket), res.status, 1)
    Reconciler(store, app, JobMemory()).tick(raw_spec(bucket), res.status, 1)
    assert len(queued_ids(r)) == 3


def test_accept_time_is_rfc3339(env):
    r, app, store, bucket = env
    now = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    acc = accept(store, raw_spec(bucket), {}, 4, now=now)
    assert acc.status["startTime"] == "2026-05-01T00:00:00Z" and acc.status["observedGeneration"] == 4


def test_missing_bucket_fails_the_plan_with_a_clear_message(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket)
    spec["input"] = {"uri": "s3://no-such-bucket-e2e/in/"}
    acc = accept(store, spec, {}, 1)
    assert not acc.ok
    cond = st.get_condition(acc.status["conditions"], "Failed")
    assert cond["reason"] == "PlanFailed" and "bucket does not exist" in cond["message"]


def test_missing_output_bucket_names_the_field_and_the_bucket(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket)
    spec["output"] = {"uri": "s3://no-such-output-bucket/emb/"}
    acc = accept(store, spec, {}, 1)
    cond = st.get_condition(acc.status["conditions"], "Failed")
    assert not acc.ok and cond["reason"] == "PlanFailed"
    assert cond["message"].startswith("spec.output.uri: bucket does not exist: ListObjectsV2 "
                                      "s3://no-such-output-bucket/emb/")
    spec = raw_spec(bucket)
    spec["input"] = {"uri": "s3://no-such-input-bucket/in/"}
    cond = st.get_condition(accept(store, spec, {}, 1).status["conditions"], "Failed")
    assert cond["message"].startswith("spec.input.uri: bucket does not exist: ") and "no-such-input-bucket" in \
        cond["message"]


def test_accept_records_spec_done_shards_and_plan_in_redis(env):
    r, app, store, bucket = env
    write_manifest(bucket, "0002", embedded=5, failed=1)
    spec = raw_spec(bucket, n=3)
    acc = accept(store, spec, {}, 1)
    assert acc.ok and acc.status["plan"]["doneAtStart"] == 1
    assert store.accepted_spec() == spec
    assert store.plan() == [(s, f"s3://{bucket}/in/{s}.tar") for s in ("0000", "0001", "0002")]
    assert store.states() == {"0002": "succeeded"}  # the rest are sent by the first tick, not here
    # Its counts are read by the ticks (embedjob.operator.done_before), not before the plan is recorded.
    assert store.info("0002") == {"doneBefore": True, "countsPending": True, "updated": store.info("0002")["updated"]}
    assert acc.status["images"] == {"embedded": 0, "failed": 0, "soFar": 0, "embeddedThisRun": 0, "countsPending": 1}
    assert queued_ids(r) == []
    Reconciler(store, app, JobMemory()).tick(spec, acc.status, 1)
    info = store.info("0002")
    assert (info["images"], info["failedImages"], info["fromManifest"], info["doneBefore"]) == (5, 1, True, True)
    assert not info["countsPending"]
