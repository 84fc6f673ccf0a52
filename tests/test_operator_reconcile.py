"""The operator's reconcile functions against REAL Redis (broker + progress) and SeaweedFS S3, without
kopf or workers: the test plays the worker's part by writing shard states as the worker task does."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
import uuid

import pytest

from embedjob.broker import make_app
from embedjob.contract import task_id
from embedjob.layout import job_manifest_uri, shard_outputs
from embedjob.operator import status as st
from embedjob.operator.reconcile import JobMemory, Reconciler, accept, cleanup
from embedjob.progress import ProgressStore, redis_client
from embedjob.settings import Settings
from embedjob.storage import Storage

QUEUE = "embedjob-unit"


@pytest.fixture()
def env(redis_url, bucket):
    r = redis_client(redis_url)
    app = make_app(redis_url)
    job = str(uuid.uuid4())
    yield r, app, ProgressStore(r, job), bucket
    r.close()


def raw_spec(bucket: str, n: int = 4, **extra) -> dict:
    spec = {
        "input": {"uri": f"s3://{bucket}/in/{{0000..{n - 1:04d}}}.tar"},
        "output": {"uri": f"s3://{bucket}/out/"},
        "queue": QUEUE,
        "retries": {"perShard": 1, "backoffSeconds": 0},
    }
    spec.update(extra)
    return spec


def queued_ids(r) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in r.lrange(QUEUE, 0, -1)]


def write_manifest(bucket: str, stem: str, embedded: int, failed: int = 0) -> None:
    Storage().put_atomic(shard_outputs(f"s3://{bucket}/out/", stem).manifest,
                         json.dumps({"counts": {"embedded": embedded, "failed": failed}}).encode())


def worker_finishes(store: ProgressStore, stem: str, images: int, failed: int = 0) -> None:
    store.set_state(stem, "succeeded", images=images, failedImages=failed)


def started(r, app, store, spec: dict, **settings):
    acc = accept(store, spec, {}, 1)
    assert acc.ok, acc.status
    # One job and no real worker (the test plays the workers): the fair share's floor is lifted, so
    # dispatch is bounded by max_queued and parallelism only (fair dispatch: tests/test_fair_dispatch.py).
    rec = Reconciler(store, app, JobMemory(), Settings(**{"min_queued": 10_000, **settings}))
    return acc.status, rec


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
    assert res.status["phase"] == "Running" and res.status["images"] == {"embedded": 7, "failed": 1}
    assert res.status["shards"] == {"total": 4, "queued": 3, "running": 0, "succeeded": 1, "failed": 0}
    assert store.states() == {"0000": "queued", "0001": "succeeded", "0002": "queued", "0003": "queued"}
    msg = json.loads(r.lrange(QUEUE, 0, 0)[0])
    assert "secret" not in json.dumps(msg).lower() and "AWS" not in json.dumps(msg)

    # Idempotent: a second tick (and a second operator with empty memory) sends nothing more.
    rec.tick(raw_spec(bucket), res.status, 1)
    Reconciler(store, app, JobMemory()).tick(raw_spec(bucket), res.status, 1)
    assert len(queued_ids(r)) == 3


def test_restart_mid_enqueue_resends_pending_under_the_same_id(env):
    r, app, store, bucket = env
    status, rec = started(r, app, store, raw_spec(bucket, n=2))
    # The previous operator wrote the intent for 0000 and died before (or after) sending it.
    store.set_state("0000", "pending", dispatch=1)
    res = Reconciler(store, app, JobMemory()).tick(raw_spec(bucket, n=2), status, 1)
    assert sorted(queued_ids(r)) == sorted([task_id(store.job, "0000", 1), task_id(store.job, "0001", 1)])
    assert store.states() == {"0000": "queued", "0001": "queued"}
    assert res.status["shards"]["queued"] == 2


def test_parallelism_limits_shards_in_flight(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=5, parallelism=2)
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    assert len(queued_ids(r)) == 2
    r.delete(QUEUE)
    store.set_state("0000", "running")
    store.acquire_lease("0000", "w1", ttl=30)
    worker_finishes(store, "0001", 3)
    status = rec.tick(spec, status, 1).status
    assert queued_ids(r) == [task_id(store.job, "0002", 1)]
    assert status["shards"] == {"total": 5, "queued": 3, "running": 1, "succeeded": 1, "failed": 0}


def test_failures_retry_with_backoff_then_fail_the_job(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2)
    spec["retries"] = {"perShard": 2, "backoffSeconds": 1}
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    worker_finishes(store, "0001", 5)
    for attempt in (1, 2, 3):
        store.set_state("0000", "failed", error="OSError: bad shard", attempt=attempt)
        res = rec.tick(spec, status, 1)
        status = res.status
        if attempt <= 2:
            assert store.info("0000")["failures"] == attempt and status["phase"] == "Running"
            assert store.state("0000") == "failed"  # waiting for its backoff
            time.sleep(1.05 * 2 ** (attempt - 1))
            status = rec.tick(spec, status, 1).status
            assert store.state("0000") == "queued"
            assert task_id(store.job, "0000", attempt + 1) in queued_ids(r)
    assert status["phase"] == "Failed"
    assert status["failedShards"] == [{"stem": "0000", "shard": f"s3://{bucket}/in/0000.tar", "attempts": 3,
                                       "error": "OSError: bad shard"}]
    assert status["attempts"]["failures"] == 3
    assert st.get_condition(status["conditions"], "Failed")["reason"] == "TooManyFailedShards"
    assert any(e.reason == "ShardFailed" for e in res.events) and any(e.reason == "Failed" for e in res.events)
    assert store.control() == "suspended"


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
    assert res.status["images"] == {"embedded": 10, "failed": 1} and res.status["shards"]["failed"] == 1
    assert st.is_true(res.status["conditions"], "Complete")
    manifest = json.loads(Storage().read_bytes(job_manifest_uri(f"s3://{bucket}/out/")))
    assert manifest["totals"]["images"] == 10 and manifest["totals"]["failed"] == 1
    assert [s["stem"] for s in manifest["shards"]] == ["0000", "0001", "0002"]
    # finished: a later tick patches nothing; the TTL deletes it
    assert st.status_patch(res.status, rec.tick(spec, res.status, 1).status) == {}
    spec["ttlSecondsAfterFinished"] = 0
    assert rec.tick(spec, res.status, 1).delete


def test_lease_expiry_redispatches_without_consuming_a_retry(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2)
    status, rec = started(r, app, store, spec, lease_seconds=2)  # expiry grace: 1 s
    status = rec.tick(spec, status, 1).status
    store.acquire_lease("0000", "dead-worker", ttl=0.2)
    store.set_state("0000", "running", attempt=1)
    status = rec.tick(spec, status, 1).status
    assert store.state("0000") == "running"  # lease alive: left alone
    time.sleep(0.3)
    status = rec.tick(spec, status, 1).status
    assert store.state("0000") == "running"  # no lease, but within the grace period
    # a worker that released its lease and then records success is never overwritten
    store.set_state("0001", "running")
    rec.tick(spec, status, 1)
    worker_finishes(store, "0001", 2)
    time.sleep(1.1)
    status = rec.tick(spec, status, 1).status
    assert store.state("0001") == "succeeded"
    info = store.info("0000")
    assert store.state("0000") == "queued" and info["leaseExpiries"] == 1 and not info.get("failures")
    assert task_id(store.job, "0000", 2) in queued_ids(r)
    assert status["attempts"] == {"failures": 0, "transientFailures": 0, "leaseExpiries": 1, "messagesLost": 0}
    assert status["shards"] == {"total": 2, "queued": 1, "running": 0, "succeeded": 1, "failed": 0}


def test_suspend_removes_queued_tasks_and_resume_reenqueues(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=3)
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    other = task_id("other-job", "x", 1)
    app.send_task("embedjob.embed_shard", kwargs={}, task_id=other, queue=QUEUE)
    store.set_state("0000", "running")
    store.acquire_lease("0000", "w", ttl=30)
    spec["suspend"] = True
    res = rec.tick(spec, status, 2)
    assert res.status["phase"] == "Suspended" and st.is_true(res.status["conditions"], "Suspended")
    assert queued_ids(r) == [other] and store.control() == "suspended"
    spec["suspend"] = False
    res = rec.tick(spec, res.status, 3)
    assert store.control() == "" and res.status["phase"] == "Running"
    assert sorted(queued_ids(r)) == sorted([other, task_id(store.job, "0001", 2), task_id(store.job, "0002", 2)])
    assert any(e.reason == "Resumed" for e in res.events)


def test_redis_data_loss_rebuilds_from_manifests(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=4)
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    write_manifest(bucket, "0000", 3)
    write_manifest(bucket, "0002", 5, failed=2)
    r.flushall()
    res = rec.tick(spec, status, 1)
    assert any(e.reason == "ProgressRebuilt" for e in res.events)
    assert res.status["images"] == {"embedded": 8, "failed": 2} and res.status["progress"] == "2/4"
    assert sorted(queued_ids(r)) == sorted(task_id(store.job, s, 1) for s in ("0001", "0003"))


def test_immutable_change_is_refused_in_a_condition(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2)
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    changed = {**spec, "output": {"uri": f"s3://{bucket}/elsewhere/"}, "parallelism": 1}
    res = rec.tick(changed, status, 2)
    cond = st.get_condition(res.status["conditions"], "SpecChangeRefused")
    assert cond["status"] == "True" and "spec.output.uri" in cond["message"]
    assert any(e.reason == "SpecChangeRefused" for e in res.events)
    res = rec.tick(spec, res.status, 3)
    assert st.get_condition(res.status["conditions"], "SpecChangeRefused")["status"] == "False"


def test_cleanup_removes_tasks_and_keys_and_is_bounded_when_redis_is_down(env, redis_url):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2)
    status, rec = started(r, app, store, spec)
    rec.tick(spec, status, 1)
    ok, msg = cleanup(store, QUEUE)
    assert ok and queued_ids(r) == []
    assert r.keys(store.prefix + "*") == [store.key("control")] and store.control() == "deleted"

    dead = ProgressStore(redis_client("redis://127.0.0.1:1/0"), store.job)
    t0 = time.monotonic()
    ok, msg = cleanup(dead, QUEUE, attempts=2, delay=0.1)
    assert not ok and "released anyway" in msg and time.monotonic() - t0 < 10


def test_accept_time_is_rfc3339(env):
    r, app, store, bucket = env
    now = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    acc = accept(store, raw_spec(bucket), {}, 4, now=now)
    assert acc.status["startTime"] == "2026-05-01T00:00:00Z" and acc.status["observedGeneration"] == 4


def test_operator_never_imports_torch():
    code = ("import sys; import embedjob.operator.handlers, embedjob.operator.cli, embedjob.operator.reconcile; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-P", "-c", code], check=True)  # -P: the installed package, not ./embedjob


def test_broker_backlog_is_bounded_and_topped_up(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=7)
    status, rec = started(r, app, store, spec, max_queued=3)
    status = rec.tick(spec, status, 1).status
    assert len(queued_ids(r)) == 3 and status["shards"]["queued"] == 7
    r.delete(QUEUE)
    for stem in ("0000", "0001"):
        worker_finishes(store, stem, 1)
    status = rec.tick(spec, status, 1).status
    assert sorted(queued_ids(r)) == sorted(task_id(store.job, s, 1) for s in ("0003", "0004"))


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


def test_transient_failures_are_retried_without_consuming_the_retry_budget(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=1, retries={"perShard": 0, "backoffSeconds": 0})
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    for n in (1, 2, 3):
        store.set_state("0000", "failed", error="StorageError: GetObject s3://b/x.tar: EndpointConnectionError",
                        errorCode="EndpointConnectionError", transient=True)
        status = rec.tick(spec, status, 1).status
        assert status["phase"] == "Running" and store.state("0000") == "queued"  # perShard 0, yet retried
        assert task_id(store.job, "0000", n + 1) in queued_ids(r)
    info = store.info("0000")
    assert info["transientFailures"] == 3 and not info.get("failures")
    assert status["attempts"]["transientFailures"] == 3 and status["attempts"]["failures"] == 0
    # a hard failure then fails it: the budget is intact but 0
    store.set_state("0000", "failed", error="ValueError: not a tar", errorCode="ValueError", transient=False)
    status = rec.tick(spec, status, 1).status
    assert status["phase"] == "Failed" and status["attempts"]["failures"] == 1


def test_every_shard_denied_access_fails_the_job_fast_with_the_error(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=5, retries={"perShard": 3, "backoffSeconds": 60})
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    error = ("StorageError: HeadObject s3://b/out/_manifests/0000.json: 403 (HTTP 403): Forbidden "
             "(check the storage credentials of this process)")
    for stem in ("0000", "0001"):
        store.set_state(stem, "failed", error=error, errorCode="403", transient=False, accessError=True)
    status = rec.tick(spec, status, 1).status
    assert status["phase"] == "Running"  # two shards are not yet "every shard"
    store.set_state("0002", "failed", error=error, errorCode="403", transient=False, accessError=True)
    res = rec.tick(spec, status, 1)
    status = res.status
    assert status["phase"] == "Failed"
    failed = st.get_condition(status["conditions"], "Failed")
    assert failed["status"] == "True" and failed["reason"] == "StorageAccessFailed" and "HTTP 403" in failed["message"]
    complete = st.get_condition(status["conditions"], "Complete")
    assert complete["status"] == "False" and complete["reason"] == "Failed"  # not a stale "InProgress"
    assert store.control() == "suspended" and queued_ids(r) == []  # the rest are not attempted
    assert any(e.reason == "Failed" and "HTTP 403" in e.message for e in res.events)


def test_access_errors_do_not_fail_fast_once_a_shard_succeeded(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=5, retries={"perShard": 3, "backoffSeconds": 60})
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    worker_finishes(store, "0004", 3)
    for stem in ("0000", "0001", "0002"):
        store.set_state(stem, "failed", error="StorageError: GetObject ...: AccessDenied", errorCode="AccessDenied",
                        transient=False, accessError=True)
    status = rec.tick(spec, status, 1).status
    assert status["phase"] == "Running"  # one object with a bad ACL is that shard's problem, not the job's


def test_expired_lease_of_a_committed_shard_counts_it_done_not_lost(env):
    """A worker committed the outputs but could not record the outcome (Redis was down) and its lease
    expired: the manifest decides, no lease expiry is counted, nothing is re-run."""
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2)
    status, rec = started(r, app, store, spec, lease_seconds=2)  # expiry grace: 1 s
    status = rec.tick(spec, status, 1).status
    r.delete(QUEUE)
    store.set_state("0000", "running", attempt=1)
    write_manifest(bucket, "0000", embedded=9, failed=2)
    status = rec.tick(spec, status, 1).status
    time.sleep(1.1)
    res = rec.tick(spec, status, 1)
    assert store.state("0000") == "succeeded" and res.status["images"] == {"embedded": 9, "failed": 2}
    assert res.status["attempts"]["leaseExpiries"] == 0 and not any(e.reason == "LeaseExpired" for e in res.events)
    assert queued_ids(r) == []


def test_safety_net_reenqueues_a_queued_shard_whose_message_vanished(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=3)
    status, rec = started(r, app, store, spec, lost_message_grace=1)
    status = rec.tick(spec, status, 1).status
    lost_id = task_id(store.job, "0001", 1)
    # 0000: delivered to a (live) consumer: in kombu's unacked hash; 0001: deleted by hand; 0002: waiting
    raw0 = next(m for m in r.lrange(QUEUE, 0, -1) if json.loads(m)["headers"]["id"] == task_id(store.job, "0000", 1))
    r.lrem(QUEUE, 1, raw0)
    r.hset("unacked", "tag-0", json.dumps([json.loads(raw0), "", QUEUE]))
    r.zadd("unacked_index", {"tag-0": time.time()})
    r.lrem(QUEUE, 1, next(m for m in r.lrange(QUEUE, 0, -1) if json.loads(m)["headers"]["id"] == lost_id))
    res = rec.tick(spec, status, 1)
    assert not any(e.reason == "MessageLost" for e in res.events)  # seen missing once: not yet lost
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(e.reason == "MessageLost" for e in res.events):
        time.sleep(0.3)
        res = rec.tick(spec, res.status, 1)
    assert [e.message.split(":")[0] for e in res.events if e.reason == "MessageLost"] == ["0001"]
    ids = queued_ids(r)
    assert task_id(store.job, "0001", 2) in ids and task_id(store.job, "0002", 1) in ids
    assert task_id(store.job, "0000", 2) not in ids  # delivered, not lost
    assert res.status["attempts"]["messagesLost"] == 1 and store.state("0001") == "queued"
    for _ in range(3):  # re-enqueued once, not on every tick
        time.sleep(0.4)
        res = rec.tick(spec, res.status, 1)
    assert res.status["attempts"]["messagesLost"] == 1
