"""What the operator step tests share: a job's spec, the broker's queue as the test sees it, and the
test playing the worker's part (writing shard states and manifests as the worker task does)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from embedjob.layout import shard_outputs
from embedjob.operator.accept import accept
from embedjob.operator.events import JobMemory
from embedjob.operator.reconcile import Reconciler
from embedjob.progress import ProgressStore
from embedjob.settings import Settings
from embedjob.storage import Storage

QUEUE = "embedjob-unit"


def raw_spec(bucket: str, n: int = 4, **extra) -> dict:
    spec = {
        "input": {"uri": f"s3://{bucket}/in/{{0000..{n - 1:04d}}}.tar"},
        "output": {"uri": f"s3://{bucket}/out/"},
        "queue": QUEUE,
        "retries": {"perShard": 1, "backoffSeconds": 0},
    }
    spec.update(extra)
    return spec


def queued_ids(r) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in r.lrange(QUEUE, 0, -1)]


def write_manifest(bucket: str, stem: str, embedded: int, failed: int = 0) -> None:
    Storage().put_atomic(shard_outputs(f"s3://{bucket}/out/", stem).manifest,
                         json.dumps({"counts": {"embedded": embedded, "failed": failed}}).encode())


def worker_finishes(store: ProgressStore, stem: str, images: int, failed: int = 0) -> None:
    store.set_state(stem, "succeeded", images=images, failedImages=failed)


def started(r, app, store, spec: dict, **settings):
    acc = accept(store, spec, {}, 1)
    assert acc.ok, acc.status
    # One job and no real worker (the test plays the workers): the fair share's floor is lifted, so
    # dispatch is bounded by max_queued and parallelism only (fair dispatch: tests/test_fair_dispatch.py).
    rec = Reconciler(store, app, JobMemory(), Settings(**{"min_queued": 10_000, **settings}))
    return acc.status, rec


def is_true(conditions: Iterable[Mapping[str, Any]] | None, ctype: str) -> bool:
    """Whether the condition ``ctype`` is there with status "True"."""
    c = next((c for c in conditions or () if c.get("type") == ctype), None)
    return bool(c and c.get("status") == "True")
