"""Observing a job: reduce the shard states and infos in Redis to :class:`status.Observed` (every
planned shard in exactly one bucket), and finishing it: the job manifest on success, stopping the rest
on failure."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from embedjob.contract import REPORT_TASK_NAME, report_task_id
from embedjob.layout import report_uri
from embedjob.operator import score_sketches, status
from embedjob.operator.accept import storage_for
from embedjob.operator.dispatch import Sender
from embedjob.operator.done_before import load_done_infos
from embedjob.operator.events import NOT_DONE, Event, JobMemory
from embedjob.progress import ProgressStore
from embedjob.results import model_provenance, read_shard_records, write_job_manifest
from embedjob.spec import JobSpec

log = logging.getLogger("embedjob.operator")
# Finished shards' manifests read per tick for the model, while none has named it.
MODEL_READS_PER_TICK = 4


def observe(store: ProgressStore, mem: JobMemory, plan: list[tuple[str, str]], states: Mapping[str, str],
            failed_infos: Mapping[str, dict[str, Any]]) -> status.Observed:
    """Every planned shard in one bucket: succeeded, running, failed for good, or queued (the rest: not
    sent yet, in the broker, waiting for a retry). Counted from the states and the succeeded shards'
    running sums (embedjob.operator.events.DoneTable), not per shard: a tick of a million-shard job."""
    obs = status.Observed(total=len(plan))
    load_done_infos(store, mem, states)
    obs.counts_pending = len(mem.counts_pending)
    by_state = Counter(states.values())
    obs.succeeded, obs.running = by_state["succeeded"], by_state["running"]
    done = mem.done_info
    obs.images, obs.failed_images, obs.images_this_run = done.images, done.failed_images, done.images_this_run
    obs.truncated = sorted(done.truncated.items())
    if obs.running:
        running = [s for s, v in states.items() if v == "running"]
        obs.images_in_flight = sum(int(i.get("imagesSoFar") or 0) for i in store.infos(running).values())
    uris = mem.uris or dict(plan)
    for stem, info in failed_infos.items():
        if states.get(stem) == "failed" and info.get("final"):
            obs.failed += 1
            obs.failed_shards.append(status.FailedShard(stem=stem, shard=uris.get(stem, ""),
                                                        attempts=int(info.get("failures") or 0),
                                                        error=str(info.get("error") or "")))
    obs.queued = obs.total - obs.succeeded - obs.running - obs.failed
    totals = store.totals()
    obs.failures = totals["failures"]
    obs.transient_failures = totals["transientFailures"]
    obs.lease_expiries = totals["leaseExpiries"]
    obs.messages_lost = totals["messagesLost"]
    return obs


def observe_model(mem: JobMemory, spec: JobSpec, states: Mapping[str, str]) -> dict[str, Any] | None:
    """The model the job's outputs were embedded with, as a finished shard's manifest records it (read
    once per operator process): never the spec's name for a model loaded from a path. A manifest that
    cannot be read or names no model (the output is the job owner's to write) is passed over for the
    next finished shard's, a few per tick."""
    if mem.model is None:
        candidates = (s for s, v in states.items() if v == "succeeded" and s not in mem.model_unknown
                      and s not in mem.counts_pending)  # (those are read by embedjob.operator.done_before)
        for stem in itertools.islice(candidates, MODEL_READS_PER_TICK):
            try:
                record = read_shard_records(spec.output.uri, [stem], storage_for(spec))[stem]
            except Exception as e:  # noqa: BLE001 - the status goes on without it; read again next tick
                log.warning("job %s: cannot read the manifest of %s for the model: %s", spec.output.uri, stem, e)
                return None
            provenance = model_provenance([record.get("model")])
            if isinstance(provenance, dict):
                mem.model = provenance
                break
            mem.model_unknown.add(stem)
    return mem.model


def finish(store: ProgressStore, mem: JobMemory, spec: JobSpec, desired: dict[str, Any],
           plan: list[tuple[str, str]], obs: status.Observed, events: list[Event],
           sender: Sender | None = None) -> None:
    """Transition to Succeeded (job manifest first, then the status) or Failed (stop the rest). With
    score heads, the summaries of the shards' sketches (merged by the ticks,
    embedjob.operator.score_sketches) go into ``_job.json`` and ``status.scores``."""
    if desired["phase"] == status.SUCCEEDED:
        shards = _ShardRecords(plan, {f.stem: f for f in obs.failed_shards}, mem)
        scores = score_sketches.summaries(mem) if spec.scores.heads() else None
        started = status.parse_rfc3339(desired.get("startTime"))
        write_job_manifest(storage_for(spec), spec.output.uri, job=store.job, spec=spec.to_dict(), shards=shards,
                           started_at=started.timestamp() if started else None, scores=scores)
        if scores:
            desired["scores"] = scores
        if spec.output.report and sender is not None:
            request_report(store, spec, desired, sender)
        events.append(Event("Normal", "Succeeded", condition_message(desired, status.COMPLETE)))
    else:
        store.set_control("suspended")  # late messages of a failed job are dropped by workers
        removed = store.remove_queued_tasks(spec.queue)
        events.append(Event("Warning", "Failed", f"{condition_message(desired, status.FAILED_COND)}; "
                                                 f"{removed} queued task(s) removed"))


def request_report(store: ProgressStore, spec: JobSpec, desired: dict[str, Any], sender: Sender) -> None:
    """``spec.output.report``: one report task to the job's queue (a worker writes ``report.html``;
    embedjob.worker.runtime.report_run) and its location in ``status.report``."""
    uri = report_uri(spec.output.uri)
    task = {"job": store.job, "output": spec.output.uri, "storage": {"endpoint": spec.storage.endpoint,
                                                                     "region": spec.storage.region}}
    try:
        sender.send_task(REPORT_TASK_NAME, kwargs={"task": task}, queue=spec.queue, task_id=report_task_id(store.job))
    except Exception as e:  # noqa: BLE001 - the job succeeded; the report is best effort
        log.warning("job %s: cannot send the report task: %s", store.job, e)
        desired["report"] = {"uri": uri, "state": "NotRequested", "message": str(e)[:200]}
        return
    desired["report"] = {"uri": uri, "state": "Requested",
                         "message": "a worker writes it (embedjob report); open it once it exists"}


def condition_message(job_status: Mapping[str, Any], ctype: str) -> str:
    c = status.get_condition(job_status.get("conditions"), ctype)
    return str(c.get("message")) if c else ""


class _ShardRecords(Mapping[str, dict[str, Any]]):
    """Each planned shard as ``_job.json`` lists it, built when asked for (a million shards' records
    held at once took more than the operator's memory)."""

    def __init__(self, plan: list[tuple[str, str]], failed: Mapping[str, status.FailedShard], mem: JobMemory) -> None:
        self.plan, self.failed, self.mem = plan, failed, mem

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[str]:
        return (stem for stem, _uri in self.plan)

    def __getitem__(self, stem: str) -> dict[str, Any]:
        if stem in self.failed:
            f = self.failed[stem]
            return {"state": "failed", "error": f.error, "attempts": f.attempts}
        if stem not in self.mem.uris:
            raise KeyError(stem)
        i = self.mem.done_info.get(stem, NOT_DONE)
        return {"state": "succeeded", "images": i.images, "failedImages": i.failed_images, "tarError": i.tar_error,
                "model": self.mem.model, "previousRun": i.done_before}
