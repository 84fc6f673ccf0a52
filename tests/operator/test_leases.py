"""The lease step (embedjob.operator.leases): a dead worker's shard is re-enqueued, or counted done when
its manifest exists."""

from __future__ import annotations

import time

from embedjob.contract import task_id
from tests.operator.jobs import QUEUE, queued_ids, raw_spec, started, worker_finishes, write_manifest


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
    images = res.status["images"]
    assert store.state("0000") == "succeeded" and (images["embedded"], images["failed"]) == (9, 2)
    assert res.status["attempts"]["leaseExpiries"] == 0 and not any(e.reason == "LeaseExpired" for e in res.events)
    assert queued_ids(r) == []
