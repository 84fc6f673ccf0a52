"""Reconciling one EmbeddingJob: accept (validate + plan), tick (observe, retry, dispatch, report),
cleanup. Plain functions over Redis, the object store and a Celery sender; kopf only calls them
(embedjob.operator.handlers), so tests drive them directly against real services.

Level-triggered: every tick recomputes what to do from the observed state (Redis states, leases,
the control flag, the current spec), so an operator restart at any point resumes correctly.

Redis keys (besides embedjob.progress's per-shard keys), under ``embedjob:<uid>:``:
``spec`` the accepted spec (JSON), ``plan`` the planned ``[[stem, uri], ...]`` (written last: if it
is missing while the resource's status says "planned", Redis lost the job and it is rebuilt from the
manifests), ``totals`` (failures and lease expiries counted).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from embedjob import policy
from embedjob.broker import remove_queued_tasks
from embedjob.contract import task_id_prefix
from embedjob.layout import shard_outputs
from embedjob.operator import status as st
from embedjob.operator.dispatch import Dispatcher, Sender
from embedjob.operator.lost_messages import LostMessages
from embedjob.planning import PlanError, Shard, plan_shards
from embedjob.progress import ProgressStore
from embedjob.results import done_stems, read_manifest, shard_counts, write_job_manifest
from embedjob.spec import JobSpec, SpecError, parse_spec
from embedjob.storage import Storage, StorageError, StorageOptions

log = logging.getLogger("embedjob.operator")

MUTABLE_FIELDS = ("suspend", "ttlSecondsAfterFinished", "parallelism")
# A deleted job's control flag outlives its other keys so that late messages are still dropped.
DELETED_FLAG_TTL = 7 * 24 * 3600


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class JobMemory:
    """Per-job state kept in the operator process only (all of it can be recomputed)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    spec: JobSpec | None = None  # the accepted spec
    plan: list[tuple[str, str]] | None = None
    uris: dict[str, str] = field(default_factory=dict)
    done_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # succeeded stems' info
    samples: deque = field(default_factory=lambda: deque(maxlen=120))  # (monotonic, images)
    refused: str = ""  # last refused spec change message (for one event per change)
    suspects: dict[str, float] = field(default_factory=dict)  # running stems seen without a lease
    lost: LostMessages = field(default_factory=LostMessages)  # queued stems seen in no queue


_memories: dict[str, JobMemory] = {}
_memories_lock = threading.Lock()


def memory_for(uid: str) -> JobMemory:
    with _memories_lock:
        return _memories.setdefault(uid, JobMemory())


def forget(uid: str) -> None:
    with _memories_lock:
        _memories.pop(uid, None)


# -- spec helpers ---------------------------------------------------------------------------------------
def storage_for(spec: JobSpec) -> Storage:
    return Storage(StorageOptions(endpoint=spec.storage.endpoint, region=spec.storage.region))


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
    from dataclasses import replace

    raw = raw or {}
    return replace(
        accepted,
        suspend=bool(raw.get("suspend", False)),
        parallelism=int(raw.get("parallelism") or 0),
        ttlSecondsAfterFinished=raw.get("ttlSecondsAfterFinished"),
    )


def expiry_grace() -> float:
    """Seconds a "running" shard must stay without a lease before it counts as expired."""
    from embedjob.progress import lease_seconds

    return max(1.0, min(5.0, lease_seconds() / 2))


def max_queued() -> int:
    """Most shards of one job waiting in the broker at once."""
    return int(os.environ.get("EMBEDJOB_MAX_QUEUED", "2000"))


def max_lease_expiries() -> int:
    """Lease expiries a shard may cause before they count as one real failure (a poison shard that
    kills every worker it lands on must not loop forever)."""
    return int(os.environ.get("EMBEDJOB_MAX_LEASE_EXPIRIES", "10"))


# -- accept ---------------------------------------------------------------------------------------------
@dataclass
class Accepted:
    status: dict[str, Any]
    events: list[Event]
    ok: bool


def _manifest_counts(storage: Storage, output: str, stems: list[str]) -> dict[str, dict[str, Any]]:
    def one(stem: str) -> tuple[str, dict[str, Any]]:
        images, failed = shard_counts(read_manifest(output, stem, storage))
        return stem, {"images": images, "failedImages": failed, "fromManifest": True}

    if not stems:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(stems))) as pool:
        return dict(pool.map(one, stems))


def record_plan(store: ProgressStore, spec: JobSpec, raw_spec: Mapping[str, Any], shards: list[Shard],
                storage: Storage) -> int:
    """Write the accepted spec, mark shards whose manifest exists as succeeded (with their counts),
    then the plan itself (last). Returns how many shards were already done."""
    planned = {s.stem for s in shards}
    done = sorted(done_stems(spec.output.uri, storage) & planned) if not spec.output.overwrite else []
    counts = _manifest_counts(storage, spec.output.uri, done)
    pipe = store.r.pipeline(transaction=False)
    pipe.set(store.key("spec"), json.dumps(dict(raw_spec)))
    now = time.time()
    for stem in done:
        pipe.hset(store.key("state"), stem, "succeeded")
        pipe.hset(store.key("info"), stem, json.dumps({**counts[stem], "updated": now}))
    pipe.execute()
    store.r.set(store.key("plan"), json.dumps([[s.stem, s.uri] for s in shards]))
    return len(done)


def accept(store: ProgressStore, raw_spec: Mapping[str, Any], previous_status: Mapping[str, Any] | None,
           generation: int | None, now: dt.datetime | None = None) -> Accepted:
    """Validate the spec (schema rules again, plus semantic ones), plan the shards, record the plan
    in Redis, and return the status that records it. Nothing is enqueued here: the first tick after
    this status is stored does that, so the plan is in the resource before any task exists."""
    now = now or st.now_utc()
    where = "spec"
    try:
        spec = parse_spec(dict(raw_spec), allow_local=False)
        storage = storage_for(spec)
        where = "spec.input.uri"
        shards = plan_shards(spec.input, storage)
        where = "spec.output.uri"
        done = record_plan(store, spec, raw_spec, shards, storage)
    except SpecError as e:  # PlanError is a SpecError too
        reason = "PlanFailed" if isinstance(e, PlanError) else "InvalidSpec"
        return Accepted(st.invalid_status(previous_status, reason, str(e), generation, now),
                        [Event("Warning", reason, str(e))], ok=False)
    except StorageError as e:
        # A missing bucket or denied access is the user's to fix (then any spec change re-plans);
        # an unreachable store is transient and raised for the caller to retry.
        if e.transient:
            raise
        what = "bucket does not exist" if e.code == "NoSuchBucket" else "cannot be read"
        message = f"{where}: {what}: {e}"
        return Accepted(st.invalid_status(previous_status, "PlanFailed", message, generation, now),
                        [Event("Warning", "PlanFailed", message)], ok=False)
    prev = {k: v for k, v in (previous_status or {}).items() if k == "conditions"}
    conditions = st.set_condition(prev.get("conditions") or [], st.make_condition(
        st.FAILED_COND, False, "Accepted", "spec accepted", generation, now))
    status = {
        "phase": st.PENDING,
        "plan": {"total": len(shards), "doneAtStart": done, "specHash": spec_hash(spec), "plannedAt": st.rfc3339(now)},
        "progress": f"{done}/{len(shards)}",
        "shards": {"total": len(shards), "queued": len(shards) - done, "running": 0, "succeeded": done, "failed": 0},
        "startTime": st.rfc3339(now),
        "conditions": conditions,
        "completionTime": None,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    msg = f"planned {len(shards)} shards ({done} already done)"
    return Accepted(status, [Event("Normal", "Planned", msg)], ok=True)


def is_planned(status: Mapping[str, Any] | None) -> bool:
    return bool((status or {}).get("plan"))


# -- tick -------------------------------------------------------------------------------------------------
@dataclass
class TickResult:
    status: dict[str, Any]  # the desired status (compare with the current one before patching)
    events: list[Event]
    delete: bool = False  # ttlSecondsAfterFinished elapsed


class Reconciler:
    """One tick of one job. ``sender`` is the Celery app (or anything with ``send_task``)."""

    def __init__(self, store: ProgressStore, sender: Sender, memory: JobMemory | None = None) -> None:
        self.store = store
        self.sender = sender
        self.mem = memory or memory_for(store.job)
        self.events: list[Event] = []

    # -- loading ------------------------------------------------------------------------------------
    def _load(self, raw_spec: Mapping[str, Any], status: Mapping[str, Any]) -> JobSpec:
        """The accepted spec and the plan, from memory or Redis; rebuilds both when Redis lost them."""
        r = self.store.r
        if self.mem.plan is not None and self.mem.spec is not None:
            if r.exists(self.store.key("plan")):
                return self.mem.spec
            return self._rebuild(raw_spec, status)
        raw_plan, accepted_raw = r.get(self.store.key("plan")), r.get(self.store.key("spec"))
        if raw_plan is None or accepted_raw is None:
            return self._rebuild(raw_spec, status)
        self.mem.spec = parse_spec(json.loads(accepted_raw), allow_local=False)
        self.mem.plan = [(s, u) for s, u in json.loads(raw_plan)]
        self.mem.uris = dict(self.mem.plan)
        return self.mem.spec

    def _rebuild(self, raw_spec: Mapping[str, Any], status: Mapping[str, Any]) -> JobSpec:
        """Redis lost this job: re-plan from storage and count finished shards from their manifests.
        Only possible when the resource's spec is still the accepted one."""
        spec = parse_spec(dict(raw_spec), allow_local=False)
        if spec_hash(spec) != (status.get("plan") or {}).get("specHash"):
            raise SpecError("spec", "Redis lost this job's progress and the spec changed since it was accepted: "
                            "cannot rebuild safely; recreate the job")
        storage = storage_for(spec)
        shards = plan_shards(spec.input, storage)
        self.mem.done_info.clear()
        self.mem.samples.clear()
        done = record_plan(self.store, spec, raw_spec, shards, storage)
        self.mem.spec = spec
        self.mem.plan = [(s.stem, s.uri) for s in shards]
        self.mem.uris = dict(self.mem.plan)
        self.events.append(Event("Warning", "ProgressRebuilt",
                                 f"Redis had no progress for this job: rebuilt from manifests ({done} shards "
                                 f"done of {len(shards)}); the rest is re-enqueued"))
        return spec

    # -- the tick -----------------------------------------------------------------------------------
    def tick(self, raw_spec: Mapping[str, Any], status: Mapping[str, Any] | None, generation: int | None,
             now: dt.datetime | None = None) -> TickResult:
        now = now or st.now_utc()
        status = dict(status or {})
        self.events = []
        if status.get("phase") in st.TERMINAL:
            return TickResult(status, [], delete=self._ttl_elapsed(raw_spec, status, now))
        if not is_planned(status):
            return TickResult(status, [])
        with self.mem.lock:
            try:
                return self._tick(raw_spec, status, generation, now)
            except Exception:
                # Redis or storage failed mid-tick: what was seen missing before the outage says
                # nothing about after it (leases are re-taken, messages restored), so start over.
                self.mem.suspects.clear()
                self.mem.lost.missing.clear()
                raise

    def _ttl_elapsed(self, raw_spec: Mapping[str, Any], status: Mapping[str, Any], now: dt.datetime) -> bool:
        ttl = (raw_spec or {}).get("ttlSecondsAfterFinished")
        done_at = st.parse_rfc3339(status.get("completionTime"))
        return ttl is not None and done_at is not None and (now - done_at).total_seconds() >= int(ttl)

    def _tick(self, raw_spec: Mapping[str, Any], status: dict[str, Any], generation: int | None,
              now: dt.datetime) -> TickResult:
        try:
            accepted = self._load(raw_spec, status)
        except SpecError as e:
            return TickResult(st.invalid_status(status, "RebuildFailed", str(e), generation, now), self.events)
        conditions = self._check_spec_change(accepted, raw_spec, status.get("conditions") or [], generation, now)
        spec = with_mutable(accepted, raw_spec)
        store = self.store
        plan = self.mem.plan or []
        dispatcher = Dispatcher(store, self.sender, spec, self.mem.uris)

        # Suspend / resume, level-triggered on spec.suspend vs the control flag.
        control = store.control()
        resumed = False
        if spec.suspend and control != "suspended":
            store.set_control("suspended")
            removed = remove_queued_tasks(store.r, spec.queue, task_id_prefix(store.job))
            self.events.append(Event("Normal", "Suspended", f"dispatch stopped; {removed} queued task(s) removed"))
        elif not spec.suspend and control == "suspended":
            store.set_control("")
            resumed = True

        states = store.states()
        t = time.time()
        failed_stems = [s for s, v in states.items() if v == "failed"]
        infos = store.infos(failed_stems) if failed_stems else {}
        retry_due: list[str] = []
        for stem in failed_stems:
            info = infos[stem]
            dispatch_n = int(info.get("dispatch") or 0)
            if info.get("countedDispatch") != dispatch_n:
                infos[stem] = info = self._count_failure(spec, stem, info, dispatch_n, t)
            if not info.get("final") and (info.get("retryAt") or 0) <= t:
                retry_due.append(stem)

        # Lease expiry: "running" with no live lease means the worker died. A worker releases its
        # lease a moment before it records the outcome, so a shard is only expired when it is
        # still "running" without a lease after a grace period; the state flip is a compare-and-set
        # so that a worker's final state is never overwritten.
        running = [s for s, v in states.items() if v == "running"]
        expired: list[str] = []
        mono = time.monotonic()
        unleased = set(running) - store.live_leases(running) if running else set()
        for stem in list(self.mem.suspects):
            if stem not in unleased:
                del self.mem.suspects[stem]
        for stem in sorted(unleased):
            first = self.mem.suspects.setdefault(stem, mono)
            if mono - first < expiry_grace():
                continue
            # Its worker may have committed the outputs and lost only the outcome (Redis was down):
            # the manifest decides, so a finished shard is never blamed on a lost worker.
            done = self._committed(spec, stem)
            if done is None:
                continue  # storage unreachable: decide on a later tick
            if done:
                if store.set_state_if(stem, "running", "succeeded"):
                    store.update_info(stem, images=done[0], failedImages=done[1], fromManifest=True, error=None)
                    states[stem] = "succeeded"
                    self.mem.done_info.pop(stem, None)
                del self.mem.suspects[stem]
            elif store.set_state_if(stem, "running", "queued"):
                expired.append(stem)
                del self.mem.suspects[stem]
                states[stem] = "queued"
        for stem in list(expired):
            n = int(store.info(stem).get("leaseExpiries") or 0) + 1
            store.r.hincrby(store.key("totals"), "leaseExpiries", 1)
            if n > max_lease_expiries():
                # A shard that takes down every worker it lands on is a real failure after all.
                store.update_info(stem, leaseExpiries=n, error=f"LeaseExpired: its worker was lost {n} times")
                store.set_state_if(stem, "queued", "failed")
                expired.remove(stem)
                continue
            store.update_info(stem, leaseExpiries=n)
            self.events.append(Event("Normal", "LeaseExpired", f"{stem}: worker lost, shard re-enqueued"))

        # The safety net: a "queued" shard whose message is in no queue, not delivered and not leased
        # (lost by a bug, a flushed queue, a crash between ack and outcome) is re-enqueued.
        lost: list[str] = []
        if not spec.suspend and control != "suspended":
            lost = self.mem.lost.check(store, spec.queue, states)
            for stem in lost:
                store.r.hincrby(store.key("totals"), "messagesLost", 1)
                self.events.append(Event("Warning", "MessageLost",
                                         f"{stem}: queued but in no queue and not leased for "
                                         f"{self.mem.lost.grace:.0f}s: re-enqueued"))

        dispatched_now = 0
        if not spec.suspend:  # (while suspended, expired shards wait as "queued" for the resume)
            pending = [s for s, v in states.items() if v == "pending"]
            if pending:
                dispatcher.resend(pending)
                for s in pending:
                    states[s] = "queued"
            # After a resume every "queued" shard (its message was removed) goes out again; otherwise
            # only the ones whose lease expired.
            redo = [s for s, v in states.items() if v == "queued" and s not in pending] if resumed \
                else expired + [s for s in lost if s not in expired]
            if redo:
                dispatched_now += dispatcher.dispatch(redo)
                for s in redo:
                    states[s] = "queued"
            inflight = sum(1 for v in states.values() if v in ("pending", "queued", "running"))
            waiting = sum(1 for v in states.values() if v in ("pending", "queued"))
            slots = (spec.parallelism - inflight) if spec.parallelism > 0 else len(plan) + len(retry_due)
            # Even without a parallelism limit the broker holds a bounded backlog, topped up every
            # tick: 100,000 messages would make suspend/delete (which filter the queue) slow.
            slots = min(slots, max_queued() - waiting)
            todo: list[str] = []
            for stem in retry_due:
                if len(todo) >= slots:
                    break
                todo.append(stem)
            if len(todo) < slots:
                for stem, _uri in plan:
                    if stem not in states:
                        todo.append(stem)
                        if len(todo) >= slots:
                            break
            if todo:
                dispatched_now += dispatcher.dispatch(todo)
                for s in todo:
                    states[s] = "queued"
            if resumed:
                self.events.append(Event("Normal", "Resumed", f"dispatch resumed; {len(redo)} shard(s) re-enqueued"))
        if dispatched_now and status.get("phase") == st.PENDING:
            self.events.append(Event("Normal", "Started", f"enqueued {dispatched_now} shard task(s) on {spec.queue}"))

        obs = self._observe(plan, states, infos)
        done_at_start = int((status.get("plan") or {}).get("doneAtStart") or 0)
        obs.fatal = policy.common_access_error(
            [json.loads(v) for v in store.r.hvals(store.key("accessErrors"))], len(plan) - done_at_start,
            obs.succeeded - done_at_start) or ""
        self.mem.samples.append((time.monotonic(), obs.images + obs.images_in_flight))
        phase_policy = st.Policy(max_failed_shards=spec.maxFailedShards, suspend=spec.suspend)
        desired = st.build_status(status, obs, phase_policy, generation=generation, now=now,
                                  rate=st.images_per_second(list(self.mem.samples)),
                                  dispatched=bool(states))
        desired["conditions"] = _merge_conditions(desired["conditions"], conditions)
        if desired["phase"] in st.TERMINAL and status.get("phase") not in st.TERMINAL:
            self._finish(spec, desired, plan, states, obs)
        return TickResult(desired, self.events)

    def _count_failure(self, spec: JobSpec, stem: str, info: dict[str, Any], dispatch_n: int,
                       t: float) -> dict[str, Any]:
        """Apply the failure policy to a failed attempt seen for the first time."""
        store = self.store
        d = policy.on_failure(transient=bool(info.get("transient")), failures=int(info.get("failures") or 0),
                              transient_failures=int(info.get("transientFailures") or 0),
                              per_shard=spec.retries.perShard, backoff_base=spec.retries.backoffSeconds)
        info = store.update_info(stem, failures=d.failures, transientFailures=d.transient_failures,
                                 countedDispatch=dispatch_n, final=d.final, retryAt=None if d.final else t + d.delay)
        counter = "transientFailures" if d.transient_failures else "failures"
        store.r.hincrby(store.key("totals"), counter, 1)
        if info.get("accessError"):
            store.r.hset(store.key("accessErrors"), stem,
                         json.dumps({"accessError": True, "errorCode": info.get("errorCode"),
                                     "error": info.get("error")}))
        if d.final:
            self.events.append(Event("Warning", "ShardFailed",
                                     f"{stem} failed {d.failures} time(s), giving up: {info.get('error')}"))
        elif d.transient_failures:
            log.warning("job %s: %s hit a transient error, retry in %.0fs: %s", store.job, stem, d.delay,
                        info.get("error"))
        return info

    def _committed(self, spec: JobSpec, stem: str) -> tuple[int, ...] | None:
        """(images, failed) from the shard's manifest when it exists, () when it does not, None when
        storage cannot tell right now."""
        try:
            storage = storage_for(spec)
            if not storage.exists(shard_outputs(spec.output.uri, stem).manifest):
                return ()
            return shard_counts(read_manifest(spec.output.uri, stem, storage))
        except Exception as e:  # noqa: BLE001 - decided again on the next tick
            log.warning("job %s: cannot check the manifest of %s yet: %s", self.store.job, stem, e)
            return None

    def _observe(self, plan: list[tuple[str, str]], states: Mapping[str, str],
                 failed_infos: Mapping[str, dict[str, Any]]) -> st.Observed:
        store = self.store
        obs = st.Observed(total=len(plan))
        new_done = [s for s, v in states.items() if v == "succeeded" and s not in self.mem.done_info]
        if new_done:
            self.mem.done_info.update(store.infos(new_done))
        running = [s for s, v in states.items() if v == "running"]
        running_info = store.infos(running) if running else {}
        for stem, uri in plan:
            v = states.get(stem)
            if v == "succeeded":
                obs.succeeded += 1
                info = self.mem.done_info.get(stem, {})
                obs.images += int(info.get("images") or 0)
                obs.failed_images += int(info.get("failedImages") or 0)
            elif v == "running":
                obs.running += 1
                obs.images_in_flight += int(running_info.get(stem, {}).get("imagesSoFar") or 0)
            elif v == "failed" and failed_infos.get(stem, {}).get("final"):
                info = failed_infos[stem]
                obs.failed += 1
                obs.failed_shards.append(st.FailedShard(stem=stem, shard=uri, attempts=int(info.get("failures") or 0),
                                                        error=str(info.get("error") or "")))
            else:
                obs.queued += 1
        totals = store.r.hgetall(store.key("totals"))
        obs.failures = int(totals.get("failures") or 0)
        obs.transient_failures = int(totals.get("transientFailures") or 0)
        obs.lease_expiries = int(totals.get("leaseExpiries") or 0)
        obs.messages_lost = int(totals.get("messagesLost") or 0)
        return obs

    def _finish(self, spec: JobSpec, desired: dict[str, Any], plan: list[tuple[str, str]],
                states: Mapping[str, str], obs: st.Observed) -> None:
        """Transition to Succeeded (job manifest first, then the status) or Failed (stop the rest)."""
        store = self.store
        if desired["phase"] == st.SUCCEEDED:
            infos = dict(self.mem.done_info)
            failed = {f.stem: f for f in obs.failed_shards}
            shards = {}
            for stem, _uri in plan:
                if stem in failed:
                    shards[stem] = {"state": "failed", "error": failed[stem].error, "attempts": failed[stem].attempts}
                else:
                    i = infos.get(stem, {})
                    shards[stem] = {"state": "succeeded", "images": int(i.get("images") or 0),
                                    "failedImages": int(i.get("failedImages") or 0)}
            started = st.parse_rfc3339(desired.get("startTime"))
            write_job_manifest(storage_for(spec), spec.output.uri, job=store.job, spec=spec.to_dict(), shards=shards,
                               started_at=started.timestamp() if started else None)
            self.events.append(Event("Normal", "Succeeded", desired["conditions"] and _cond_msg(desired, st.COMPLETE)))
        else:
            store.set_control("suspended")  # late messages of a failed job are dropped by workers
            removed = remove_queued_tasks(store.r, spec.queue, task_id_prefix(store.job))
            self.events.append(Event("Warning", "Failed", f"{_cond_msg(desired, st.FAILED_COND)}; "
                                     f"{removed} queued task(s) removed"))

    def _check_spec_change(self, accepted: JobSpec, raw_spec: Mapping[str, Any],
                           conditions: list[dict[str, Any]], generation: int | None,
                           now: dt.datetime) -> list[dict[str, Any]]:
        """Immutable fields changed after acceptance -> a SpecChangeRefused condition (the job goes
        on with the accepted spec); reverting the change clears it."""
        try:
            fields = changed_fields(accepted, parse_spec(dict(raw_spec), allow_local=False))
            message = (f"{', '.join(fields)} cannot change once the job is accepted; the change is not applied "
                       f"(revert it, or create a new job)") if fields else ""
        except SpecError as e:
            message = f"the changed spec is invalid and is not applied: {e}"
        if message:
            if message != self.mem.refused:
                self.events.append(Event("Warning", "SpecChangeRefused", message))
            self.mem.refused = message
            return st.set_condition(conditions, st.make_condition(st.SPEC_REFUSED, True, "ImmutableField", message,
                                                                  generation, now))
        self.mem.refused = ""
        if st.get_condition(conditions, st.SPEC_REFUSED):
            return st.set_condition(conditions, st.make_condition(st.SPEC_REFUSED, False, "SpecUnchanged",
                                                                  "spec matches the accepted one", generation, now))
        return conditions


def _cond_msg(status: Mapping[str, Any], ctype: str) -> str:
    c = st.get_condition(status.get("conditions"), ctype)
    return str(c.get("message")) if c else ""


def _merge_conditions(computed: list[dict[str, Any]], observed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conditions from build_status win; the SpecChangeRefused one comes from the spec check."""
    refused = st.get_condition(observed, st.SPEC_REFUSED)
    out = [c for c in computed if c.get("type") != st.SPEC_REFUSED]
    if refused:
        out.append(dict(refused))
    return out


# -- cleanup ----------------------------------------------------------------------------------------------
def cleanup(store: ProgressStore, queue: str, attempts: int = 3, delay: float = 1.0) -> tuple[bool, str]:
    """On delete: stop the job's workers, remove its queued tasks and Redis keys (outputs are kept).
    Bounded retries: returns (ok, message) and never raises, so deletion never hangs on Redis."""
    last = ""
    for i in range(attempts):
        try:
            store.set_control("deleted", ttl=DELETED_FLAG_TTL)
            removed = remove_queued_tasks(store.r, queue, task_id_prefix(store.job))
            keys = store.delete_all(keep=("control",))
            forget(store.job)
            return True, f"removed {removed} queued task(s) and {keys} Redis key(s); outputs kept"
        except Exception as e:  # noqa: BLE001 - any Redis error: retry a bounded number of times
            last = f"{type(e).__name__}: {e}"
            log.warning("cleanup of %s failed (attempt %d/%d): %s", store.job, i + 1, attempts, last)
            if i + 1 < attempts:
                time.sleep(delay * (2**i))
    forget(store.job)
    return False, f"could not clean Redis after {attempts} attempts ({last}); released anyway"
