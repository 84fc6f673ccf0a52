"""Recovery (embedjob.operator.recovery): the accepted spec and plan from Redis, or rebuilt from the
manifests when Redis lost the job."""

from __future__ import annotations

from embedjob.contract import task_id
from tests.operator.jobs import queued_ids, raw_spec, started, write_manifest


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
