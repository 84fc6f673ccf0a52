"""The tick itself (embedjob.operator.reconcile): the control step (suspend / resume) and what the
operator imports."""

from __future__ import annotations

import subprocess
import sys

from embedjob.contract import task_id
from tests.operator.jobs import QUEUE, is_true, queued_ids, raw_spec, started


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
    assert res.status["phase"] == "Suspended" and is_true(res.status["conditions"], "Suspended")
    assert queued_ids(r) == [other] and store.control() == "suspended"
    spec["suspend"] = False
    res = rec.tick(spec, res.status, 3)
    assert store.control() == "" and res.status["phase"] == "Running"
    assert sorted(queued_ids(r)) == sorted([other, task_id(store.job, "0001", 2), task_id(store.job, "0002", 2)])
    assert any(e.reason == "Resumed" for e in res.events)


def test_operator_never_imports_torch():
    code = ("import sys; import embedjob.operator.handlers, embedjob.operator.cli, embedjob.operator.reconcile; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-P", "-c", code], check=True)  # -P: the installed package, not ./embedjob
