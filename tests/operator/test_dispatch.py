"""Dispatch (embedjob.operator.dispatch): intent, message, acknowledgement; parallelism and the bounded
broker backlog."""

from __future__ import annotations

from embedjob.contract import task_id
from embedjob.operator.dispatch import Dispatcher
from embedjob.operator.events import JobMemory
from embedjob.operator.reconcile import Reconciler
from embedjob.spec import parse_spec
from tests.operator.jobs import QUEUE, queued_ids, raw_spec, started, worker_finishes


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


def test_dispatch_records_the_intent_then_sends_then_acknowledges(env):
    r, app, store, bucket = env
    spec = parse_spec(raw_spec(bucket, n=2), allow_local=False)
    uris = {s: f"s3://{bucket}/in/{s}.tar" for s in ("0000", "0001")}
    store.update_info("0001", dispatch=3, failures=1, retryAt=123.0)  # a retry: its fourth dispatch
    seen: dict[str, str | None] = {}

    class FastWorker:
        """Sends, and (for 0000) a worker starts the shard before the operator acknowledges it."""

        def send_task(self, name, args=None, kwargs=None, **options):
            stem = kwargs["task"]["stem"]
            seen[stem] = store.state(stem)  # the intent is in Redis before the message exists
            app.send_task(name, args=args, kwargs=kwargs, **options)
            if stem == "0000":
                store.set_state(stem, "running")

    sent = Dispatcher(store, FastWorker(), spec, uris).dispatch(["0000", "0001"])
    assert sent == 2 and seen == {"0000": "pending", "0001": "pending"}
    assert sorted(queued_ids(r)) == sorted([task_id(store.job, "0000", 1), task_id(store.job, "0001", 4)])
    assert store.states() == {"0000": "running", "0001": "queued"}  # the worker's "running" is never overwritten
    info = store.info("0001")
    assert info["dispatch"] == 4 and info["retryAt"] is None and info["failures"] == 1
