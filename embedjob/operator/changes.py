"""Change detection: which parts of an accepted job's spec may change (``suspend``,
``ttlSecondsAfterFinished``, ``parallelism``) and which may not (everything that decides the outputs).
An immutable change is refused with a ``SpecChangeRefused`` condition; the job goes on with the
accepted spec, and reverting the change clears the condition."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from embedjob.operator import status
from embedjob.operator.events import Event, JobMemory
from embedjob.spec import JobSpec, SpecError, parse_spec

MUTABLE_FIELDS = ("suspend", "ttlSecondsAfterFinished", "parallelism", "priority")


def immutable_view(spec: JobSpec) -> dict[str, Any]:
    d = spec.to_dict()
    for k in MUTABLE_FIELDS:
        d.pop(k, None)
    return d


def spec_hash(spec: JobSpec) -> str:
    return hashlib.sha256(json.dumps(immutable_view(spec), sort_keys=True).encode()).hexdigest()[:16]


def changed_fields(accepted: JobSpec, current: JobSpec) -> list[str]:
    """Dotted paths of immutable fields that differ."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}")
        elif a != b:
            out.append(path)

    walk(immutable_view(accepted), immutable_view(current), "spec")
    return out


def with_mutable(accepted: JobSpec, raw: Mapping[str, Any] | None) -> JobSpec:
    """The accepted spec with the mutable fields taken from the resource's current spec."""
    raw = raw or {}
    return replace(accepted, suspend=bool(raw.get("suspend", False)), parallelism=int(raw.get("parallelism") or 0),
                   priority=int(raw.get("priority") or 0),
                   ttlSecondsAfterFinished=raw.get("ttlSecondsAfterFinished"))


def check_spec_change(accepted: JobSpec, raw_spec: Mapping[str, Any], conditions: list[dict[str, Any]],
                      generation: int | None, now: dt.datetime, mem: JobMemory,
                      events: list[Event]) -> list[dict[str, Any]]:
    """The conditions with ``SpecChangeRefused`` set or cleared for the resource's current spec."""
    try:
        fields = changed_fields(accepted, parse_spec(dict(raw_spec), allow_local=False))
        message = (f"{', '.join(fields)} cannot change once the job is accepted; the change is not applied "
                   f"(revert it, or create a new job)") if fields else ""
    except SpecError as e:
        message = f"the changed spec is invalid and is not applied: {e}"
    if message:
        if message != mem.refused:
            events.append(Event("Warning", "SpecChangeRefused", message))
        mem.refused = message
        return status.set_condition(conditions, status.make_condition(
            status.SPEC_REFUSED, True, "ImmutableField", message, generation, now))
    mem.refused = ""
    if status.get_condition(conditions, status.SPEC_REFUSED):
        return status.set_condition(conditions, status.make_condition(
            status.SPEC_REFUSED, False, "SpecUnchanged", "spec matches the accepted one", generation, now))
    return conditions
