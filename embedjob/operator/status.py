"""EmbeddingJob status as pure functions of observed counts (no I/O, no kopf).

The timer observes per-shard states in Redis, reduces them to :class:`Observed`, and
:func:`build_status` turns that into the ``status`` block: phase, counters, progress, rate, ETA,
times and conditions in the ``metav1.Condition`` shape. The handler patches only when
:func:`status_patch` finds a difference.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PENDING, RUNNING, SUSPENDED, SUCCEEDED, FAILED = "Pending", "Running", "Suspended", "Succeeded", "Failed"
TERMINAL = (SUCCEEDED, FAILED)

COMPLETE, FAILED_COND, SUSPENDED_COND, SPEC_REFUSED = "Complete", "Failed", "Suspended", "SpecChangeRefused"
DATA_LOSS = "DataLoss"  # True while some finished shard is a truncated or partly unreadable tar

# failedShards is a bounded list: a job with 100,000 broken shards must not blow etcd's object limit.
MAX_FAILED_SHARDS_LISTED = 50
MAX_ERROR_CHARS = 500
MAX_DATA_LOSS_LISTED = 20


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def rfc3339(t: dt.datetime | float) -> str:
    if isinstance(t, int | float):
        t = dt.datetime.fromtimestamp(t, dt.UTC)
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


# -- conditions ----------------------------------------------------------------------------------------
def make_condition(ctype: str, status: bool | str, reason: str, message: str, generation: int | None,
                   now: dt.datetime) -> dict[str, Any]:
    """One condition in metav1.Condition shape."""
    st = status if isinstance(status, str) else ("True" if status else "False")
    cond = {"type": ctype, "status": st, "lastTransitionTime": rfc3339(now), "reason": reason,
            "message": message}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def set_condition(conditions: Iterable[Mapping[str, Any]], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Insert or replace the condition of ``new['type']``. lastTransitionTime moves only when the
    status flips, like Kubernetes' meta.SetStatusCondition."""
    out: list[dict[str, Any]] = []
    replaced = False
    for c in conditions:
        if c.get("type") == new["type"]:
            merged = dict(new)
            if c.get("status") == new["status"] and c.get("lastTransitionTime"):
                merged["lastTransitionTime"] = c["lastTransitionTime"]
            out.append(merged)
            replaced = True
        else:
            out.append(dict(c))
    if not replaced:
        out.append(dict(new))
    return out


def get_condition(conditions: Iterable[Mapping[str, Any]] | None, ctype: str) -> Mapping[str, Any] | None:
    for c in conditions or ():
        if c.get("type") == ctype:
            return c
    return None


# -- observed state ------------------------------------------------------------------------------------
@dataclass
class FailedShard:
    stem: str
    shard: str
    attempts: int
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"stem": self.stem, "shard": self.shard, "attempts": self.attempts,
                "error": (self.error or "")[:MAX_ERROR_CHARS]}


@dataclass
class Observed:
    """What the timer saw: counts per bucket (every planned shard is in exactly one)."""

    total: int
    queued: int = 0  # not yet sent, in the broker, or waiting for a retry's backoff
    running: int = 0
    succeeded: int = 0
    failed: int = 0  # gave up after retries
    images: int = 0  # embedded by succeeded shards (exact, from their results)
    failed_images: int = 0
    images_in_flight: int = 0  # imagesSoFar of running shards (for the rate and the IMAGES column)
    images_this_run: int = 0  # embedded by shards this job ran (not found done when it was planned)
    counts_pending: int = 0  # succeeded shards found done at planning whose manifest is not read yet
    sketches_pending: int = 0  # with score heads: shards whose score sketches are not merged yet
    truncated: list[tuple[str, str]] = field(default_factory=list)  # (stem, tar error) of finished shards
    model: dict[str, Any] | None = None  # what a finished shard's manifest records
    failures: int = 0  # real failures seen (each retry consumed one)
    transient_failures: int = 0  # storage/Redis outages retried without consuming a retry
    lease_expiries: int = 0
    messages_lost: int = 0  # queued shards the safety net found in no queue and re-enqueued
    failed_shards: list[FailedShard] = field(default_factory=list)
    fatal: str = ""  # every shard fails the same way (e.g. storage access denied): fail now

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed


@dataclass(frozen=True)
class Policy:
    """The parts of the spec that decide the phase."""

    max_failed_shards: int = 0
    suspend: bool = False


def decide_phase(obs: Observed, policy: Policy, dispatched: bool) -> tuple[str, str, str]:
    """(phase, reason, message) from the counts alone."""
    if obs.fatal:
        return FAILED, "StorageAccessFailed", f"every shard fails the same way, so the job stops: {obs.fatal}"
    if obs.failed > policy.max_failed_shards:
        return (FAILED, "TooManyFailedShards",
                f"{obs.failed} shard(s) failed after retries, more than maxFailedShards={policy.max_failed_shards}")
    if obs.total > 0 and obs.finished == obs.total and (obs.counts_pending or obs.sketches_pending):
        # Done, but the records would misstate the totals or the scores: finish once all is read.
        reading = []
        if obs.counts_pending:
            reading.append(f"the counts of {obs.counts_pending} shard(s) found done when the job was planned")
        if obs.sketches_pending:
            reading.append(f"the score sketches of {obs.sketches_pending} shard(s)")
        return RUNNING, "ReadingManifests", f"{obs.succeeded}/{obs.total} shards done; reading {' and '.join(reading)}"
    if obs.total > 0 and obs.finished == obs.total:
        extra = f", {obs.failed} failed (allowed: {policy.max_failed_shards})" if obs.failed else ""
        return SUCCEEDED, "AllShardsDone", f"{obs.succeeded}/{obs.total} shards succeeded{extra}"
    if policy.suspend:
        return SUSPENDED, "Suspended", "spec.suspend is true: no new shards are dispatched"
    if dispatched or obs.running or obs.succeeded:
        return RUNNING, "Running", f"{obs.succeeded}/{obs.total} shards done, {obs.running} running"
    return PENDING, "Planned", f"{obs.total} shards planned"


def images_per_second(samples: list[tuple[float, int]], window: float = 60.0) -> float:
    """Rate over the last ``window`` seconds of (monotonic time, images) samples."""
    if len(samples) < 2:
        return 0.0
    t_last, n_last = samples[-1]
    first = next(((t, n) for t, n in samples if t_last - t <= window), samples[0])
    if first == samples[-1]:
        first = samples[-2]
    dt_s = t_last - first[0]
    return round(max(0, n_last - first[1]) / dt_s, 1) if dt_s > 0 else 0.0


def estimate_completion(obs: Observed, started: dt.datetime | None, now: dt.datetime,
                        done_at_start: int = 0) -> str | None:
    """Linear ETA from the shards finished since the job started (shards already done at planning
    time do not count toward the rate)."""
    done_here = obs.finished - done_at_start
    remaining = obs.total - obs.finished
    if not started or done_here <= 0 or remaining <= 0:
        return None
    elapsed = (now - started).total_seconds()
    eta = now + dt.timedelta(seconds=elapsed / done_here * remaining)
    # Rounded so that a steady job does not patch the resource for every second of drift.
    return rfc3339(eta.replace(second=(eta.second // 10) * 10))


def build_status(
    previous: Mapping[str, Any] | None,
    obs: Observed,
    policy: Policy,
    *,
    generation: int | None,
    now: dt.datetime,
    rate: float = 0.0,
    dispatched: bool = True,
) -> dict[str, Any]:
    """The status block for the observed counts. Pure: the same inputs give the same output, and
    fields that did not change keep their values (timestamps included)."""
    prev = dict(previous or {})
    phase, reason, message = decide_phase(obs, policy, dispatched)
    if prev.get("phase") in TERMINAL:  # terminal phases are sticky
        phase = prev["phase"]
    conditions = list(prev.get("conditions") or [])
    conditions = set_condition(conditions, make_condition(
        SUSPENDED_COND, phase == SUSPENDED, "Suspended" if phase == SUSPENDED else "NotSuspended",
        message if phase == SUSPENDED else "dispatch is active" if phase not in TERMINAL else "job finished",
        generation, now))
    # Complete and Failed always agree with the phase: a finished job never keeps "InProgress".
    if phase == SUCCEEDED:
        if prev.get("phase") != SUCCEEDED:
            conditions = set_condition(conditions, make_condition(COMPLETE, True, reason, message, generation, now))
            conditions = set_condition(conditions, make_condition(
                FAILED_COND, False, "Succeeded", f"the job succeeded ({message})", generation, now))
    elif phase == FAILED:
        if prev.get("phase") != FAILED:
            conditions = set_condition(conditions, make_condition(FAILED_COND, True, reason, message, generation, now))
            conditions = set_condition(conditions, make_condition(
                COMPLETE, False, "Failed", f"the job failed: {message}", generation, now))
    else:
        conditions = set_condition(conditions, make_condition(COMPLETE, False, "InProgress", message, generation, now))
        conditions = set_condition(conditions, make_condition(FAILED_COND, False, "InProgress",
                                                              "no failure", generation, now))
    truncated = sorted(obs.truncated)
    if truncated:
        stems = ", ".join(stem for stem, _ in truncated[:5]) + (", ..." if len(truncated) > 5 else "")
        conditions = set_condition(conditions, make_condition(
            DATA_LOSS, True, "TruncatedShards",
            f"{len(truncated)} shard(s) are truncated or partly unreadable tars: the samples after the damage "
            f"are lost ({stems}); spec.onTruncatedShard: fail refuses them, `embedjob run --retry-truncated` "
            "redoes them", generation, now))
    else:
        conditions = set_condition(conditions, make_condition(DATA_LOSS, False, "NoDataLoss",
                                                              "no truncated or unreadable shard", generation, now))
    status: dict[str, Any] = {
        **prev,
        "phase": phase,
        "progress": f"{obs.succeeded}/{obs.total}",
        "shards": {"total": obs.total, "queued": obs.queued, "running": obs.running,
                   "succeeded": obs.succeeded, "failed": obs.failed},
        # embedded: committed by finished shards; soFar adds what running shards have embedded so far
        # (their heartbeat), so the IMAGES column moves within a shard; embeddedThisRun does not count
        # shards found done when the job was planned.
        # countsPending: shards found done at planning whose counts are not read yet (left out). Always
        # there: the status is merge-patched, so a key left out would keep its last value.
        "images": {"embedded": obs.images, "failed": obs.failed_images,
                   "soFar": obs.images + obs.images_in_flight, "embeddedThisRun": obs.images_this_run,
                   "countsPending": obs.counts_pending},
        "dataLoss": {"truncatedShards": len(truncated),
                     "shards": [{"stem": stem, "error": err[:MAX_ERROR_CHARS]}
                                for stem, err in truncated[:MAX_DATA_LOSS_LISTED]]},
        "attempts": {"failures": obs.failures, "transientFailures": obs.transient_failures,
                     "leaseExpiries": obs.lease_expiries, "messagesLost": obs.messages_lost},
        "imagesPerSecond": rate if phase in (RUNNING,) else 0.0,
        "failedShards": [f.to_dict() for f in sorted(obs.failed_shards, key=lambda f: f.stem)]
        [:MAX_FAILED_SHARDS_LISTED],
        "conditions": conditions,
    }
    if obs.failed > MAX_FAILED_SHARDS_LISTED:
        status["failedShardsTruncated"] = obs.failed - MAX_FAILED_SHARDS_LISTED
    else:
        status.pop("failedShardsTruncated", None)
    if obs.model is not None:
        status["model"] = obs.model
    if generation is not None:
        status["observedGeneration"] = generation
    if phase in TERMINAL:
        status.setdefault("completionTime", rfc3339(now))
        status.pop("estimatedCompletionTime", None)
        # A finished job shows its average rate over the run rather than a meaningless 0: the images
        # this run embedded (shards found done when it was planned are not its work).
        started, finished = parse_rfc3339(status.get("startTime")), parse_rfc3339(status["completionTime"])
        if started and finished and finished > started:
            status["imagesPerSecond"] = round(obs.images_this_run / (finished - started).total_seconds(), 1)
    else:
        status.pop("completionTime", None)
        eta = estimate_completion(obs, parse_rfc3339(prev.get("startTime")), now,
                                  int((prev.get("plan") or {}).get("doneAtStart", 0)))
        if eta and phase == RUNNING:
            status["estimatedCompletionTime"] = eta
        else:
            status.pop("estimatedCompletionTime", None)
    return status


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level status fields that differ (``None`` deletes a field): an empty dict means
    "nothing to patch"."""
    current = dict(current or {})
    patch: dict[str, Any] = {k: v for k, v in desired.items() if current.get(k) != v}
    for k in current:
        if k not in desired and k in _OWNED:
            patch[k] = None
    return patch


_OWNED = {"phase", "progress", "shards", "images", "attempts", "imagesPerSecond", "failedShards", "dataLoss", "model",
          "failedShardsTruncated", "conditions", "observedGeneration", "completionTime",
          "estimatedCompletionTime", "startTime", "plan"}


def invalid_status(previous: Mapping[str, Any] | None, reason: str, message: str, generation: int | None,
                   now: dt.datetime) -> dict[str, Any]:
    """The status of a job refused before any work (invalid spec, nothing to plan)."""
    prev = dict(previous or {})
    conditions = set_condition(prev.get("conditions") or [],
                               make_condition(FAILED_COND, True, reason, message, generation, now))
    conditions = set_condition(conditions, make_condition(COMPLETE, False, reason, "not started", generation, now))
    out = {**prev, "phase": FAILED, "conditions": conditions, "completionTime": prev.get("completionTime")
           or rfc3339(now)}
    if generation is not None:
        out["observedGeneration"] = generation
    return out
