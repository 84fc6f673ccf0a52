"""The failure step (embedjob.operator.failures): retries with backoff, transient failures, and the
fail-fast check on access errors."""

from __future__ import annotations

import time

from embedjob.contract import task_id
from embedjob.operator import status as st
from embedjob.operator.failures import count_failures, fatal_error
from embedjob.spec import parse_spec
from tests.operator.jobs import queued_ids, raw_spec, started, worker_finishes


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


def test_each_failed_attempt_is_counted_once_in_redis(env):
    r, app, store, bucket = env
    spec = parse_spec(raw_spec(bucket, n=3, retries={"perShard": 1, "backoffSeconds": 10}), allow_local=False)
    store.set_state("0000", "failed", dispatch=1, error="ValueError: not a tar", errorCode="ValueError")
    store.set_state("0001", "failed", dispatch=1, error="StorageError: 403", errorCode="403", accessError=True)
    store.set_state("0002", "failed", dispatch=2, error="timeout", transient=True)
    events = []
    infos, due = count_failures(store, spec, store.states(), 1000.0, events)
    assert due == [] and events == []  # every retry waits for its backoff (transient ones too)
    assert (infos["0000"]["failures"], infos["0000"]["countedDispatch"], infos["0000"]["retryAt"]) == (1, 1, 1010.0)
    assert infos["0002"]["transientFailures"] == 1 and not infos["0002"]["failures"]
    assert store.totals() == {"failures": 2, "transientFailures": 1, "leaseExpiries": 0, "messagesLost": 0}
    assert store.access_errors() == [{"accessError": True, "errorCode": "403", "error": "StorageError: 403"}]
    assert fatal_error(store, shards_to_do=1, succeeded_this_run=0) == "StorageError: 403"
    assert fatal_error(store, shards_to_do=3, succeeded_this_run=0) == ""  # one shard is not every shard

    # The same attempts seen again count nothing; due once the backoff passed; the budget spent: final.
    infos, due = count_failures(store, spec, store.states(), 1010.0, events)
    assert sorted(due) == ["0000", "0001", "0002"] and store.totals()["failures"] == 2
    store.set_state("0000", "failed", dispatch=2, error="ValueError: not a tar")
    infos, due = count_failures(store, spec, store.states(), 2000.0, events)
    assert infos["0000"]["final"] and "0000" not in due and store.info("0000")["failures"] == 2
    assert [e.reason for e in events] == ["ShardFailed"] and store.totals()["failures"] == 3
