"""Per-shard progress and leases in Redis, shared by workers (writers) and the operator (reader).
Torch-free.

Keys, all under ``embedjob:<job>:`` (``<job>`` is the resource uid or a local job id)::

    state           hash  stem -> pending | queued | running | succeeded | failed
    info            hash  stem -> JSON {attempts, leaseExpiries, error, images, failedImages, ...}
    lease:<stem>    str   worker id, with a TTL the worker renews by heartbeat
    executions      hash  stem -> how many times a worker actually started embedding it
    commits         hash  "<stem> <commit id>" -> 1: each time a worker committed its outputs (manifest
                    written); one field per commit, so recording it again after a lost reply
                    (Redis died after applying it) does not count it twice
    control         str   "" | "suspended" | "deleted" (workers drop tasks of a stopped job)

Operator-owned (embedjob.operator.reconcile): ``spec`` (the accepted spec, JSON), ``plan`` (the
planned shards, JSON, written last: its absence means Redis lost the job), ``totals`` (hash of
failures / lease expiries counted).

The object store stays the source of truth (a shard is done when its manifest exists); this is
the fast view, and it can be rebuilt from the manifests if Redis loses it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from embedjob import settings

PREFIX = "embedjob"
STATES = ("pending", "queued", "running", "succeeded", "failed")

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
        pipe.hset(self.key("state"), stem, state)
        if commit:
            pipe.hset(self.key("commits"), f"{stem} {commit}", 1)
        if info:
            current = self.info(stem)
            current.update(info)
            current["updated"] = time.time()
            pipe.hset(self.key("info"), stem, json.dumps(current))
        pipe.execute()

    def set_state_if(self, stem: str, expected: str, state: str) -> bool:
        """Compare-and-set: move ``stem`` to ``state`` only if it is still ``expected`` (so the
        operator's "queued" never overwrites a worker's "running")."""
        assert state in STATES, state
        return bool(self.r.eval(_SET_IF, 1, self.key("state"), stem, expected, state))

    def states(self) -> dict[str, str]:
        return self.r.hgetall(self.key("state"))

    def state(self, stem: str) -> str | None:
        return self.r.hget(self.key("state"), stem)

    def info(self, stem: str) -> dict[str, Any]:
        raw = self.r.hget(self.key("info"), stem)
        return json.loads(raw) if raw else {}

    def infos(self, stems: list[str]) -> dict[str, dict[str, Any]]:
        """Info of many stems (one round trip per 1000)."""
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(stems), 1000):
            chunk = stems[i : i + 1000]
            for s, raw in zip(chunk, self.r.hmget(self.key("info"), chunk), strict=True):
                out[s] = json.loads(raw) if raw else {}
        return out

    def update_info(self, stem: str, **info: Any) -> dict[str, Any]:
        current = self.info(stem)
        current.update(info)
        current["updated"] = time.time()
        self.r.hset(self.key("info"), stem, json.dumps(current))
        return current

    def count_execution(self, stem: str) -> int:
        return int(self.r.hincrby(self.key("executions"), stem, 1))

    def executions(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(self.key("executions")).items()}

    def commits(self) -> dict[str, int]:
        """How many times each shard's outputs were committed by a worker (1 each, normally)."""
        counts: dict[str, int] = {}
        for field in self.r.hkeys(self.key("commits")):
            stem = field.rsplit(" ", 1)[0]
            counts[stem] = counts.get(stem, 0) + 1
        return counts

    # -- leases ----------------------------------------------------------------------------------
    def acquire_lease(self, stem: str, owner: str, ttl: float | None = None) -> bool:
        ms = int((ttl or self.lease_seconds) * 1000)
        return bool(self.r.set(self.key(f"lease:{stem}"), owner, nx=True, px=ms))

    def renew_lease(self, stem: str, owner: str, ttl: float | None = None) -> bool:
        ms = int((ttl or self.lease_seconds) * 1000)
        return bool(self.r.eval(_RENEW, 1, self.key(f"lease:{stem}"), owner, ms))

    def release_lease(self, stem: str, owner: str) -> None:
        self.r.eval(_RELEASE, 1, self.key(f"lease:{stem}"), owner)

    def lease_owner(self, stem: str) -> str | None:
        return self.r.get(self.key(f"lease:{stem}"))

    def live_leases(self, stems: list[str]) -> set[str]:
        """The subset of ``stems`` whose lease is alive (one round trip per 1000 stems)."""
        alive: set[str] = set()
        for i in range(0, len(stems), 1000):
            chunk = stems[i : i + 1000]
            vals = self.r.mget([self.key(f"lease:{s}") for s in chunk])
            alive.update(s for s, v in zip(chunk, vals, strict=True) if v)
        return alive

    # -- control ---------------------------------------------------------------------------------
    def set_control(self, value: str, ttl: int | None = None) -> None:
        self.r.set(self.key("control"), value, ex=ttl)

    def control(self) -> str:
        return self.r.get(self.key("control")) or ""

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
