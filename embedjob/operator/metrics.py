"""The operator's Prometheus metrics (``/metrics`` on ``EMBEDJOB_METRICS_PORT``, next to the liveness
endpoint).

Per-job series come from the status each tick computes (so they equal ``kubectl get ej -o yaml``
exactly, survive an operator restart, and never need a second read of Redis): the collector keeps
the latest status of every job and renders it at scrape time. Labels are ``namespace`` and ``name``
only, never a shard or an image; a deleted job's series disappear with it (:meth:`forget`).

The number KEDA scales the workers on is ``embedjob_queue_demand_shards{queue}``: shards waiting
(not sent yet, in the broker, or waiting for a retry) plus shards running, summed over the jobs on
that queue. Unlike the broker list length (``embedjob_queue_messages``) it does not fall to zero
while workers still hold shards, so a scale-down on it never takes a busy worker's reason to exist.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from embedjob.broker import queue_lengths

log = logging.getLogger("embedjob.operator")

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")  # embedjob.operator.status
SHARD_STATES = ("queued", "running", "succeeded", "failed")
DEFAULT_QUEUE = "embedjob"
# (metric, help, status path) for per-job counters taken from the status.
_JOB_COUNTERS = (
    # This run's work only: shards found done when the job was planned are counted into status.images.embedded
    # over its first ticks (embedjob.operator.done_before), which a rate() would show as a burst.
    ("embedjob_job_images_embedded", "Images embedded by the shards this job ran "
                                     "(status.images.embeddedThisRun).", ("images", "embeddedThisRun")),
    ("embedjob_job_images_skipped", "Images skipped and recorded in the job's shard manifests "
                                    "(status.images.failed).", ("images", "failed")),
    ("embedjob_job_shard_failures", "Failed shard attempts that consumed a retry (status.attempts.failures).",
     ("attempts", "failures")),
    ("embedjob_job_shard_transient_failures", "Shard attempts that hit a transient error (storage or Redis "
                                              "outage) and were retried for free.", ("attempts", "transientFailures")),
    ("embedjob_job_lease_expiries", "Shards whose worker died (lease expired) and that were re-enqueued.",
     ("attempts", "leaseExpiries")),
    ("embedjob_job_messages_lost", "Queued shards found in no queue and re-enqueued by the safety net.",
     ("attempts", "messagesLost")),
)


@dataclass
class _Job:
    uid: str
    queue: str
    status: Mapping[str, Any]
    dispatched: int = 0


def _num(status: Mapping[str, Any], *path: str) -> float:
    v: Any = status
    for p in path:
        v = v.get(p) if isinstance(v, Mapping) else None
    try:
        return float(v or 0)
    except (TypeError, ValueError):
        return 0.0


def demand(status: Mapping[str, Any]) -> int:
    """Shards of one job that need a worker now or later: waiting + running (0 when finished; only
    the running ones while suspended, since nothing new is dispatched)."""
    phase = status.get("phase")
    if phase in ("Succeeded", "Failed") or not status.get("shards"):
        return 0
    running = int(_num(status, "shards", "running"))
    if phase == "Suspended":
        return running
    return running + int(_num(status, "shards", "queued"))


class JobsCollector(Collector):
    """Renders the latest status of every job at scrape time (and the broker's queue lengths)."""

    def __init__(self, redis: Any = None) -> None:
        self.redis = redis
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._lock = threading.Lock()

    # -- fed by the handlers -----------------------------------------------------------------------------
    def update(self, namespace: str, name: str, uid: str, queue: str | None, status: Mapping[str, Any],
               dispatched: int = 0) -> None:
        with self._lock:
            job = self._jobs.get((namespace, name))
            if job is None or job.uid != uid:  # a new job under a reused name starts from zero
                job = self._jobs[(namespace, name)] = _Job(uid, queue or DEFAULT_QUEUE, {})
            job.queue, job.status = queue or DEFAULT_QUEUE, dict(status)
            job.dispatched += dispatched

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._jobs.pop((namespace, name), None)

    # -- scrape ----------------------------------------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        with self._lock:
            jobs = {k: _Job(j.uid, j.queue, dict(j.status), j.dispatched) for k, j in self._jobs.items()}
        by_phase = GaugeMetricFamily("embedjob_jobs", "EmbeddingJobs by phase.", labels=["phase"])
        counts = dict.fromkeys(PHASES, 0)
        for j in jobs.values():
            phase = str(j.status.get("phase") or "Pending")
            counts[phase] = counts.get(phase, 0) + 1
        for phase, n in counts.items():
            by_phase.add_metric([phase], n)
        yield by_phase

        lbl = ["namespace", "name"]
        info = GaugeMetricFamily("embedjob_job_info", "One per job: its uid and queue (join on namespace, name).",
                                 labels=[*lbl, "uid", "queue"])
        phase = GaugeMetricFamily("embedjob_job_phase", "1 for the job's current phase.", labels=[*lbl, "phase"])
        shards = GaugeMetricFamily("embedjob_job_shards", "The job's shards by state (status.shards).",
                                   labels=[*lbl, "state"])
        truncated = GaugeMetricFamily("embedjob_job_truncated_shards", "Finished shards that are truncated or partly "
                                      "unreadable tars: samples after the damage are lost "
                                      "(status.dataLoss.truncatedShards).", labels=lbl)
        planned = GaugeMetricFamily("embedjob_job_planned_shards", "Shards in the job's plan (status.shards.total).",
                                    labels=lbl)
        eta = GaugeMetricFamily("embedjob_job_estimated_completion_timestamp_seconds",
                                "When the job should finish at its current pace (status.estimatedCompletionTime).",
                                labels=lbl)
        dispatched = CounterMetricFamily("embedjob_job_shards_dispatched", "Shard tasks this operator process "
                                         "sent under a new task id (first runs, retries, re-enqueues).", labels=lbl)
        counters = [(CounterMetricFamily(n, h, labels=lbl), path) for n, h, path in _JOB_COUNTERS]
        demand_by_queue: dict[str, int] = {DEFAULT_QUEUE: 0}
        for (ns, name), j in sorted(jobs.items()):
            st = j.status
            info.add_metric([ns, name, j.uid, j.queue], 1)
            current = str(st.get("phase") or "Pending")
            for p in PHASES:
                phase.add_metric([ns, name, p], 1 if p == current else 0)
            for s in SHARD_STATES:
                shards.add_metric([ns, name, s], _num(st, "shards", s))
            planned.add_metric([ns, name], _num(st, "shards", "total"))
            truncated.add_metric([ns, name], _num(st, "dataLoss", "truncatedShards"))
            when = _timestamp(st.get("estimatedCompletionTime"))
            if when is not None:
                eta.add_metric([ns, name], when)
            dispatched.add_metric([ns, name], j.dispatched)
            for family, path in counters:
                family.add_metric([ns, name], _num(st, *path))
            demand_by_queue[j.queue] = demand_by_queue.get(j.queue, 0) + demand(st)
        yield from (info, phase, shards, planned, truncated, eta, dispatched)
        yield from (family for family, _ in counters)

        d = GaugeMetricFamily("embedjob_queue_demand_shards", "Shards waiting or running over all jobs on the "
                              "queue: what KEDA scales the workers on (not the broker list length, which "
                              "misses the shards workers hold).", labels=["queue"])
        for q, n in sorted(demand_by_queue.items()):
            d.add_metric([q], n)
        yield d
        if self.redis is not None:
            yield self._queue_lengths(sorted(demand_by_queue))

    def _queue_lengths(self, queues: list[str]) -> GaugeMetricFamily:
        m = GaugeMetricFamily("embedjob_queue_messages", "Messages waiting in the broker's queue lists (LLEN "
                              "over the priority lists; delivered messages are not counted).", labels=["queue"])
        try:
            for q, n in queue_lengths(self.redis, queues).items():
                m.add_metric([q], n)
        except Exception as e:  # noqa: BLE001 - Redis down: the series is absent, the scrape still works
            log.debug("queue lengths unavailable: %s", e)
        return m


def _timestamp(rfc3339: Any) -> float | None:
    from embedjob.operator.status import parse_rfc3339

    try:
        t = parse_rfc3339(rfc3339) if rfc3339 else None
    except ValueError:
        return None
    return t.timestamp() if t else None


class OperatorMetrics:
    """Everything the operator exports, in its own registry."""

    def __init__(self, redis: Any = None) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.jobs = JobsCollector(redis)
        self.registry.register(self.jobs)
        self.tick_seconds = Histogram(
            "embedjob_operator_reconcile_duration_seconds", "Duration of one job's reconcile tick.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.tick_errors = Counter("embedjob_operator_reconcile_errors", "Ticks that failed (and were retried).",
                                   registry=self.registry)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)
