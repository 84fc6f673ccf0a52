"""Fair dispatch across jobs sharing a queue: the share arithmetic, then two jobs on REAL Redis,
SeaweedFS and `embedjob worker` subprocesses, driven by the operator's own Reconciler (no apiserver):
a small job submitted after a large one starts within seconds and finishes long before it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import pytest

from embedjob import fairness
from embedjob.broker import make_app
from embedjob.dev.services import embedjob_command
from embedjob.operator.accept import accept
from embedjob.operator.events import JobMemory
from embedjob.operator.reconcile import Reconciler
from embedjob.progress import ProgressStore, redis_client
from embedjob.settings import Settings
from embedjob.storage import s3_client
from tests.shards import simple_shard


def test_shares_follow_worker_slots_and_priorities():
    one = fairness.job_cap("a", {"a": 0}, slots=8, queued_per_slot=2, min_queued=2, max_queued=2000)
    assert (one.cap, one.depth) == (16, 16)  # alone: the whole (short) queue, not 2000 messages
    two = {"a": 0, "b": 0}
    assert fairness.job_cap("a", two, 8, 2, 2, 2000).cap == fairness.job_cap("b", two, 8, 2, 2, 2000).cap == 8
    weighted = {"a": 0, "b": 1}  # b has priority 1: twice a's share
    assert (fairness.job_cap("a", weighted, 12, 2, 2, 2000).cap, fairness.job_cap("b", weighted, 12, 2, 2, 2000).cap) \
        == (8, 16)
    assert fairness.job_cap("a", {"a": 0}, 0, 2, 2, 2000).cap == 2  # no worker seen yet: the floor
    assert fairness.job_cap("a", {"a": -10, "b": 10}, 4, 2, 3, 2000).cap == 3  # never below the floor
    assert fairness.job_cap("a", {"a": 0}, 10_000, 2, 2, 500).cap == 500  # nor above EMBEDJOB_MAX_QUEUED


def test_workers_and_jobs_announce_and_age_out(redis_url):
    r = redis_client(redis_url)
    now = time.time()
    r.zadd(fairness.workers_key("q"), {"w1@h|2": now, "w2@h|4": now - 5, "gone@h|8": now - fairness.WORKER_TTL - 1})
    assert fairness.live_slots(r, "q", now) == 6
    fairness.register_job(r, "q", "job-a", 0, now)
    fairness.register_job(r, "q", "job-b", 2, now - fairness.JOB_TTL - 1)
    assert fairness.active_jobs(r, "q", now) == {"job-a": 0}
    fairness.unregister_job(r, "q", "job-a")
    assert fairness.active_jobs(r, "q", now) == {}


def _spec(bucket: str, name: str, n: int, queue: str, model: str, **extra) -> dict:
    return {"input": {"uri": f"s3://{bucket}/{name}/{{000..{n - 1:03d}}}.tar"}, "output": {"uri": f"s3://{bucket}/out-{name}/"},
            "queue": queue, "model": {"path": model},
            "inference": {"device": "cpu", "batchSize": 8, "numThreads": 1}, **extra}


class _Job:
    def __init__(self, r, app, spec: dict, settings: Settings) -> None:
        self.spec = spec
        self.store = ProgressStore(r, str(uuid.uuid4()))
        acc = accept(self.store, spec, {}, 1)
        assert acc.ok, acc.status
        self.status = acc.status
        self.rec = Reconciler(self.store, app, JobMemory(), settings)
        self.submitted = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def tick(self) -> None:
        self.status = self.rec.tick(self.spec, self.status, 1).status
        states = self.store.states()
        now = time.monotonic()
        if self.started_at is None and any(v in ("running", "succeeded") for v in states.values()):
            self.started_at = now
        if self.finished_at is None and self.status.get("phase") == "Succeeded":
            self.finished_at = now

    def done(self) -> int:
        return sum(1 for v in self.store.states().values() if v == "succeeded")


@pytest.mark.parametrize("small_priority", [0])
def test_small_job_after_a_large_one_starts_within_seconds_and_finishes_long_before_it(
        redis_url, s3_env, bucket, tiny_clip_dir, tmp_path, small_priority):
    queue = f"q-{uuid.uuid4().hex[:8]}"
    large_n, small_n = 40, 3
    s3 = s3_client()
    for name, n in (("large", large_n), ("small", small_n)):
        for i in range(n):
            s3.put_object(Bucket=bucket, Key=f"{name}/{i:03d}.tar",
                          Body=simple_shard(60, size=(160, 120), seed=i).tar_bytes())
    env = {**os.environ, **s3_env, "EMBEDJOB_REDIS_URL": redis_url, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(embedjob_command("worker", "--queue", queue, "--hostname", "fair@%h"), env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    r = redis_client(redis_url)
    app = make_app(redis_url)
    settings = Settings(redis_url=redis_url, operator_interval=0.5)  # the defaults: 2 per slot, floor 2
    try:
        deadline = time.monotonic() + 60
        while fairness.live_slots(r, queue) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert fairness.live_slots(r, queue) == 2  # one worker, two shards in flight
        large = _Job(r, app, _spec(bucket, "large", large_n, queue, str(tiny_clip_dir)), settings)
        while large.done() < 3 and time.monotonic() < deadline + 120:
            large.tick()
            time.sleep(0.5)
        assert large.done() >= 3, "the large job never got going"
        assert r.llen(queue) <= 4  # its backlog in the broker: 2 per worker slot, not the whole job

        small = _Job(r, app, _spec(bucket, "small", small_n, queue, str(tiny_clip_dir), priority=small_priority),
                     settings)
        large_done_at_submit = large.done()
        deadline = time.monotonic() + 300
        while (large.finished_at is None or small.finished_at is None) and time.monotonic() < deadline:
            for job in (large, small):
                if job.finished_at is None:
                    job.tick()
            if small.finished_at is not None and not hasattr(small, "large_done"):
                small.large_done = large.done()
            time.sleep(0.5)
        assert small.finished_at is not None and large.finished_at is not None
        start_delay = small.started_at - small.submitted
        small_took = small.finished_at - small.submitted
        large_took = large.finished_at - large.submitted
        print(f"\nsmall job: started {start_delay:.1f}s after submission, finished after {small_took:.1f}s; "
              f"large job ({large_n} shards): {large_took:.1f}s in all, {large.finished_at - small.submitted:.1f}s "
              f"after the small one was submitted; large shards done when the small job was submitted: "
              f"{large_done_at_submit}, when it finished: {small.large_done}/{large_n}")
        assert start_delay < 10
        # The small job finished while most of the large job was still to do (FIFO: it would have
        # waited for all of the large job's queued shards).
        assert small.large_done <= large_n // 2
        assert small.finished_at < large.finished_at
        assert fairness.active_jobs(r, queue) == {}  # finished jobs leave the queue to others
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)


def test_priority_weighs_each_jobs_messages_in_the_broker(redis_url, s3_env, bucket):
    """Two jobs on one queue with 6 live worker slots announced (depth 12): priority 1 keeps twice the
    messages of priority 0 waiting; raising the other's priority (a mutable field) shifts the split."""

    queue = f"q-{uuid.uuid4().hex[:8]}"
    r = redis_client(redis_url)
    r.zadd(fairness.workers_key(queue), {"w@h|6": time.time()})
    app = make_app(redis_url)
    settings = Settings(redis_url=redis_url)
    for name in ("a", "b"):
        for i in range(30):
            s3_client().put_object(Bucket=bucket, Key=f"{name}/{i:03d}.tar", Body=b"")
    a = _Job(r, app, _spec(bucket, "a", 30, queue, "/nowhere"), settings)
    b = _Job(r, app, _spec(bucket, "b", 30, queue, "/nowhere", priority=1), settings)

    fairness.register_job(r, queue, a.store.job, 0)  # both already have work on the queue
    fairness.register_job(r, queue, b.store.job, 1)
    a.tick()
    b.tick()
    counts = {"a": sum(1 for m in r.lrange(queue, 0, -1) if a.store.job in m),
              "b": sum(1 for m in r.lrange(queue, 0, -1) if b.store.job in m)}
    assert counts == {"a": 4, "b": 8}  # 12 x 1/3 and 12 x 2/3
    assert fairness.active_jobs(r, queue) == {a.store.job: 0, b.store.job: 1}
    a.spec = {**a.spec, "priority": 2}
    a.tick()
    assert a.rec.mem.share.cap == 8  # 12 x 4/6
