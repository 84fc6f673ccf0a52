"""The owner of embedjob's Redis keys, :class:`ProgressStore`: per-shard progress and leases (written by
workers, read by the operator), the operator's own per-job keys, and, through its methods, the
per-queue keys of fair dispatch and the broker's lists (the operator has no other way to Redis; a
worker's slot announcement is the one key written elsewhere, embedjob.worker.runtime). Torch-free.

Keys, all under ``embedjob:<job>:`` (``<job>`` is the resource uid or a local job id)::

    state           hash  stem -> pending | queued | running | succeeded | failed
    info            hash  stem -> JSON {attempts, leaseExpiries, error, images, failedImages, ...}
    lease:<stem>    str   worker id, with a TTL the worker renews by heartbeat
    executions      hash  stem -> how many times a worker actually started embedding it
    commits         hash  "<stem> <commit id>" -> 1: each time a worker committed its outputs (manifest
                    written); one field per commit, so recording it again after a lost reply
                    (Redis died after applying it) does not count it twice
    control         str   "" | "suspended" | "deleted" (workers drop tasks of a stopped job)

Operator-owned: ``spec`` (the accepted spec, JSON) and ``plan`` (the planned shards, JSON, written last:
its absence means Redis lost the job), both by embedjob.operator.accept; ``totals`` (hash of failures,
transient failures, lease expiries and lost messages counted, by embedjob.operator.failures, .leases
and .reconcile) and ``accessErrors`` (hash stem -> the access error of its last attempt, by
embedjob.operator.failures). Per queue: the fair-dispatch keys (embedjob.fairness) and the broker's
lists (embedjob.broker). docs/architecture.md ("Redis keys") says who writes and reads each, and
how long it lives.

The object store stays the source of truth (a shard is done when its manifest exists); this is
the fast view, and it can be rebuilt from the manifests if Redis loses it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from embedjob import broker, fairness, settings
from embedjob.contract import task_id_prefix

PREFIX = "embedjob"
STATES = ("pending", "queued", "running", "succeeded", "failed")

# The per-job keys (under ``embedjob:<job>:``); the per-queue ones are fairness.workers_key / jobs_key.
STATE = "state"
INFO = "info"
EXECUTIONS = "executions"
COMMITS = "commits"
CONTROL = "control"
SPEC = "spec"
PLAN = "plan"
TOTALS = "totals"
ACCESS_ERRORS = "accessErrors"
REPORT = "report"  # the report task's outcome (spec.output.report): {"state", "uri" | "error", "at"}
TOTAL_NAMES = ("failures", "transientFailures", "leaseExpiries", "messagesLost")


def lease_key(stem: str) -> str:
    return f"lease:{stem}"

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_SET_IF = """
if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('hset', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def redis_client(url: str | None = None, config: settings.Settings | None = None, *,
                 socket_timeout: float = 30, connect_timeout: float = 5) -> redis.Redis:
    """A client for ``url`` as given, or (default) for the settings' Redis: ``EMBEDJOB_REDIS_URL`` with
    ``EMBEDJOB_REDIS_PASSWORD`` composed in and, for ``rediss://``, the certificate checked against
    ``EMBEDJOB_REDIS_CA_FILE``. Every client of the programs comes from here."""
    extra: dict[str, Any] = {}
    if url is None:
        config = config or settings.load()
        url = config.redis_connection_url
        extra = config.redis_ssl_options() or {}
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=socket_timeout,
                                socket_connect_timeout=connect_timeout,
                                health_check_interval=30, **extra)


class ProgressStore:
    """Read and write one job's shard states, info and leases. ``lease_seconds``: the lease period
    (default: the settings' ``EMBEDJOB_LEASE_SECONDS``)."""

    def __init__(self, client: redis.Redis, job_id: str, lease_seconds: float | None = None) -> None:
        self.r = client
        self.job = job_id
        self.prefix = f"{PREFIX}:{job_id}:"
        self.lease_seconds = lease_seconds if lease_seconds is not None else settings.load().lease_seconds

    def key(self, name: str) -> str:
        return self.prefix + name

    # -- state -----------------------------------------------------------------------------------
    def set_state(self, stem: str, state: str, *, commit: str = "", **info: Any) -> None:
        """Set the state (and merge ``info``) in one transaction; ``commit`` (an id unique to one
        execution) also records one commit of the shard's outputs (the ``commits`` hash:
        exactly-once is checkable). Idempotent: a retry with the same id counts once."""
        assert state in STATES, state
        pipe = self.r.pipeline()
        pipe.hset(self.key(STATE), stem, state)
        if commit:
            pipe.hset(self.key(COMMITS), f"{stem} {commit}", 1)
        if info:
            current = self.info(stem)
            current.update(info)
            current["updated"] = time.time()
            pipe.hset(self.key(INFO), stem, json.dumps(current))
        pipe.execute()

    def set_state_if(self, stem: str, expected: str, state: str) -> bool:
        """Compare-and-set: move ``stem`` to ``state`` only if it is still ``expected`` (so the
        operator's "queued" never overwrites a worker's "running")."""
        assert state in STATES, state
        return bool(self.r.eval(_SET_IF, 1, self.key(STATE), stem, expected, state))

    def states(self) -> dict[str, str]:
        return self.r.hgetall(self.key(STATE))

    def state(self, stem: str) -> str | None:
        return self.r.hget(self.key(STATE), stem)

    def info(self, stem: str) -> dict[str, Any]:
        raw = self.r.hget(self.key(INFO), stem)
        return json.loads(raw) if raw else {}

    def infos(self, stems: list[str]) -> dict[str, dict[str, Any]]:
        """Info of many stems (one round trip per 1000)."""
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(stems), 1000):
            chunk = stems[i : i + 1000]
            for s, raw in zip(chunk, self.r.hmget(self.key(INFO), chunk), strict=True):
                out[s] = json.loads(raw) if raw else {}
        return out

    def update_info(self, stem: str, **info: Any) -> dict[str, Any]:
        return self.update_infos({stem: info})[stem]

    def update_infos(self, updates: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """:meth:`update_info` of many stems (two round trips per 1000); returns their new infos."""
        out = self.infos(list(updates))
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        for stem, info in updates.items():
            out[stem].update(info)
            out[stem]["updated"] = now
            pipe.hset(self.key(INFO), stem, json.dumps(out[stem]))
        pipe.execute()
        return out

    def count_execution(self, stem: str) -> int:
        return int(self.r.hincrby(self.key(EXECUTIONS), stem, 1))

    def executions(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(self.key(EXECUTIONS)).items()}

    def commits(self) -> dict[str, int]:
        """How many times each shard's outputs were committed by a worker (1 each, normally)."""
        counts: dict[str, int] = {}
        for field in self.r.hkeys(self.key(COMMITS)):
            stem = field.rsplit(" ", 1)[0]
            counts[stem] = counts.get(stem, 0) + 1
        return counts

    # -- leases ----------------------------------------------------------------------------------
    def acquire_lease(self, stem: str, owner: str, ttl: float | None = None) -> bool:
        ms = int((ttl or self.lease_seconds) * 1000)
        return bool(self.r.set(self.key(lease_key(stem)), owner, nx=True, px=ms))

    def renew_lease(self, stem: str, owner: str, ttl: float | None = None) -> bool:
        ms = int((ttl or self.lease_seconds) * 1000)
        return bool(self.r.eval(_RENEW, 1, self.key(lease_key(stem)), owner, ms))

    def release_lease(self, stem: str, owner: str) -> None:
        self.r.eval(_RELEASE, 1, self.key(lease_key(stem)), owner)

    def lease_owner(self, stem: str) -> str | None:
        return self.r.get(self.key(lease_key(stem)))

    def live_leases(self, stems: list[str]) -> set[str]:
        """The subset of ``stems`` whose lease is alive (one round trip per 1000 stems)."""
        alive: set[str] = set()
        for i in range(0, len(stems), 1000):
            chunk = stems[i : i + 1000]
            vals = self.r.mget([self.key(lease_key(s)) for s in chunk])
            alive.update(s for s, v in zip(chunk, vals, strict=True) if v)
        return alive

    def set_pending(self, infos: Mapping[str, Mapping[str, Any]]) -> None:
        """Record the dispatch intent of many shards at once: state ``pending`` and each one's whole
        ``info`` (stamped ``updated``), in one round trip (embedjob.operator.dispatch)."""
        pipe = self.r.pipeline(transaction=False)
        for stem, info in infos.items():
            pipe.hset(self.key(STATE), stem, "pending")
            pipe.hset(self.key(INFO), stem, json.dumps({**info, "updated": time.time()}))
        pipe.execute()

    # -- the accepted job (operator) ---------------------------------------------------------------
    def save_plan(self, raw_spec: Mapping[str, Any], plan: Sequence[tuple[str, str]],
                  done: Mapping[str, Mapping[str, Any]]) -> None:
        """Record an accepted job: its spec, the shards already ``done`` (stem -> counts from their
        manifests) as succeeded, then the ``plan`` (``[(stem, uri), ...]``) LAST: a job whose plan is
        missing is one Redis lost."""
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.key(SPEC), json.dumps(dict(raw_spec)))
        now = time.time()
        for stem, counts in done.items():
            pipe.hset(self.key(STATE), stem, "succeeded")
            pipe.hset(self.key(INFO), stem, json.dumps({**counts, "updated": now}))
        pipe.execute()
        self.r.set(self.key(PLAN), json.dumps([[stem, uri] for stem, uri in plan]))

    def has_plan(self) -> bool:
        return bool(self.r.exists(self.key(PLAN)))

    def plan(self) -> list[tuple[str, str]] | None:
        """The recorded plan, None when Redis has none."""
        raw = self.r.get(self.key(PLAN))
        return None if raw is None else [(stem, uri) for stem, uri in json.loads(raw)]

    def accepted_spec(self) -> dict[str, Any] | None:
        """The accepted spec as recorded, None when Redis has none."""
        raw = self.r.get(self.key(SPEC))
        return None if raw is None else json.loads(raw)

    # -- the report task (worker writes, operator reads) ----------------------------------------------
    def record_report(self, state: str, **fields: Any) -> None:
        """The report task's outcome: ``Written`` (with ``uri``) or ``Failed`` (with ``error``)."""
        assert state in ("Written", "Failed"), state
        self.r.set(self.key(REPORT), json.dumps({"state": state, **fields, "at": time.time()}))

    def report_outcome(self) -> dict[str, Any] | None:
        raw = self.r.get(self.key(REPORT))
        return None if raw is None else json.loads(raw)

    # -- totals and the fail-fast check (operator) ---------------------------------------------------
    def count_total(self, name: str, n: int = 1) -> None:
        """Add ``n`` to one of the job's running totals (``TOTAL_NAMES``)."""
        assert name in TOTAL_NAMES, name
        self.r.hincrby(self.key(TOTALS), name, n)

    def totals(self) -> dict[str, int]:
        """Every total counted so far (absent names: 0)."""
        raw = self.r.hgetall(self.key(TOTALS))
        return {name: int(raw.get(name) or 0) for name in TOTAL_NAMES}

    def record_access_error(self, stem: str, code: Any, error: Any) -> None:
        """The access error ``stem``'s last attempt failed with (the job's fail-fast check)."""
        self.r.hset(self.key(ACCESS_ERRORS), stem, json.dumps(
            {"accessError": True, "errorCode": code, "error": error}))

    def access_errors(self) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.r.hvals(self.key(ACCESS_ERRORS))]

    # -- the job's queue: fair dispatch (embedjob.fairness) and the broker (embedjob.broker) -----------
    def register_job(self, queue: str, priority: int) -> None:
        """Announce this job as having work on ``queue`` (refreshed every tick)."""
        fairness.register_job(self.r, queue, self.job, priority)

    def unregister_job(self, queue: str) -> None:
        fairness.unregister_job(self.r, queue, self.job)

    def active_jobs(self, queue: str) -> dict[str, int]:
        """job -> priority of the jobs with work on ``queue``."""
        return fairness.active_jobs(self.r, queue)

    def live_slots(self, queue: str) -> int:
        """Shards the live workers consuming ``queue`` run at once."""
        return fairness.live_slots(self.r, queue)

    def remove_queued_tasks(self, queue: str) -> int:
        """Delete this job's messages still waiting in ``queue``; returns how many."""
        return broker.remove_queued_tasks(self.r, queue, task_id_prefix(self.job))

    def broker_snapshot(self, queue: str) -> tuple[set[str], dict[str, float]]:
        """This job's task ids the broker holds: (waiting, delivered -> delivery time)."""
        return broker.broker_snapshot(self.r, queue, task_id_prefix(self.job))

    # -- control ---------------------------------------------------------------------------------
    def set_control(self, value: str, ttl: int | None = None) -> None:
        self.r.set(self.key(CONTROL), value, ex=ttl)

    def control(self) -> str:
        return self.r.get(self.key(CONTROL)) or ""

    def delete_all(self, keep: tuple[str, ...] = ()) -> int:
        """Remove every key of this job (except the names in ``keep``, e.g. ``control``)."""
        n = 0
        batch = []
        kept = {self.key(k) for k in keep}
        for k in self.r.scan_iter(match=self.prefix + "*", count=1000):
            if k in kept:
                continue
            batch.append(k)
            if len(batch) >= 1000:
                n += self.r.delete(*batch)
                batch = []
        if batch:
            n += self.r.delete(*batch)
        return n
