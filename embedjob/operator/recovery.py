"""Recovery: the accepted spec and the plan come from memory, else from Redis; when Redis lost the job
(a restart without persistence, a flush), they are rebuilt from the object store, which stays the
source of truth: shards whose manifest exists are done, the rest are planned and enqueued again.

Whatever the source, the spec is checked against the storage allow-list of the job's namespace (and
the admin's ceilings) each time it is loaded into this process: a rebuild re-plans from the
resource's spec, which a status patch with a forged plan and spec hash could otherwise smuggle past
accept, and an allow-list tightened since (the operator restarts with it) fails jobs now outside it
with ``StorageNotAllowed``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from embedjob import limits
from embedjob.access import AccessPolicy
from embedjob.operator.accept import record_plan, storage_for
from embedjob.operator.changes import spec_hash
from embedjob.operator.events import Event, JobMemory
from embedjob.planning import plan_shards
from embedjob.progress import ProgressStore
from embedjob.settings import Settings, load
from embedjob.spec import JobSpec, SpecError, parse_spec


def check_admitted(spec: JobSpec, namespace: str | None, policy: AccessPolicy | None = None,
                   settings: Settings | None = None) -> None:
    """The admission rules again (ceilings, model and storage allow-lists), for a spec loaded from
    anywhere but a fresh accept. Raises :class:`~embedjob.limits.LimitExceeded` or
    :class:`~embedjob.access.StorageNotAllowed` naming the field."""
    settings = settings or load()
    limits.check_spec(spec, settings)
    (policy or AccessPolicy.from_settings(settings)).check_job(spec, namespace)


def load_accepted(store: ProgressStore, mem: JobMemory, raw_spec: Mapping[str, Any], status: Mapping[str, Any],
                  events: list[Event], namespace: str | None = None, policy: AccessPolicy | None = None,
                  settings: Settings | None = None) -> JobSpec:
    """The accepted spec, with ``mem.plan`` / ``mem.uris`` filled, checked against the current
    policy whenever it is loaded into this process. Raises :class:`SpecError` when the job cannot be
    rebuilt safely or is outside the policy."""
    if mem.plan is not None and mem.spec is not None:
        if store.has_plan():
            return mem.spec
        return rebuild(store, mem, raw_spec, status, events, namespace, policy, settings)
    plan, accepted_raw = store.plan(), store.accepted_spec()
    if plan is None or accepted_raw is None:
        return rebuild(store, mem, raw_spec, status, events, namespace, policy, settings)
    spec = parse_spec(accepted_raw, allow_local=False)
    check_admitted(spec, namespace, policy, settings)
    mem.spec = spec
    mem.plan = plan
    mem.uris = dict(mem.plan)
    return mem.spec


def rebuild(store: ProgressStore, mem: JobMemory, raw_spec: Mapping[str, Any], status: Mapping[str, Any],
            events: list[Event], namespace: str | None = None, policy: AccessPolicy | None = None,
            settings: Settings | None = None) -> JobSpec:
    """Redis lost this job: re-plan from storage and count finished shards from their manifests. Only
    possible while the resource's spec is still the accepted one, and only within the policy: the
    status (plan, spec hash) is the user's to write too, so it proves nothing about admission."""
    settings = settings or load()
    spec = parse_spec(dict(raw_spec), allow_local=False)
    check_admitted(spec, namespace, policy, settings)
    if spec_hash(spec) != (status.get("plan") or {}).get("specHash"):
        raise SpecError("spec", "Redis lost this job's progress and the spec changed since it was accepted: "
                        "cannot rebuild safely; recreate the job")
    storage = storage_for(spec)
    shards = plan_shards(spec.input, storage, settings.max_shards)
    mem.done_info.clear()
    mem.counts_pending.clear()
    mem.sketch_cursor, mem.sketches, mem.first_new = 0, {}, 0
    mem.samples.clear()
    done = record_plan(store, spec, raw_spec, shards, storage)
    mem.spec = spec
    mem.plan = [(s.stem, s.uri) for s in shards]
    mem.uris = dict(mem.plan)
    events.append(Event("Warning", "ProgressRebuilt",
                        f"Redis had no progress for this job: rebuilt from manifests ({done} shards done of "
                        f"{len(shards)}); the rest is re-enqueued"))
    return spec
