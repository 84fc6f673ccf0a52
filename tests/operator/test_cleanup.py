"""Deleting a job (embedjob.operator.cleanup): queued tasks and Redis keys removed, bounded when Redis
is down."""

from __future__ import annotations

import time

from embedjob.operator.cleanup import cleanup
from embedjob.progress import ProgressStore, redis_client
from tests.operator.jobs import QUEUE, queued_ids, raw_spec, started


def test_cleanup_removes_tasks_and_keys_and_is_bounded_when_redis_is_down(env, redis_url):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=2)
    status, rec = started(r, app, store, spec)
    rec.tick(spec, status, 1)
    ok, msg = cleanup(store, QUEUE)
    assert ok and queued_ids(r) == []
    assert r.keys(store.prefix + "*") == [store.key("control")] and store.control() == "deleted"

    dead = ProgressStore(redis_client("redis://127.0.0.1:1/0"), store.job)
    t0 = time.monotonic()
    ok, msg = cleanup(dead, QUEUE, attempts=2, delay=0.1)
    assert not ok and "released anyway" in msg and time.monotonic() - t0 < 10
