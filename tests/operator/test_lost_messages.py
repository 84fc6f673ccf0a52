"""The safety net for lost messages (embedjob.operator.lost_messages)."""

from __future__ import annotations

import json
import time

from embedjob.contract import task_id
from tests.operator.jobs import QUEUE, queued_ids, raw_spec, started


def test_safety_net_reenqueues_a_queued_shard_whose_message_vanished(env):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=3)
    status, rec = started(r, app, store, spec, lost_message_grace=1)
    status = rec.tick(spec, status, 1).status
    lost_id = task_id(store.job, "0001", 1)
    # 0000: delivered to a (live) consumer: in kombu's unacked hash; 0001: deleted by hand; 0002: waiting
    raw0 = next(m for m in r.lrange(QUEUE, 0, -1) if json.loads(m)["headers"]["id"] == task_id(store.job, "0000", 1))
    r.lrem(QUEUE, 1, raw0)
    r.hset("unacked", "tag-0", json.dumps([json.loads(raw0), "", QUEUE]))
    r.zadd("unacked_index", {"tag-0": time.time()})
    r.lrem(QUEUE, 1, next(m for m in r.lrange(QUEUE, 0, -1) if json.loads(m)["headers"]["id"] == lost_id))
    res = rec.tick(spec, status, 1)
    assert not any(e.reason == "MessageLost" for e in res.events)  # seen missing once: not yet lost
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(e.reason == "MessageLost" for e in res.events):
        time.sleep(0.3)
        res = rec.tick(spec, res.status, 1)
    assert [e.message.split(":")[0] for e in res.events if e.reason == "MessageLost"] == ["0001"]
    ids = queued_ids(r)
    assert task_id(store.job, "0001", 2) in ids and task_id(store.job, "0002", 1) in ids
    assert task_id(store.job, "0000", 2) not in ids  # delivered, not lost
    assert res.status["attempts"]["messagesLost"] == 1 and store.state("0001") == "queued"
    for _ in range(3):  # re-enqueued once, not on every tick
        time.sleep(0.4)
        res = rec.tick(spec, res.status, 1)
    assert res.status["attempts"]["messagesLost"] == 1
