"""One tick of one EmbeddingJob: a few named steps over plain functions, each concern in its own module.

    load        embedjob.operator.recovery   accepted spec + plan (rebuilt from manifests if Redis lost it)
    changes     embedjob.operator.changes    immutable fields refused, mutable ones applied
    control     (here)                       spec.suspend <-> the control flag workers read
    failures    embedjob.operator.failures   each failed attempt counted once (embedjob.policy decides)
    leases      embedjob.operator.leases     dead workers' shards: done (manifest) or re-enqueued
    counts      embedjob.operator.done_before  counts of shards found done at planning, a slice a tick
    sketches    embedjob.operator.score_sketches  finished shards' score sketches merged, a slice a tick
    lost        embedjob.operator.lost_messages  queued shards in no queue: re-enqueued
    share       embedjob.fairness            this job's fair share of the queue it shares with other jobs
    dispatch    embedjob.operator.dispatch   pending resent, redo, retries and new shards up to the slots
    report      embedjob.operator.observe    counts -> status (embedjob.operator.status), finish

Level-triggered: every tick recomputes what to do from the observed state (Redis states, leases, the
broker, the control flag, the current spec), so an operator restart at any point resumes correctly.
Accepting a job is embedjob.operator.accept; deleting one, embedjob.operator.cleanup. kopf only calls
these (embedjob.operator.handlers), so tests drive them directly against real services.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from embedjob import fairness
from embedjob import policy as failure_policy
from embedjob.access import AccessPolicy, StorageNotAllowed
from embedjob.limits import LimitExceeded
from embedjob.operator import done_before, score_sketches, status
from embedjob.operator.accept import is_planned
from embedjob.operator.changes import check_spec_change, with_mutable
from embedjob.operator.dispatch import Dispatcher, Sender
from embedjob.operator.events import Event, JobMemory
from embedjob.operator.failures import count_failures, fatal_error
from embedjob.operator.leases import expire_leases
from embedjob.operator.lost_messages import LostMessages
from embedjob.operator.observe import finish, observe, observe_model
from embedjob.operator.recovery import load_accepted
from embedjob.progress import ProgressStore
from embedjob.settings import Settings, load
from embedjob.spec import JobSpec, SpecError

__all__ = ["Reconciler", "TickResult"]


@dataclass
class TickResult:
    status: dict[str, Any]  # the desired status (compare with the current one before patching)
    events: list[Event]
    delete: bool = False  # ttlSecondsAfterFinished elapsed
    dispatched: int = 0  # messages sent under new task ids this tick (embedjob_job_shards_dispatched_total)


class Reconciler:
    """One tick of one job. ``sender`` is the Celery app (or anything with ``send_task``)."""

    def __init__(self, store: ProgressStore, sender: Sender, memory: JobMemory | None = None,
                 settings: Settings | None = None, *, namespace: str | None = None,
                 policy: AccessPolicy | None = None) -> None:
        self.store = store
        self.sender = sender
        self.settings = settings or load()
        self.namespace = namespace  # from the apiserver: the storage allow-list's scope
        self.policy = policy or AccessPolicy.from_settings(self.settings)
        self.mem = memory if memory is not None else JobMemory()
        if self.mem.lost is None:
            self.mem.lost = LostMessages(grace=self.settings.lost_message_grace, lease=self.settings.lease_seconds)
        self.events: list[Event] = []

    def tick(self, raw_spec: Mapping[str, Any], job_status: Mapping[str, Any] | None, generation: int | None,
             now: dt.datetime | None = None) -> TickResult:
        now = now or status.now_utc()
        job_status = dict(job_status or {})
        self.events = []
        if job_status.get("phase") in status.TERMINAL:
            job_status = self._report_outcome(job_status)
            return TickResult(job_status, self.events, delete=_ttl_elapsed(raw_spec, job_status, now))
        if not is_planned(job_status):
            return TickResult(job_status, [])
        with self.mem.lock:
            try:
                return self._tick(raw_spec, job_status, generation, now)
            except Exception:
                self.mem.forget_sightings()  # Redis or storage failed mid-tick: start the grace periods over
                raise

    def _tick(self, raw_spec: Mapping[str, Any], job_status: dict[str, Any], generation: int | None,
              now: dt.datetime) -> TickResult:
        store, mem, events = self.store, self.mem, self.events
        try:
            accepted = load_accepted(store, mem, raw_spec, job_status, events, self.namespace, self.policy,
                                     self.settings)
        except StorageNotAllowed as e:
            return self._refused(raw_spec, job_status, e, generation, now)
        except SpecError as e:  # beyond a (tightened) ceiling, or not rebuildable
            reason = "InvalidSpec" if isinstance(e, LimitExceeded) else "RebuildFailed"
            return TickResult(status.invalid_status(job_status, reason, str(e), generation, now), events)
        try:
            return self._run(accepted, raw_spec, job_status, generation, now)
        except StorageNotAllowed as e:  # a message outside the policy was about to be sent
            return self._refused(raw_spec, job_status, e, generation, now)

    def _report_outcome(self, job_status: dict[str, Any]) -> dict[str, Any]:
        """A finished job whose report was requested: the worker's outcome, once it is in Redis."""
        report = job_status.get("report") or {}
        if report.get("state") != "Requested":
            return job_status
        outcome = self.store.report_outcome()
        if outcome is None:
            return job_status
        if outcome.get("state") == "Written":
            report = {"uri": outcome.get("uri") or report.get("uri"), "state": "Written",
                      "message": "open it in a browser (one self-contained file)"}
            self.events.append(Event("Normal", "ReportWritten", f"report written to {report['uri']}"))
        else:
            report = {**report, "state": "Failed", "message": str(outcome.get("error") or "")[:200]}
            self.events.append(Event("Warning", "ReportFailed", report["message"]))
        return {**job_status, "report": report}

    def _refused(self, raw_spec: Mapping[str, Any], job_status: dict[str, Any], e: StorageNotAllowed,
                 generation: int | None, now: dt.datetime) -> TickResult:
        """The job is outside the storage policy (tightened since it was accepted, or a plan that did
        not come from accept): it fails, and what it still had queued is withdrawn."""
        queue = self.mem.spec.queue if self.mem.spec is not None else str(raw_spec.get("queue") or "embedjob")
        self.store.set_control("suspended")  # workers drop its messages still in flight
        removed = self.store.remove_queued_tasks(queue)
        self.store.unregister_job(queue)
        self.events.append(Event("Warning", "StorageNotAllowed", f"{e} ({removed} queued task(s) withdrawn)"))
        return TickResult(status.invalid_status(job_status, "StorageNotAllowed", str(e), generation, now),
                          self.events)

    def _run(self, accepted: JobSpec, raw_spec: Mapping[str, Any], job_status: dict[str, Any],
             generation: int | None, now: dt.datetime) -> TickResult:
        store, mem, events = self.store, self.mem, self.events
        conditions = check_spec_change(accepted, raw_spec, job_status.get("conditions") or [], generation, now,
                                       mem, events)
        spec = with_mutable(accepted, raw_spec)
        if spec.priority > self.settings.max_priority:  # priority may change later: never past the ceiling
            spec = replace(spec, priority=self.settings.max_priority)
        control, resumed = self._control(spec)
        states = store.states()
        failed_infos, retry_due = count_failures(store, spec, states, time.time(), events)
        expired = expire_leases(store, spec, states, mem, self.settings, events)
        lost = self._lost(spec, states) if not spec.suspend and control != "suspended" else []
        gone, mem.gone = mem.gone, []  # found by the last tick's reads (while suspended, the resume sends them)
        dispatched = 0
        if spec.suspend:
            store.unregister_job(spec.queue)
        else:  # (while suspended, expired shards wait as "queued" for the resume)
            redo = [s for s, v in states.items() if v == "queued"] if resumed else expired + lost + gone
            dispatcher = Dispatcher(store, self.sender, spec, mem.uris, self.policy, self.namespace,
                                    first_new=mem.first_new)
            cap = self._fair_cap(spec, states, retry_due)
            dispatched = dispatcher.top_up(states, mem.plan or [], retry_due, redo, cap)
            mem.first_new = dispatcher.first_new
            if resumed:
                events.append(Event("Normal", "Resumed", f"dispatch resumed; {len(redo)} shard(s) re-enqueued"))
        # After dispatch (the first messages of a job over a finished output go out at once), manifest
        # reading shares one time budget a tick; each step reads one slice at least.
        reads_until = time.monotonic() + done_before.READ_SECONDS
        mem.gone = done_before.fill_counts(store, mem, spec, states, events)  # manifests gone since planning
        score_sketches.merge_sketches(mem, spec, states, failed_infos,
                                      seconds=max(0.0, reads_until - time.monotonic()))
        if dispatched and job_status.get("phase") == status.PENDING:
            events.append(Event("Normal", "Started", f"enqueued {dispatched} shard task(s) on {spec.queue}"))
        result = self._report(spec, job_status, generation, now, states, failed_infos, conditions)
        result.dispatched = dispatched
        if result.status.get("phase") in status.TERMINAL:
            store.unregister_job(spec.queue)
        return result

    def _fair_cap(self, spec: JobSpec, states: dict[str, str], retry_due: list[str]) -> int:
        """Messages this job may keep waiting in the broker (embedjob.fairness): its priority-weighted
        share of ``queued_per_slot`` x the live worker slots on its queue, split with the other jobs that
        have work there; at least what it consumes in two ticks (fast shards never starve the workers),
        at least ``min_queued``, at most ``max_queued``."""
        s, store, mem = self.settings, self.store, self.mem
        plan = mem.plan or []
        finished = sum(1 for v in states.values() if v in ("succeeded", "failed"))
        settled = finished + sum(1 for v in states.values() if v == "running")
        if len(plan) - settled + len(retry_due) <= 0:  # nothing left to send: leave the queue to others
            store.unregister_job(spec.queue)
            return s.max_queued
        store.register_job(spec.queue, spec.priority)
        share = fairness.job_cap(store.job, store.active_jobs(spec.queue), store.live_slots(spec.queue),
                                 s.queued_per_slot, s.min_queued, s.max_queued)
        mono = time.monotonic()
        mem.finished.append((mono, finished))
        t0, f0 = mem.finished[0]
        pace = (finished - f0) / (mono - t0) if mono - t0 >= 1.0 else 0.0  # shards finished per second
        cap = min(max(share.cap, math.ceil(2 * s.operator_interval * pace)), s.max_queued)
        mem.share = share
        return cap

    def _control(self, spec: JobSpec) -> tuple[str, bool]:
        """Suspend / resume, level-triggered on spec.suspend vs the control flag. Returns (the flag as
        it was, whether the job was just resumed)."""
        store = self.store
        control = store.control()
        if spec.suspend and control != "suspended":
            store.set_control("suspended")
            removed = store.remove_queued_tasks(spec.queue)
            self.events.append(Event("Normal", "Suspended", f"dispatch stopped; {removed} queued task(s) removed"))
        elif not spec.suspend and control == "suspended":
            store.set_control("")
            return control, True
        return control, False

    def _lost(self, spec: JobSpec, states: dict[str, str]) -> list[str]:
        """The safety net (embedjob.operator.lost_messages): queued shards whose message is gone."""
        assert self.mem.lost is not None
        lost = self.mem.lost.check(self.store, spec.queue, states)
        for stem in lost:
            self.store.count_total("messagesLost")
            self.events.append(Event("Warning", "MessageLost", f"{stem}: queued but in no queue and not leased for "
                                                               f"{self.mem.lost.grace:.0f}s: re-enqueued"))
        return lost

    def _report(self, spec: JobSpec, job_status: dict[str, Any], generation: int | None, now: dt.datetime,
                states: dict[str, str], failed_infos: Mapping[str, dict[str, Any]],
                conditions: list[dict[str, Any]]) -> TickResult:
        store, mem = self.store, self.mem
        plan = mem.plan or []
        obs = observe(store, mem, plan, states, failed_infos)
        obs.model = observe_model(mem, spec, states)
        obs.sketches_pending = score_sketches.pending(mem, spec)
        done_at_start = int((job_status.get("plan") or {}).get("doneAtStart") or 0)
        obs.fatal = fatal_error(store, len(plan) - done_at_start, obs.succeeded - done_at_start)
        if not obs.fatal and obs.failed > spec.maxFailedShards and obs.succeeded <= done_at_start:
            # Access errors are permanent: shards fail at once, maybe before FAIL_FAST_SHARDS of them have
            # been tried. A job that fails on them fails for that reason, not "too many failed shards".
            finals = [i for i in failed_infos.values() if i.get("final")]
            obs.fatal = failure_policy.common_access_error(finals, total=1, succeeded_this_run=0) or ""
        mem.samples.append((time.monotonic(), obs.images_this_run + obs.images_in_flight))  # this run's work only
        desired = status.build_status(job_status, obs, status.Policy(max_failed_shards=spec.maxFailedShards,
                                                                     suspend=spec.suspend),
                                      generation=generation, now=now,
                                      rate=status.images_per_second(list(mem.samples)), dispatched=bool(states))
        desired["conditions"] = _merge_conditions(desired["conditions"], conditions)
        if desired["phase"] in status.TERMINAL and job_status.get("phase") not in status.TERMINAL:
            finish(store, mem, spec, desired, plan, obs, self.events, self.sender)
        return TickResult(desired, self.events)


def _ttl_elapsed(raw_spec: Mapping[str, Any], job_status: Mapping[str, Any], now: dt.datetime) -> bool:
    ttl = (raw_spec or {}).get("ttlSecondsAfterFinished")
    done_at = status.parse_rfc3339(job_status.get("completionTime"))
    return ttl is not None and done_at is not None and (now - done_at).total_seconds() >= int(ttl)


def _merge_conditions(computed: list[dict[str, Any]], observed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conditions from build_status win; the SpecChangeRefused one comes from the spec check."""
    refused = status.get_condition(observed, status.SPEC_REFUSED)
    out = [c for c in computed if c.get("type") != status.SPEC_REFUSED]
    if refused:
        out.append(dict(refused))
    return out
