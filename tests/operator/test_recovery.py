"""Recovery (embedjob.operator.recovery): the accepted spec and plan from Redis, or rebuilt from the
manifests when Redis lost the job."""

from __future__ import annotations

import json

import pytest

from embedjob.access import AccessPolicy
from embedjob.contract import task_id
from embedjob.operator.changes import spec_hash
from embedjob.operator.events import JobMemory
from embedjob.operator.reconcile import Reconciler
from embedjob.operator.recovery import load_accepted
from embedjob.settings import Settings
from embedjob.spec import SpecError, parse_spec
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
    images = res.status["images"]
    assert (images["embedded"], images["failed"]) == (8, 2) and res.status["progress"] == "2/4"
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


# -- the storage policy on every path (issue 16) ---------------------------------------------------------
def _policy(allow: dict) -> AccessPolicy:
    return AccessPolicy.from_settings(Settings.from_env({"EMBEDJOB_STORAGE_ALLOW_LIST": json.dumps(allow)}))


def test_a_forged_plan_and_spec_hash_in_the_status_is_refused_by_the_rebuild(env):
    """A user who may patch embeddingjobs/status writes a plan with the hash of a spec outside the
    allow-list: the tick re-plans from the resource's spec (Redis has no plan) and must refuse it."""
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2)
    forged = {"phase": "Running", "plan": {"total": 2, "doneAtStart": 0,
                                           "specHash": spec_hash(parse_spec(spec, allow_local=False))}}
    rec = Reconciler(store, app, JobMemory(), Settings(min_queued=10_000), namespace="tenant-a",
                     policy=_policy({"tenant-a": ["s3://tenant-a-data/"]}))
    res = rec.tick(spec, forged, 1)
    assert res.status["phase"] == "Failed"
    cond = next(c for c in res.status["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "StorageNotAllowed" and cond["message"].startswith("spec.input.uri: "), cond
    assert queued_ids(r) == [] and store.plan() is None  # nothing planned, nothing sent


def test_a_tightened_allow_list_fails_a_running_job_and_withdraws_its_queued_tasks(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=3)
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    assert len(queued_ids(r)) == 3
    # the operator restarts with a list that no longer admits the bucket
    rec = Reconciler(store, app, JobMemory(), Settings(min_queued=10_000), namespace="default",
                     policy=_policy({"default": ["s3://somewhere-else/"]}))
    res = rec.tick(spec, status, 1)
    cond = next(c for c in res.status["conditions"] if c["type"] == "Failed")
    assert res.status["phase"] == "Failed" and cond["reason"] == "StorageNotAllowed", cond
    assert queued_ids(r) == [] and store.control() == "suspended"  # in-flight messages are dropped by workers
    assert any(e.reason == "StorageNotAllowed" and "3 queued task(s) withdrawn" in e.message for e in res.events)


def test_every_message_is_checked_before_it_is_sent(env):
    """A plan in Redis naming a shard outside the job's prefixes (however it got there) is never sent."""
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2)
    status, _ = started(r, app, store, spec)
    plan = store.plan()
    store.save_plan(spec, [*plan, ("evil", "s3://tenant-b/in/0000.tar")], {})
    rec = Reconciler(store, app, JobMemory(), Settings(min_queued=10_000), namespace="default",
                     policy=_policy({"default": [f"s3://{bucket}/"]}))
    res = rec.tick(spec, status, 1)
    cond = next(c for c in res.status["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "StorageNotAllowed" and "s3://tenant-b/in/0000.tar" in cond["message"], cond
    assert queued_ids(r) == []  # not even the allowed shards of that batch: checked before any intent


def test_a_ceiling_lowered_since_acceptance_fails_the_job_naming_the_field(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2)  # retries.perShard: 1
    status, _ = started(r, app, store, spec)
    rec = Reconciler(store, app, JobMemory(), Settings(min_queued=10_000, max_retries=0))
    res = rec.tick(spec, status, 1)
    cond = next(c for c in res.status["conditions"] if c["type"] == "Failed")
    assert res.status["phase"] == "Failed" and cond["reason"] == "InvalidSpec", cond
    assert cond["message"].startswith("spec.retries.perShard: must be at most 0 on this cluster"), cond
    assert queued_ids(r) == []
