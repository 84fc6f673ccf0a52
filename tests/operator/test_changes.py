"""Spec changes (embedjob.operator.changes): immutable fields refused in a condition."""

from __future__ import annotations

from embedjob.operator import status as st
from tests.operator.jobs import QUEUE, raw_spec, started


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


def test_a_priority_raised_after_acceptance_is_capped_at_the_ceiling(env):
    from embedjob.operator.events import JobMemory
    from embedjob.operator.reconcile import Reconciler
    from embedjob.settings import Settings

    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2)
    status, _ = started(r, app, store, spec)
    rec = Reconciler(store, app, JobMemory(), Settings(min_queued=10_000, max_priority=2))
    rec.tick({**spec, "priority": 10}, status, 2)
    assert store.active_jobs(QUEUE) == {store.job: 2}
