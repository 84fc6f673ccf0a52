"""Spec changes (embedjob.operator.changes): immutable fields refused in a condition."""

from __future__ import annotations

from embedjob.operator import status as st
from tests.operator.jobs import raw_spec, started


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
