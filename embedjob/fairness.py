"""Fair dispatch across the jobs sharing one queue (torch-free: the operator and the workers use it).

The broker's queue is one FIFO list per queue. If every job kept thousands of messages waiting, a
small job submitted after a large one would wait behind the large job's whole backlog. Instead each
job keeps only its **share** of a short queue waiting:

- Workers announce themselves: ``embedjob:workers:<queue>`` is a sorted set of ``<worker>|<slots>``
  scored by the time last seen (every few seconds, from the consumer loop). ``slots`` is how many
  shards the worker runs at once.
- Jobs announce themselves: ``embedjob:queue:<queue>:jobs`` maps the job's uid to
  ``{"priority": p, "seen": t}``, refreshed by every tick of a job with shards left; finished,
  suspended or deleted jobs drop out (or age out).
- The queue's depth is ``queued_per_slot x live slots`` (at least ``min_queued`` per job); each job's
  cap is its priority-weighted share of it, never below ``min_queued`` and never above
  ``EMBEDJOB_MAX_QUEUED``. Every tick tops each job up to its cap, so the FIFO list holds the jobs'
  messages interleaved in proportion to their weights (a weighted round-robin): a new job's first
  messages are behind at most the other jobs' short shares, not their backlogs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

WORKER_TTL = 30.0  # a worker not seen for this long no longer counts
JOB_TTL = 120.0  # a job not ticked for this long no longer counts (its operator is gone)


def workers_key(queue: str) -> str:
    return f"embedjob:workers:{queue}"


def jobs_key(queue: str) -> str:
    return f"embedjob:queue:{queue}:jobs"


def live_slots(client, queue: str, now: float | None = None) -> int:  # noqa: ANN001
    """Shards the live workers consuming ``queue`` run at once (0: none seen)."""
    now = time.time() if now is None else now
    key = workers_key(queue)
    client.zremrangebyscore(key, "-inf", now - 10 * WORKER_TTL)
    total = 0
    for member in client.zrangebyscore(key, now - WORKER_TTL, "+inf"):
        member = member.decode() if isinstance(member, bytes) else member
        try:
            total += max(int(member.rsplit("|", 1)[1]), 1)
        except (IndexError, ValueError):
            total += 1
    return total


def register_job(client, queue: str, job: str, priority: int, now: float | None = None) -> None:  # noqa: ANN001
    now = time.time() if now is None else now
    client.hset(jobs_key(queue), job, json.dumps({"priority": priority, "seen": now}))


def unregister_job(client, queue: str, job: str) -> None:  # noqa: ANN001
    client.hdel(jobs_key(queue), job)


def active_jobs(client, queue: str, now: float | None = None) -> dict[str, int]:  # noqa: ANN001
    """job -> priority of the jobs with work on ``queue`` (stale entries are dropped)."""
    now = time.time() if now is None else now
    out: dict[str, int] = {}
    stale = []
    for job, raw in client.hgetall(jobs_key(queue)).items():
        job = job.decode() if isinstance(job, bytes) else job
        try:
            d = json.loads(raw)
            if now - float(d["seen"]) > JOB_TTL:
                stale.append(job)
                continue
            out[job] = int(d.get("priority") or 0)
        except (ValueError, KeyError, TypeError):
            stale.append(job)
    if stale:
        client.hdel(jobs_key(queue), *stale)
    return out


def weight(priority: int) -> float:
    """A job's weight from ``spec.priority`` (-10..10, default 0): each step up doubles its share."""
    return 2.0 ** priority


@dataclass(frozen=True)
class Share:
    cap: int  # messages this job may keep waiting in the broker
    depth: int  # the queue's target depth (all jobs)
    slots: int  # live worker slots seen
    jobs: int  # jobs sharing the queue


def job_cap(job: str, jobs: Mapping[str, int], slots: int, queued_per_slot: float, min_queued: int,
            max_queued: int) -> Share:
    """This job's cap: its weighted share of ``queued_per_slot x slots`` (at least ``min_queued``,
    at most ``max_queued``). With no worker seen yet the depth is each job's floor: dispatch starts
    small and grows as workers appear."""
    jobs = dict(jobs)
    jobs.setdefault(job, 0)
    total_w = sum(weight(p) for p in jobs.values())
    depth = max(math.ceil(queued_per_slot * slots), min_queued * len(jobs))
    share = depth * weight(jobs[job]) / total_w
    cap = min(max(math.ceil(share), min_queued), max_queued)
    return Share(cap=cap, depth=depth, slots=slots, jobs=len(jobs))
