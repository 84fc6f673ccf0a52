"""Fault tests: real Redis, SeaweedFS (with authentication), Celery workers and the operator on the real
apiserver, each fault injected for real (SIGKILL, restart with and without data, a fault-injecting
proxy in front of S3, a message deleted from the broker). Every test checks the outcome a user would:
the phase, exact outputs, each shard committed exactly once, and the counters.

The stack is this module's own (its own Redis, S3, operator watching only the ``faults`` namespace,
workers on its own queue), so killing its parts never disturbs the other end-to-end tests.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from embedjob.progress import redis_client
from tests.e2e.conftest import Workers
from tests.e2e.faults import FaultStack

pytestmark = pytest.mark.e2e

TIMINGS: dict[str, float] = {}  # fault -> seconds to recovery (printed at the end of the module)


@pytest.fixture(scope="module")
def faults(cluster, tiny_clip_dir, tmp_path_factory):
    stack = FaultStack(cluster, tmp_path_factory.mktemp("faults"), str(tiny_clip_dir))
    yield stack
    stack.close()
    if TIMINGS:
        print("\nfault -> recovery (s):", json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))


@pytest.fixture()
def healthy(faults):
    """Every test starts with a healthy stack and a clean proxy."""
    faults.proxy.fail_fraction = faults.proxy.reset_fraction = 0.0
    faults.proxy.down_until = 0.0
    faults.operator.ensure()
    faults.workers.ensure()
    return faults


def shards_done(status: dict) -> int:
    return int((status.get("shards") or {}).get("succeeded") or 0)


def test_worker_with_wrong_credentials_fails_the_job_fast_with_the_403(healthy):
    f = healthy
    bucket = f.bucket()
    f.put_shards(bucket, 6, 4)
    queue = f"badcreds-{uuid.uuid4().hex[:6]}"
    bad = Workers({**f.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}, queue, f.logs, count=1)
    bad.ensure()
    try:
        t0 = time.monotonic()
        f.apply("bad-creds", bucket, 6, queue=queue, retries={"perShard": 3, "backoffSeconds": 30})
        status = f.wait_phase("bad-creds", "Failed", timeout=60)
        TIMINGS["wrong credentials -> Failed"] = time.monotonic() - t0
    finally:
        bad.stop()
    cond = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert cond["status"] == "True" and cond["reason"] == "StorageAccessFailed"
    assert "HeadObject s3://" in cond["message"] and "403" in cond["message"], cond
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["status"] == "False" and complete["reason"] == "Failed"
    assert any(e["reason"] == "Failed" and "403" in e["message"] for e in f.events("bad-creds"))
    assert list(f.storage.list(f"s3://{bucket}/out/")) == []  # nothing written anywhere


def test_s3_killed_and_restarted_mid_job_succeeds(healthy):
    f = healthy
    bucket = f.bucket()
    shards = f.put_shards(bucket, 16, 40)
    f.apply("s3-restart", bucket, 16)
    f.wait("s3-restart", lambda s: shards_done(s) >= 2, 120, "2 shards done")
    f.kill_s3()
    time.sleep(10)
    f.start_s3()
    t_back = time.monotonic()
    status = f.wait_phase("s3-restart", "Succeeded", timeout=240)
    TIMINGS["S3 killed 10 s -> Succeeded after restart"] = time.monotonic() - t_back
    f.verify(bucket, shards)
    store = f.store("s3-restart")
    assert store.commits() == dict.fromkeys(shards, 1)
    assert status["attempts"]["failures"] == 0 and status["shards"]["failed"] == 0  # transient only
    assert status["images"]["embedded"] == 16 * 40


def test_s3_answering_503_and_resetting_connections_succeeds(healthy):
    f = healthy
    bucket = f.bucket()
    shards = f.put_shards(bucket, 16, 40)
    f.proxy.fail_fraction, f.proxy.reset_fraction = 0.15, 0.02
    f.apply("s3-flaky", bucket, 16)
    f.wait("s3-flaky", lambda s: shards_done(s) >= 2, 120, "2 shards done")
    f.proxy.down_for(12)  # and then nothing at all for 12 s
    time.sleep(12)
    f.proxy.fail_fraction = f.proxy.reset_fraction = 0.0
    t0 = time.monotonic()
    status = f.wait_phase("s3-flaky", "Succeeded", timeout=240)
    TIMINGS["S3 flaky, then down 12 s -> Succeeded after it recovers"] = time.monotonic() - t0
    injected = dict(f.proxy.injected)
    assert injected["503"] > 0 and injected["reset"] > 0, injected
    f.verify(bucket, shards)
    assert f.store("s3-flaky").commits() == dict.fromkeys(shards, 1)
    assert status["attempts"]["failures"] == 0 and status["shards"]["failed"] == 0


def test_redis_killed_and_restarted_with_its_data_no_false_lease_expiries(healthy):
    f = healthy
    bucket = f.bucket()
    shards = f.put_shards(bucket, 16, 40)
    f.apply("redis-aof", bucket, 16)
    f.wait("redis-aof", lambda s: shards_done(s) >= 2, 120, "2 shards done")
    f.kill_redis()
    time.sleep(6)  # longer than a shard and than the 3 s lease: shards finish during the outage
    frozen = shards_done(f.status("redis-aof"))
    f.start_redis()
    t_back = time.monotonic()
    f.wait("redis-aof", lambda s: shards_done(s) > frozen, 30, "progress after the restart")
    TIMINGS["Redis restarted (AOF) -> status moves"] = time.monotonic() - t_back
    status = f.wait_phase("redis-aof", "Succeeded", timeout=240)
    f.verify(bucket, shards)
    assert f.store("redis-aof").commits() == dict.fromkeys(shards, 1)
    assert status["attempts"]["leaseExpiries"] == 0, status["attempts"]  # nobody's worker was lost
    assert status["attempts"]["failures"] == 0
    assert not any(e["reason"] == "LeaseExpired" for e in f.events("redis-aof"))
    assert "will try again in 60 seconds" not in f.operator_log()


def test_redis_restarted_without_its_data_rebuilds_and_succeeds(healthy):
    f = healthy
    bucket = f.bucket()
    shards = f.put_shards(bucket, 16, 40)
    f.apply("redis-wiped", bucket, 16)
    f.wait("redis-wiped", lambda s: shards_done(s) >= 2, 120, "2 shards done")
    f.kill_redis()
    time.sleep(2)
    f.start_redis(wipe=True)
    t_back = time.monotonic()
    status = f.wait_phase("redis-wiped", "Succeeded", timeout=240)
    TIMINGS["Redis restarted empty -> Succeeded"] = time.monotonic() - t_back
    f.verify(bucket, shards)
    assert status["images"]["embedded"] == 16 * 40 and status["shards"]["succeeded"] == 16
    assert any(e["reason"] == "ProgressRebuilt" for e in f.events("redis-wiped"))


def test_message_deleted_from_the_broker_is_reenqueued_by_the_safety_net(healthy):
    f = healthy
    bucket = f.bucket()
    # 2 shards: with no worker announced on the queue, fair dispatch keeps EMBEDJOB_MIN_QUEUED (2)
    # messages of a job waiting, so both are in the list.
    shards = f.put_shards(bucket, 2, 5)
    queue = f"nobody-{uuid.uuid4().hex[:6]}"  # no worker yet: the messages wait in the list
    f.apply("lost-message", bucket, 2, queue=queue)
    r = redis_client(f.redis.authed_url)
    deadline = time.monotonic() + 30
    while r.llen(queue) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.llen(queue) == 2
    victim = r.lrange(queue, 0, 0)[0]
    assert r.lrem(queue, 1, victim) == 1
    t0 = time.monotonic()
    f.wait("lost-message", lambda s: (s.get("attempts") or {}).get("messagesLost") == 1, 30, "message re-enqueued")
    TIMINGS["message deleted -> re-enqueued"] = time.monotonic() - t0
    assert r.llen(queue) == 2
    assert any(e["reason"] == "MessageLost" for e in f.events("lost-message"))
    rescuer = Workers(f.env, queue, f.logs, count=1)
    rescuer.ensure()
    try:
        status = f.wait_phase("lost-message", "Succeeded", timeout=120)
    finally:
        rescuer.stop()
    f.verify(bucket, shards)
    assert f.store("lost-message").commits() == dict.fromkeys(shards, 1)
    assert status["attempts"]["messagesLost"] == 1
