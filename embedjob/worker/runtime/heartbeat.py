"""A shard's hold on Redis: retrying through an outage, the lease and its heartbeat.

:func:`with_redis` waits out a Redis restart or failover (bounded, then :class:`Redeliver`: the
message goes back to the broker). A shard runs under a lease owned by :func:`worker_id`;
:class:`Heartbeat` renews it and publishes images-so-far while the shard runs, and
:func:`release_lease` lets it go once the outcome is recorded.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import redis

from embedjob import settings as settings_module
from embedjob.progress import ProgressStore

log = logging.getLogger("embedjob.worker")
T = TypeVar("T")

# This process's name as a lease owner (and in every log line of its shards).
_worker_id: tuple[int, str] | None = None


def worker_id() -> str:
    """This process's identity as a lease owner: host, pid and a random part. Made in the process that
    asks, so each prefork pool child (forked after the modules were imported) has its own."""
    global _worker_id
    if _worker_id is None or _worker_id[0] != os.getpid():
        _worker_id = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    return _worker_id[1]
_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class Redeliver(Exception):  # noqa: N818 - an instruction, not an error report
    """Redis stayed unreachable: nothing could be recorded, so the message goes back to the broker
    (Celery ``Reject(requeue=True)``; if even that fails, the operator's safety net re-enqueues)."""


def with_redis(fn: Callable[[], T], what: str, budget: float | None = None) -> T:
    """``fn()``, retried while Redis is unreachable (restart, failover), for at most ``budget``
    seconds (settings.redis_wait_seconds); then :class:`Redeliver`. Every retry is logged."""
    budget = settings_module.load().redis_wait_seconds if budget is None else budget
    deadline = time.monotonic() + budget
    delay = 0.25
    while True:
        try:
            return fn()
        except _REDIS_ERRORS as e:
            if time.monotonic() + delay > deadline:
                raise Redeliver(f"Redis unreachable for {budget:.0f}s while {what}: {e}") from e
            log.warning("Redis unreachable while %s (%s); retrying in %.1fs", what, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


PROGRESS_SECONDS = 5.0


class Heartbeat(threading.Thread):
    """Renews the shard lease and publishes images-so-far until stopped. A lease that vanished with
    Redis's data (a restart) is taken again; only a lease held by another worker counts as lost."""

    def __init__(self, store: ProgressStore, stem: str, owner: str) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{stem}")
        self.store, self.stem, self.owner = store, stem, owner
        self.images = 0
        self.lost = threading.Event()
        self._halt = threading.Event()
        # Often enough for the lease (a quarter of it) and for the progress `kubectl get ej` shows within
        # a shard (images so far: at most PROGRESS_SECONDS old); two cheap Redis writes a beat.
        self.interval = max(min(store.lease_seconds / 4, PROGRESS_SECONDS), 0.5)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                if not self.store.renew_lease(self.stem, self.owner) and \
                        not self.store.acquire_lease(self.stem, self.owner):
                    self.lost.set()
                    log.warning("lease on %s lost to %s", self.stem, self.store.lease_owner(self.stem))
                    return
                self.store.update_info(self.stem, imagesSoFar=self.images)
            except Exception as e:  # noqa: BLE001 - a Redis blip must not kill the shard; next beat retries
                log.warning("heartbeat for %s failed: %s", self.stem, e)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)


def release_lease(store: ProgressStore, stem: str, owner: str) -> None:
    """Let the lease go (after the outcome is recorded); never fails: an unreleased lease expires."""
    try:
        store.release_lease(stem, owner)
    except Exception as e:  # noqa: BLE001 - it expires by itself; the outcome is what counts
        log.warning("could not release the lease on %s: %s", stem, e)
