"""Recovery (embedjob.operator.recovery): the accepted spec and plan from Redis, or rebuilt from the
manifests when Redis lost the job."""

from __future__ import annotations

import pytest

from embedjob.contract import task_id
from embedjob.operator.events import JobMemory
from embedjob.operator.recovery import load_accepted
from embedjob.spec import SpecError
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


def test_a_new_operator_loads_the_accepted_spec_and_plan_from_redis(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2)
    status, _rec = started(r, app, store, spec)
    mem, events = JobMemory(), []
    changed = {**spec, "parallelism": 1, "output": {"uri": f"s3://{bucket}/elsewhere/"}}
    accepted = load_accepted(store, mem, changed, status, events)  # the accepted spec, not the resource's
    assert accepted.output.uri == f"s3://{bucket}/out/" and events == []
    assert mem.plan == [(s, f"s3://{bucket}/in/{s}.tar") for s in ("0000", "0001")]
    assert mem.uris == dict(mem.plan)


def test_redis_data_loss_with_a_changed_spec_is_not_rebuilt(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2)
    status, _rec = started(r, app, store, spec)
    r.flushall()
    changed = {**spec, "output": {"uri": f"s3://{bucket}/elsewhere/"}}
    with pytest.raises(SpecError, match="cannot rebuild safely"):
        load_accepted(store, JobMemory(), changed, status, [])
    assert store.plan() is None and store.accepted_spec() is None and store.states() == {}
