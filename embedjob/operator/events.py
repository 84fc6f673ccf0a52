"""What a reconcile step reports: Kubernetes events to post on the resource, and the per-job memory
the operator keeps between ticks (all of it can be recomputed after a restart)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from embedjob.operator.lost_messages import LostMessages
from embedjob.spec import JobSpec


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class JobMemory:
    """Per-job state kept in the operator process only (kopf's per-resource ``memo``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)  # a tick and the cleanup never overlap
    spec: JobSpec | None = None  # the accepted spec
    plan: list[tuple[str, str]] | None = None  # [(stem, input uri)]
    uris: dict[str, str] = field(default_factory=dict)
    done_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # succeeded stems' info
    samples: deque = field(default_factory=lambda: deque(maxlen=120))  # (monotonic, images) for the rate
    refused: str = ""  # last refused spec change message (one event per change)
    suspects: dict[str, float] = field(default_factory=dict)  # running stems seen without a lease
    lost: LostMessages | None = None  # queued stems seen in no queue (made with the settings' grace)
    finished: deque = field(default_factory=lambda: deque(maxlen=24))  # (monotonic, shards finished): pace
    share: Any = None  # the job's latest fair share of its queue (embedjob.fairness.Share)
    model: dict[str, Any] | None = None  # the model a finished shard's manifest records (status.model)
    model_unknown: set[str] = field(default_factory=set)  # finished stems whose manifest names no model
    counts_pending: set[str] = field(default_factory=set)  # done at planning, manifest not read yet
    gone: list[str] = field(default_factory=list)  # of those, manifests found gone: sent by the next tick
    sketch_cursor: int = 0  # plan shards whose score sketches are merged (embedjob.operator.score_sketches)
    sketches: dict[str, Any] = field(default_factory=dict)  # score -> SketchMerger of those shards

    def forget_sightings(self) -> None:
        """After an outage, what was seen missing before says nothing about after (leases are re-taken,
        messages restored): start over."""
        self.suspects.clear()
        if self.lost is not None:
            self.lost.missing.clear()
