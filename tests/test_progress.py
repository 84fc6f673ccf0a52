"""ProgressStore: the one owner of embedjob's Redis keys (REAL Redis)."""

from __future__ import annotations

import time

import pytest

from embedjob import fairness
from embedjob.broker import make_app, queue_lengths
from embedjob.contract import task_id
from embedjob.progress import ProgressStore, redis_client


@pytest.fixture()
def store(redis_url):
    r = redis_client(redis_url)
    yield ProgressStore(r, "job-1", lease_seconds=30)
    r.close()


def test_keys_live_under_the_job_prefix(store):
    store.set_state("0000", "running", attempt=1)
    store.acquire_lease("0000", "w")
    store.save_plan({"queue": "q"}, [("0000", "s3://b/0000.tar")], {})
    store.count_total("failures")
    store.record_access_error("0000", "403", "denied")
    store.set_control("suspended")
    assert sorted(store.r.keys("*")) == sorted(f"embedjob:job-1:{k}" for k in (
        "state", "info", "lease:0000", "spec", "plan", "totals", "accessErrors", "control"))


def test_plan_spec_totals_and_access_errors_round_trip(store):
    assert store.plan() is None and store.accepted_spec() is None and not store.has_plan()
    store.save_plan({"queue": "q", "n": 1}, [("0000", "s3://b/0000.tar"), ("0001", "s3://b/0001.tar")],
                    {"0001": {"images": 3, "failedImages": 0}})
    assert store.has_plan() and store.accepted_spec() == {"queue": "q", "n": 1}
    assert store.plan() == [("0000", "s3://b/0000.tar"), ("0001", "s3://b/0001.tar")]
    assert store.states() == {"0001": "succeeded"} and store.info("0001")["images"] == 3
    assert store.totals() == {"failures": 0, "transientFailures": 0, "leaseExpiries": 0, "messagesLost": 0}
    store.count_total("leaseExpiries")
    store.count_total("leaseExpiries", 2)
    assert store.totals()["leaseExpiries"] == 3
    with pytest.raises(AssertionError):
        store.count_total("noSuchTotal")
    store.record_access_error("0000", "403", "HTTP 403")
    store.record_access_error("0000", "403", "HTTP 403 again")  # one entry per shard: its last attempt
    assert store.access_errors() == [{"accessError": True, "errorCode": "403", "error": "HTTP 403 again"}]


def test_set_pending_records_state_and_whole_info(store):
    store.set_pending({"0000": {"dispatch": 2, "retryAt": None}, "0001": {"dispatch": 1}})
    assert store.states() == {"0000": "pending", "0001": "pending"}
    info = store.info("0000")
    assert info["dispatch"] == 2 and info["retryAt"] is None and info["updated"] > 0


def test_queue_calls_go_through_the_store(store, redis_url):
    store.register_job("q", 2)
    assert store.active_jobs("q") == {"job-1": 2}
    store.r.zadd(fairness.workers_key("q"), {"w@h|3": time.time()})
    assert store.live_slots("q") == 3
    store.unregister_job("q")
    assert store.active_jobs("q") == {}

    app = make_app(redis_url)
    for stem in ("a", "b"):
        app.send_task("embedjob.embed_shard", kwargs={}, task_id=task_id(store.job, stem, 1), queue="q")
    app.send_task("embedjob.embed_shard", kwargs={}, task_id=task_id("other", "a", 1), queue="q")
    waiting, delivered = store.broker_snapshot("q")
    assert waiting == {task_id(store.job, s, 1) for s in ("a", "b")} and delivered == {}
    assert queue_lengths(store.r, ["q", "empty"]) == {"q": 3, "empty": 0}
    assert store.remove_queued_tasks("q") == 2
    assert queue_lengths(store.r, ["q"]) == {"q": 1}
