"""Worker announcements, the writing half of fair dispatch: each consumer announces its slots in
Redis (``embedjob:workers:<queue>``, a sorted set of ``<worker>|<slots>`` by last-seen time) and
withdraws them when it shuts down. The operator sizes each job's share of the queue from the live
slots (the reading half: :mod:`embedjob.fairness`)."""

from __future__ import annotations

import logging
import time

import redis

from embedjob.fairness import workers_key
from embedjob.progress import redis_client

log = logging.getLogger("embedjob.worker")


class WorkersRegistry:
    """This worker's entries in the announcement sets, written through its own Redis client with
    short timeouts (it is called from inside the consumer loop, which must never block long)."""

    def __init__(self, client: redis.Redis | None = None) -> None:
        self.members: list[tuple[str, str]] = []
        self.last = 0.0
        self._client = client

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            # With the password and TLS settings, like every other client (a bare URL is refused by a
            # protected Redis, and the operator would never see this worker's slots).
            self._client = redis_client(socket_timeout=2, connect_timeout=2)
        return self._client

    def announce(self, queues: list[str], name: str, slots: int) -> None:
        """Announce ``slots`` on each queue, at most every 5 s; never fails (the operator falls back
        to its floor)."""
        if time.monotonic() - self.last < 5:
            return
        self.last = time.monotonic()
        self.members = [(workers_key(q), f"{name}|{slots}") for q in queues]
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, member in self.members:
                pipe.zadd(key, {member: time.time()})
            pipe.execute()
        except Exception as e:  # noqa: BLE001 - the operator falls back to its floor
            log.debug("could not announce the worker: %s", e)

    def leave(self) -> None:
        """Withdraw the announced slots (warm shutdown)."""
        try:
            for key, member in self.members:
                self.client.zrem(key, member)
        except Exception as e:  # noqa: BLE001
            log.debug("could not withdraw the worker: %s", e)


# The worker process's registry: the consumer bootstep announces through it, shutdown withdraws.
workers_registry = WorkersRegistry()
