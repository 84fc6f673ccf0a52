"""What a reconcile step reports: Kubernetes events to post on the resource, and the per-job memory
the operator keeps between ticks (all of it can be recomputed after a restart)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping
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


class DoneTable:
    """The succeeded shards' :class:`DoneInfo` by stem, with the sums the status needs kept as entries
    come and go: a tick of a million-shard job adds them up in O(1), not in a walk of the plan."""

    def __init__(self) -> None:
        self._rows: dict[str, DoneInfo] = {}
        self.images = self.failed_images = self.images_this_run = 0
        self.truncated: dict[str, str] = {}  # stem -> tar error

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, stem: object) -> bool:
        return stem in self._rows

    def get(self, stem: str, default: DoneInfo = NOT_DONE) -> DoneInfo:
        return self._rows.get(stem, default)

    def __setitem__(self, stem: str, info: DoneInfo) -> None:
        self.pop(stem)
        self._rows[stem] = info
        self._count(stem, info, 1)

    def update(self, rows: Iterable[tuple[str, DoneInfo]]) -> None:
        for stem, info in rows:
            self[stem] = info

    def pop(self, stem: str) -> DoneInfo | None:
        info = self._rows.pop(stem, None)
        if info is not None:
            self._count(stem, info, -1)
        return info

    def clear(self) -> None:
        self.__init__()

    def _count(self, stem: str, info: DoneInfo, sign: int) -> None:
        self.images += sign * info.images
        self.failed_images += sign * info.failed_images
        if not info.done_before:
            self.images_this_run += sign * info.images
        if info.tar_error and sign > 0:
            self.truncated[stem] = info.tar_error
        elif sign < 0:
            self.truncated.pop(stem, None)


@dataclass
class JobMemory:
    """Per-job state kept in the operator process only (kopf's per-resource ``memo``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)  # a tick and the cleanup never overlap
    spec: JobSpec | None = None  # the accepted spec
    plan: list[tuple[str, str]] | None = None  # [(stem, input uri)]
    uris: dict[str, str] = field(default_factory=dict)
    done_info: DoneTable = field(default_factory=DoneTable)  # succeeded stems' counts, and their sums
    samples: deque = field(default_factory=lambda: deque(maxlen=120))  # (monotonic, images) for the rate
    refused: str = ""  # last refused spec change message (one event per change)
    suspects: dict[str, float] = field(default_factory=dict)  # running stems seen without a lease
    lost: LostMessages | None = None  # queued stems seen in no queue (made with the settings' grace)
    finished: deque = field(default_factory=lambda: deque(maxlen=24))  # (monotonic, shards finished): pace
    share: Any = None  # the job's latest fair share of its queue (embedjob.fairness.Share)
    model: dict[str, Any] | None = None  # the model a finished shard's manifest records (status.model)
    model_unknown: set[str] = field(default_factory=set)  # finished stems whose manifest names no model
    counts_pending: set[str] = field(default_factory=set)  # done at planning, manifest not read yet
    first_new: int = 0  # plan entries before it all have a state (embedjob.operator.dispatch)
    gone: list[str] = field(default_factory=list)  # of those, manifests found gone: sent by the next tick
    sketch_cursor: int = 0  # plan shards whose score sketches are merged (embedjob.operator.score_sketches)
    sketches: dict[str, Any] = field(default_factory=dict)  # score -> SketchMerger of those shards

    def forget_sightings(self) -> None:
        """After an outage, what was seen missing before says nothing about after (leases are re-taken,
        messages restored): start over."""
        self.suspects.clear()
        if self.lost is not None:
            self.lost.missing.clear()
