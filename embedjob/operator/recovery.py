"""Recovery: the accepted spec and the plan come from memory, else from Redis; when Redis lost the job
(a restart without persistence, a flush), they are rebuilt from the object store, which stays the
source of truth: shards whose manifest exists are done, the rest are planned and enqueued again."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from embedjob.operator.accept import record_plan, storage_for
from embedjob.operator.changes import spec_hash
from embedjob.operator.events import Event, JobMemory
from embedjob.planning import plan_shards
from embedjob.progress import ProgressStore
from embedjob.spec import JobSpec, SpecError, parse_spec


def load_accepted(store: ProgressStore, mem: JobMemory, raw_spec: Mapping[str, Any], status: Mapping[str, Any],
                  events: list[Event]) -> JobSpec:
    """The accepted spec, with ``mem.plan`` / ``mem.uris`` filled. Raises :class:`SpecError` when the
    job cannot be rebuilt safely."""
    if mem.plan is not None and mem.spec is not None:
        if store.has_plan():
            return mem.spec
        return rebuild(store, mem, raw_spec, status, events)
    plan, accepted_raw = store.plan(), store.accepted_spec()
    if plan is None or accepted_raw is None:
        return rebuild(store, mem, raw_spec, status, events)
    mem.spec = parse_spec(accepted_raw, allow_local=False)
    mem.plan = plan
    mem.uris = dict(mem.plan)
    return mem.spec


def rebuild(store: ProgressStore, mem: JobMemory, raw_spec: Mapping[str, Any], status: Mapping[str, Any],
            events: list[Event]) -> JobSpec:
    """Redis lost this job: re-plan from storage and count finished shards from their manifests. Only
    possible while the resource's spec is still the accepted one."""
    spec = parse_spec(dict(raw_spec), allow_local=False)
    if spec_hash(spec) != (status.get("plan") or {}).get("specHash"):
        raise SpecError("spec", "Redis lost this job's progress and the spec changed since it was accepted: "
                        "cannot rebuild safely; recreate the job")
    storage = storage_for(spec)
    shards = plan_shards(spec.input, storage)
    mem.done_info.clear()
    mem.samples.clear()
    done = record_plan(store, spec, raw_spec, shards, storage)
    mem.spec = spec
    mem.plan = [(s.stem, s.uri) for s in shards]
    mem.uris = dict(mem.plan)
    events.append(Event("Warning", "ProgressRebuilt",
                        f"Redis had no progress for this job: rebuilt from manifests ({done} shards done of "
                        f"{len(shards)}); the rest is re-enqueued"))
    return spec
