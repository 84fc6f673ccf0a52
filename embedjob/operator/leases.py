"""The lease step of a tick: a shard recorded ``running`` whose lease is gone had its worker die.

A worker releases its lease a moment before it records the outcome, so a shard only counts as expired
when it stays ``running`` without a lease for ``expiry_grace`` seconds; and its manifest is checked
first, because a worker that committed the outputs while Redis was down could not record them: such a
shard is done, not lost. The flip ``running -> queued`` is a compare-and-set, so a worker's final state
is never overwritten. Lease expiries are the worker's fault, not the shard's: they consume no retry,
unless one shard takes down ``max_lease_expiries`` workers in a row (then it counts as failed).
"""

from __future__ import annotations

import logging
import time

from embedjob.layout import shard_outputs
from embedjob.operator.accept import storage_for
from embedjob.operator.events import Event, JobMemory
from embedjob.progress import ProgressStore
from embedjob.results import ManifestUnreadable, read_shard_record
from embedjob.settings import Settings
from embedjob.spec import JobSpec

log = logging.getLogger("embedjob.operator")


def expire_leases(store: ProgressStore, spec: JobSpec, states: dict[str, str], mem: JobMemory, settings: Settings,
                  events: list[Event]) -> list[str]:
    """Update ``states`` for expired and committed shards; returns the stems to re-enqueue."""
    running = [s for s, v in states.items() if v == "running"]
    unleased = set(running) - store.live_leases(running) if running else set()
    for stem in list(mem.suspects):
        if stem not in unleased:
            del mem.suspects[stem]
    mono = time.monotonic()
    expired: list[str] = []
    for stem in sorted(unleased):
        if mono - mem.suspects.setdefault(stem, mono) < settings.expiry_grace:
            continue
        done = committed(spec, stem, store.job)
        if done is None:
            continue  # storage unreachable: decide on a later tick
        if done:
            if store.set_state_if(stem, "running", "succeeded"):
                store.update_info(stem, images=done[0], failedImages=done[1], tarError=done[2], fromManifest=True,
                                  error=None)
                states[stem] = "succeeded"
                mem.done_info.pop(stem)
        elif store.set_state_if(stem, "running", "queued"):
            expired.append(stem)
            states[stem] = "queued"
        del mem.suspects[stem]
    return [stem for stem in expired if _count_expiry(store, stem, settings, events, states)]


def _count_expiry(store: ProgressStore, stem: str, settings: Settings, events: list[Event],
                  states: dict[str, str]) -> bool:
    """Count one expiry; False when the shard now counts as failed instead of being re-enqueued."""
    n = int(store.info(stem).get("leaseExpiries") or 0) + 1
    store.count_total("leaseExpiries")
    if n > settings.max_lease_expiries:
        # A shard that takes down every worker it lands on is a real failure after all.
        store.update_info(stem, leaseExpiries=n, error=f"LeaseExpired: its worker was lost {n} times")
        store.set_state_if(stem, "queued", "failed")
        states[stem] = "failed"
        return False
    store.update_info(stem, leaseExpiries=n)
    events.append(Event("Normal", "LeaseExpired", f"{stem}: worker lost, shard re-enqueued"))
    return True


def committed(spec: JobSpec, stem: str, job: str = "") -> tuple[int, ...] | None:
    """(images, failed, tar error) from the shard's manifest when it exists, () when it does not, None
    when the store cannot tell right now."""
    try:
        storage = storage_for(spec)
        if not storage.exists(shard_outputs(spec.output.uri, stem).manifest):
            return ()
        record = read_shard_record(spec.output.uri, stem, storage)
        return record["images"], record["failedImages"], record["tarError"]
    except ManifestUnreadable as e:  # committed (it exists), but its counts are not read
        log.warning("job %s: %s", job, e)
        return (0, 0, None)
    except Exception as e:  # noqa: BLE001 - decided again on the next tick
        log.warning("job %s: cannot check the manifest of %s yet: %s", job, stem, e)
        return None
