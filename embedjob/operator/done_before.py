"""Shards found done when a job is planned (or rebuilt after Redis lost it): their counts.

Accept records them from the output's listing alone, as succeeded with ``countsPending`` (a job run
again over a finished output of a million shards would otherwise read a million manifests before
its first message, the job ``Pending`` for half an hour). This step reads their manifests a slice
per tick, at most :data:`READ_SECONDS` of each, and fills their counts (Redis and the operator's
memory). Until none is pending the job is not finished (embedjob.operator.status.decide_phase), so
``status.images`` and ``_job.json`` are exact when it is; meanwhile ``status.images.countsPending``
says how many shards the counts leave out.

A manifest that is not what a worker writes counts the shard as done with 0 images (a
``ManifestUnreadable`` warning names one); a manifest gone since the listing puts the shard back in
the plan's work (a ``ManifestGone`` event; the next tick sends it, or, should the operator restart
first, the lost-message check does)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from embedjob.operator.accept import storage_for
from embedjob.operator.events import DoneInfo, Event, JobMemory
from embedjob.progress import ProgressStore
from embedjob.results import model_provenance, read_shard_records
from embedjob.spec import JobSpec

log = logging.getLogger("embedjob.operator")

READ_SECONDS = 2.0  # of manifest reading per tick (the tick interval is 5 s by default)
CHUNK = 256  # manifests read at a time, 16 in parallel
# Jobs reading at once in one operator process: many jobs planned over finished (or planted) outputs
# must not hold every one of kopf's tick threads; a job that finds both taken reads on a later tick.
READERS = threading.BoundedSemaphore(2)


def load_done_infos(store: ProgressStore, mem: JobMemory, states: Mapping[str, str], chunk: int = 10_000) -> None:
    """Bring the counts of newly succeeded shards into ``mem.done_info`` (once per operator process),
    noting those whose counts are still to be read; ``chunk`` infos are parsed at a time."""
    if list(states.values()).count("succeeded") == len(mem.done_info):  # (it holds succeeded shards only)
        return
    new_done = [s for s, v in states.items() if v == "succeeded" and s not in mem.done_info]
    for i in range(0, len(new_done), chunk):
        infos = store.infos(new_done[i:i + chunk])
        mem.done_info.update((stem, DoneInfo.of(info)) for stem, info in infos.items())
        mem.counts_pending.update(s for s, info in infos.items() if info.get("countsPending"))


def fill_counts(store: ProgressStore, mem: JobMemory, spec: JobSpec, states: dict[str, str], events: list[Event],
                *, seconds: float | None = None, chunk: int | None = None) -> list[str]:
    """Read pending shards' manifests, ``chunk`` (:data:`CHUNK`) at a time, until ``seconds``
    (:data:`READ_SECONDS`) have passed (one chunk at least), and record their counts. Updates
    ``states``; returns the stems whose manifest is gone (now ``queued``: the next tick sends them)."""
    load_done_infos(store, mem, states)
    if not mem.counts_pending or not READERS.acquire(blocking=False):
        return []
    try:
        return _fill(store, mem, spec, states, events, READ_SECONDS if seconds is None else seconds,
                     chunk or CHUNK)
    finally:
        READERS.release()


def _fill(store: ProgressStore, mem: JobMemory, spec: JobSpec, states: dict[str, str], events: list[Event],
          seconds: float, chunk: int) -> list[str]:
    storage = storage_for(spec)
    deadline = time.monotonic() + seconds
    unread: list[str] = []
    gone: list[str] = []

    while mem.counts_pending:
        stems = list(itertools.islice(mem.counts_pending, chunk))
        try:
            records = read_shard_records(spec.output.uri, stems, storage, gone_ok=True)
        except Exception as e:  # noqa: BLE001 - the counts stay pending; read again next tick
            log.warning("job %s: cannot read the manifests of shards done before it yet: %s", store.job, e)
            break
        counts: dict[str, dict[str, Any]] = {}
        for stem, record in records.items():
            mem.counts_pending.discard(stem)
            if states.get(stem) != "succeeded":
                continue
            if record is None:
                if store.set_state_if(stem, "succeeded", "queued"):
                    store.update_info(stem, doneBefore=None, countsPending=None)
                    states[stem] = "queued"
                    gone.append(stem)
                mem.done_info.pop(stem)
                continue
            info = {"images": record["images"], "failedImages": record["failedImages"],
                    "tarError": record["tarError"], "fromManifest": True, "countsPending": None}
            if record.get("unread"):
                info["manifestUnread"] = True
                unread.append(stem)
            counts[stem] = info
            if mem.model is None:  # the status's model, from this read rather than another one
                provenance = model_provenance([record.get("model")])
                if isinstance(provenance, dict):
                    mem.model = provenance
                else:
                    mem.model_unknown.add(stem)
        mem.done_info.update((stem, DoneInfo.of(info)) for stem, info in store.update_infos(counts).items())
        if time.monotonic() >= deadline:
            break
    if unread:  # someone wrote there what a worker does not write: say so, the counts leave them out
        events.append(Event("Warning", "ManifestUnreadable",
                            f"{len(unread)} shard manifest(s) under spec.output.uri are not what a worker writes "
                            f"(e.g. {sorted(unread)[0]}): those shards count as done with 0 images; delete their "
                            "manifests to redo them"))
    if gone:
        events.append(Event("Normal", "ManifestGone",
                            f"{len(gone)} shard(s) found done when the job was planned no longer have a manifest "
                            f"(e.g. {sorted(gone)[0]}): embedded again"))
    return gone
