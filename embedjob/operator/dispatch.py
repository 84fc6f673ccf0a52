"""Enqueueing shard tasks: intent first, then the message, then the acknowledgement.

For each shard the operator (1) writes state ``pending`` with the next dispatch number in the
shard's info, (2) sends the Celery task with the deterministic id ``task_id(job, stem, dispatch)``,
(3) moves the state ``pending -> queued`` with a compare-and-set (a fast worker may already have
written ``running``). A ``pending`` shard therefore means "sent or maybe not": after an operator
restart it is sent again under the same task id. A duplicate message is harmless: the worker drops
it when the shard's lease is held or its manifest exists. Credentials never enter a message.

Every message is checked against the storage allow-list of the job's namespace before it is sent
(input, output, model path, endpoint, stem): a plan that came from anywhere (Redis, a rebuild) can
never make a worker read or write outside the job's prefixes. A refusal raises
:class:`~embedjob.access.StorageNotAllowed` and the tick fails the job.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from embedjob.access import AccessPolicy
from embedjob.contract import TASK_NAME, ShardTask, task_id
from embedjob.progress import ProgressStore
from embedjob.spec import JobSpec

BATCH = 500


class Sender(Protocol):
    """What the dispatcher needs from a Celery app (``embedjob.broker.app``)."""

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any: ...


class Dispatcher:
    """Sends one job's shard tasks. ``uris`` maps stem -> input shard URI."""

    def __init__(self, store: ProgressStore, sender: Sender, spec: JobSpec, uris: Mapping[str, str],
                 policy: AccessPolicy | None = None, namespace: str | None = None, first_new: int = 0) -> None:
        self.store = store
        self.sender = sender
        self.spec = spec
        self.uris = uris
        self.policy = policy or AccessPolicy()
        self.namespace = namespace
        # Every plan entry before this index has a state (states are never removed while the job
        # lives): the search for new shards starts there instead of walking a million-shard plan.
        self.first_new = first_new

    def check(self, stems: Iterable[str]) -> None:
        """Raise StorageNotAllowed unless every message for ``stems`` is within the job's policy."""
        spec = self.spec
        for stem in stems:
            self.policy.check_task(self.uris[stem], spec.output.uri, spec.model.path, spec.storage.endpoint,
                                   namespace=self.namespace, stem=stem)

    def _send(self, stem: str, dispatch: int, attempt: int) -> None:
        task = ShardTask.build(self.store.job, self.spec, self.uris[stem], stem, attempt=attempt)
        self.sender.send_task(TASK_NAME, kwargs={"task": task.to_dict()},
                              task_id=task_id(self.store.job, stem, dispatch), queue=self.spec.queue)

    def dispatch(self, stems: Iterable[str]) -> int:
        """Dispatch each stem under a NEW dispatch number (first run, retry, re-enqueue after a lease
        expiry or a resume). Returns how many were sent."""
        stems = list(stems)
        sent = 0
        for i in range(0, len(stems), BATCH):
            chunk = stems[i : i + BATCH]
            self.check(chunk)  # before any intent is written
            infos = self.store.infos(chunk)
            intents: dict[str, tuple[int, int]] = {}
            for stem in chunk:
                info = infos[stem]
                n = int(info.get("dispatch") or 0) + 1
                attempt = int(info.get("failures") or 0) + 1
                intents[stem] = (n, attempt)
                info.update(dispatch=n, retryAt=None)
            self.store.set_pending({stem: infos[stem] for stem in chunk})  # intent is durable before any message
            for stem, (n, attempt) in intents.items():
                self._send(stem, n, attempt)
                sent += 1
            self._acknowledge(chunk)
        return sent

    def resend(self, stems: Iterable[str]) -> int:
        """Send ``pending`` stems again under their CURRENT dispatch number (same task id): the
        previous send may or may not have happened before a crash."""
        stems = list(stems)
        for i in range(0, len(stems), BATCH):
            chunk = stems[i : i + BATCH]
            self.check(chunk)
            infos = self.store.infos(chunk)
            for stem in chunk:
                info = infos[stem]
                self._send(stem, int(info.get("dispatch") or 1), int(info.get("failures") or 0) + 1)
            self._acknowledge(chunk)
        return len(stems)

    def top_up(self, states: dict[str, str], plan: list[tuple[str, str]], retry_due: list[str], redo: list[str],
               max_queued: int) -> int:
        """One tick's dispatch, in order: ``pending`` shards again under their id (a crash may have
        come between intent and send), ``redo`` (expired leases, lost messages, everything queued
        after a resume) under new ids, then due retries and new shards up to the free slots:
        ``spec.parallelism`` in flight, and never more than ``max_queued`` waiting in the broker (a
        100,000-message backlog would make suspend and delete, which filter the queue, slow).
        Updates ``states``; returns how many messages were sent under new ids."""
        sent = 0
        pending = [s for s, v in states.items() if v == "pending"]
        if pending:
            self.resend(pending)
        redo = [s for s in redo if s not in pending]
        if redo:
            sent += self.dispatch(redo)
        for s in pending + redo:
            states[s] = "queued"
        inflight = sum(1 for v in states.values() if v in ("pending", "queued", "running"))
        waiting = sum(1 for v in states.values() if v in ("pending", "queued"))
        parallelism = self.spec.parallelism
        slots = (parallelism - inflight) if parallelism > 0 else len(plan) + len(retry_due)
        slots = min(slots, max_queued - waiting)
        todo = retry_due[: max(slots, 0)]
        while self.first_new < len(plan) and plan[self.first_new][0] in states:
            self.first_new += 1
        for stem, _uri in itertools.islice(plan, self.first_new, None):
            if len(todo) >= slots:
                break
            if stem not in states:
                todo.append(stem)
        if todo:
            sent += self.dispatch(todo)
            for s in todo:
                states[s] = "queued"
        return sent

    def _acknowledge(self, stems: list[str]) -> None:
        for stem in stems:
            self.store.set_state_if(stem, "pending", "queued")

