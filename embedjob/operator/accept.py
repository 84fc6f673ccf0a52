"""Accepting a job: validate the spec (the schema's rules again, plus semantic ones), plan its shards,
and record the plan in Redis before anything is enqueued.

Redis keys written here, under ``embedjob:<uid>:``: ``spec`` (the accepted spec, JSON) and ``plan``
(``[[stem, uri], ...]``, written LAST: a resource whose status says "planned" while ``plan`` is
missing means Redis lost the job, see embedjob.operator.recovery). Shards whose manifest already
exists are recorded ``succeeded``, their counts pending (the ticks read them a slice at a time,
embedjob.operator.done_before): a rerun redoes nothing, and starts at once however many are done.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from embedjob import limits
from embedjob.access import AccessPolicy, StorageNotAllowed
from embedjob.operator import status
from embedjob.operator.changes import spec_hash
from embedjob.operator.events import Event
from embedjob.planning import PlanError, Shard, plan_shards
from embedjob.progress import ProgressStore
from embedjob.results import done_stems
from embedjob.settings import Settings, load
from embedjob.spec import JobSpec, SpecError, parse_spec
from embedjob.storage import Storage, StorageError, StorageOptions

# The info of a shard found done at planning: not this run's work (so not in its rate), its counts
# still to be read from its manifest (embedjob.operator.done_before).
DONE_BEFORE = {"doneBefore": True, "countsPending": True}


def storage_for(spec: JobSpec) -> Storage:
    return Storage(StorageOptions.from_spec(spec))


def is_planned(job_status: Mapping[str, Any] | None) -> bool:
    return bool((job_status or {}).get("plan"))


@dataclass
class Accepted:
    status: dict[str, Any]
    events: list[Event]
    ok: bool


def record_plan(store: ProgressStore, spec: JobSpec, raw_spec: Mapping[str, Any], shards: list[Shard],
                storage: Storage, max_manifests: int | None = None) -> int:
    """Write the accepted spec, mark shards whose manifest exists as succeeded, their counts pending
    (embedjob.operator.done_before reads them, a slice per tick), then the plan itself (last). Returns
    how many shards were already done. Only the output's listing is read here, and it stops past
    ``max_manifests`` (default ``EMBEDJOB_MAX_SHARDS``)."""
    planned = {s.stem for s in shards}
    limit = load().max_shards if max_manifests is None else max_manifests
    try:
        done = sorted(done_stems(spec.output.uri, storage, limit) & planned) if not spec.output.overwrite else []
    except ValueError as e:
        raise PlanError("spec.output.uri", str(e)) from e
    store.save_plan(raw_spec, [(s.stem, s.uri) for s in shards], dict.fromkeys(done, DONE_BEFORE))
    return len(done)


def accept(store: ProgressStore, raw_spec: Mapping[str, Any], previous_status: Mapping[str, Any] | None,
           generation: int | None, now: dt.datetime | None = None, *, namespace: str | None = None,
           policy: AccessPolicy | None = None, settings: Settings | None = None) -> Accepted:
    """Validate the spec (with the admin's ceilings and model allow-list, embedjob.limits), check it
    against the storage allow-list of ``namespace`` (``policy``, default: the settings'), plan the
    shards (at most ``settings.max_shards``), record the plan in Redis, and return the status that
    records it. Nothing is enqueued here: the first tick after this status is stored does that, so
    the plan is in the resource before any task exists. A location outside the allow-list fails the
    job before anything is read with the workers' credentials."""
    now = now or status.now_utc()
    settings = settings or load()
    policy = policy or AccessPolicy.from_settings(settings)
    where = "spec"
    try:
        spec = parse_spec(dict(raw_spec), allow_local=False)
        limits.check_spec(spec, settings)
        policy.check_job(spec, namespace)
        storage = storage_for(spec)
        where = "spec.input.uri"
        shards = plan_shards(spec.input, storage, settings.max_shards)
        where = "spec.output.uri"
        done = record_plan(store, spec, raw_spec, shards, storage, settings.max_shards)
    except SpecError as e:  # PlanError is a SpecError too
        reason = ("PlanFailed" if isinstance(e, PlanError) else
                  "StorageNotAllowed" if isinstance(e, StorageNotAllowed) else "InvalidSpec")
        return Accepted(status.invalid_status(previous_status, reason, str(e), generation, now),
                        [Event("Warning", reason, str(e))], ok=False)
    except StorageError as e:
        # A missing bucket or denied access is the user's to fix (then any spec change re-plans);
        # an unreachable store is transient and raised for the caller to retry.
        if e.transient:
            raise
        what = "bucket does not exist" if e.code == "NoSuchBucket" else "cannot be read"
        message = f"{where}: {what}: {e}"
        return Accepted(status.invalid_status(previous_status, "PlanFailed", message, generation, now),
                        [Event("Warning", "PlanFailed", message)], ok=False)
    prev = {k: v for k, v in (previous_status or {}).items() if k == "conditions"}
    conditions = status.set_condition(prev.get("conditions") or [], status.make_condition(
        status.FAILED_COND, False, "Accepted", "spec accepted", generation, now))
    accepted = {
        "phase": status.PENDING,
        "plan": {"total": len(shards), "doneAtStart": done, "specHash": spec_hash(spec),
                 "plannedAt": status.rfc3339(now)},
        "progress": f"{done}/{len(shards)}",
        "shards": {"total": len(shards), "queued": len(shards) - done, "running": 0, "succeeded": done, "failed": 0},
        # Nothing embedded by this job yet; what the output already holds is counted by the ticks.
        "images": {"embedded": 0, "failed": 0, "soFar": 0, "embeddedThisRun": 0, "countsPending": done},
        "imagesPerSecond": 0.0,
        "startTime": status.rfc3339(now),
        "conditions": conditions,
        "completionTime": None,
    }
    if generation is not None:
        accepted["observedGeneration"] = generation
    msg = f"planned {len(shards)} shards ({done} already done)"
    events = [Event("Normal", "Planned", msg)]
    return Accepted(accepted, events, ok=True)
