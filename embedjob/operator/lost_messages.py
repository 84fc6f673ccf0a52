"""The safety net for lost messages: a level-triggered comparison of what Redis says is queued with
what the broker really holds.

A shard recorded ``queued`` must be, at any moment, in one of three places: its message waiting in
the queue's lists, its message delivered to a worker (kombu's ``unacked`` hash), or leased by the
worker embedding it. One that is in none of them for ``grace`` seconds (checked several times in
between, so a message moving from the list to a consumer is never mistaken for a lost one) has
lost its message, whatever the cause: a worker that acknowledged without recording an outcome, a
queue flushed by hand, a bug not found yet. It is re-enqueued. A delivered message whose shard
shows no lease long after delivery (``stale`` seconds) counts as lost too: the consumer holding it
is not working on it. A duplicate message costs nothing (the worker drops it: lease or manifest).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from embedjob.contract import task_id
from embedjob.progress import ProgressStore


class LostMessages:
    """Per-job memory of queued shards seen nowhere in the broker. ``grace``: seconds a shard must be
    missing (settings.lost_message_grace); ``lease``: the lease period (a delivered message whose
    shard shows no lease for max(4 grace, 2 leases) is stale)."""

    def __init__(self, grace: float, lease: float) -> None:
        self.grace = grace
        self.stale = max(4 * grace, 2.0 * lease)
        self.missing: dict[str, float] = {}  # stem -> monotonic time first seen missing
        self._next_check = 0.0

    def check(self, store: ProgressStore, queue: str, states: Mapping[str, str]) -> list[str]:
        """Stems whose message is lost (to be re-enqueued). Cheap between checks: the broker is
        read about four times per grace period, and only when some shard is queued."""
        queued = [s for s, v in states.items() if v == "queued"]
        if not queued:
            self.missing.clear()
            return []
        now = time.monotonic()
        if now < self._next_check:
            return []
        self._next_check = now + max(0.5, self.grace / 4)
        infos = store.infos(queued)
        expected = {task_id(store.job, s, int(infos[s]["dispatch"])): s for s in queued if infos[s].get("dispatch")}
        waiting, delivered = store.broker_snapshot(queue)
        leased = store.live_leases(queued)
        wall = time.time()
        lost: list[str] = []
        seen: set[str] = set()
        for tid, stem in expected.items():
            if tid in waiting or stem in leased:
                continue
            if tid in delivered and wall - delivered[tid] < self.stale:
                continue
            seen.add(stem)
            if now - self.missing.setdefault(stem, now) >= self.grace:
                lost.append(stem)
        self.missing = {s: t for s, t in self.missing.items() if s in seen and s not in lost}
        return sorted(lost)
