"""What a reconcile step reports: Kubernetes events to post on the resource, and the per-job memory
the operator keeps between ticks (all of it can be recomputed after a restart)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from embedjob.operator.lost_messages import LostMessages
from embedjob.spec import JobSpec


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


class DoneInfo(NamedTuple):
    """What the status and ``_job.json`` keep of a succeeded shard: a tuple, not its Redis info (a
    million shards' JSON dicts took ~1.4 GB of the operator's 1 GiB; these ~150 MB)."""

    images: int = 0
    failed_images: int = 0
    tar_error: str | None = None
    done_before: bool = False  # found done when the job was planned: not this run's work

    @classmethod
    def of(cls, info: Mapping[str, Any]) -> DoneInfo:
        return cls(int(info.get("images") or 0), int(info.get("failedImages") or 0),
                   str(info["tarError"]) if info.get("tarError") else None, bool(info.get("doneBefore")))


NOT_DONE = DoneInfo()


@dataclass
class JobMemory:
    """Per-job state kept in the operator process only (kopf's per-resource ``memo``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)  # a tick and the cleanup never overlap
    spec: JobSpec | None = None  # the accepted spec
    plan: list[tuple[str, str]] | None = None  # [(stem, input uri)]
    uris: dict[str, str] = field(default_factory=dict)
    done_info: dict[str, DoneInfo] = field(default_factory=dict)  # succeeded stems' counts
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
