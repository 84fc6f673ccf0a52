"""The Celery task: a thin wrapper around :func:`embedjob.worker.pipeline.embed_shard`.

Start a worker with ``embedjob worker --queue embedjob`` (or
``celery -A embedjob.worker.tasks worker -Q embedjob -c 1``). One process per GPU.

Per task (see embedjob.progress for the Redis keys):
1. the job was suspended or deleted -> drop it (``cancelled``);
2. the shard's manifest exists -> record it succeeded, no work (``skipped``);
3. another live worker holds the shard's lease -> ``duplicate``, no work done twice;
4. otherwise take the lease, renew it by heartbeat while embedding, record the outcome.
A duplicate is re-checked one lease period later (see ``embed_shard_task``).
The task never retries itself: real failures are recorded and the operator (or the local runner)
decides on retries; a dead worker's lease expires and the shard is redone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from embedjob.broker import app
from embedjob.contract import TASK_NAME, EmbedOptions, ShardTask
from embedjob.layout import shard_outputs
from embedjob.progress import ProgressStore, lease_seconds, redis_client
from embedjob.results import read_manifest, shard_counts
from embedjob.storage import Storage, StorageOptions

log = logging.getLogger("embedjob.worker")

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
_redis = None


def _progress(job: str) -> ProgressStore:
    global _redis
    if _redis is None:
        _redis = redis_client()
    return ProgressStore(_redis, job)


class _Heartbeat(threading.Thread):
    """Renews the shard lease and publishes images-so-far until stopped. If the lease is lost (it
    expired and someone else took it), the flag is set so the work can be abandoned."""

    def __init__(self, store: ProgressStore, stem: str, owner: str) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{stem}")
        self.store, self.stem, self.owner = store, stem, owner
        self.images = 0
        self.lost = threading.Event()
        self._halt = threading.Event()
        self.interval = max(lease_seconds() / 4, 0.5)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                if not self.store.renew_lease(self.stem, self.owner):
                    self.lost.set()
                    log.warning("lease on %s lost", self.stem)
                    return
                self.store.update_info(self.stem, imagesSoFar=self.images)
            except Exception:  # noqa: BLE001 - a Redis blip must not kill the shard; next beat retries
                log.exception("heartbeat for %s failed", self.stem)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)


def run_shard_task(task: ShardTask, owner: str = WORKER_ID) -> dict[str, Any]:
    """The task body as a plain function (what tests and the local runner can call too)."""
    from embedjob.worker.model import load_embedder
    from embedjob.worker.pipeline import embed_shard

    store = _progress(task.job)
    if store.control() in ("suspended", "deleted"):
        return {"status": "cancelled", "stem": task.stem}

    options = EmbedOptions(**task.options)
    storage = Storage(StorageOptions.from_dict(task.storage))
    if not options.overwrite and storage.exists(shard_outputs(task.output, task.stem).manifest):
        images, failed = shard_counts(read_manifest(task.output, task.stem, storage))
        store.set_state(task.stem, "succeeded", images=images, failedImages=failed, finishedAt=time.time())
        return {"status": "skipped", "stem": task.stem}

    if not store.acquire_lease(task.stem, owner):
        return {"status": "duplicate", "stem": task.stem, "holder": store.lease_owner(task.stem)}

    heartbeat = _Heartbeat(store, task.stem, owner)
    try:
        store.set_state(task.stem, "running", attempt=task.attempt, worker=owner, startedAt=time.time(),
                        error=None, imagesSoFar=0)
        store.count_execution(task.stem)
        heartbeat.start()
        embedder = load_embedder(task.model, device=options.device, precision=options.precision)

        def on_progress(n: int) -> None:
            heartbeat.images = n

        result = embed_shard(task.shard, task.output, embedder, options, stem=task.stem, storage=storage,
                             on_progress=on_progress)
    except Exception as e:  # noqa: BLE001 - recorded for the operator's retry policy
        log.exception("shard %s failed", task.shard)
        error = f"{type(e).__name__}: {e}"[:1000]
        heartbeat.stop()
        if store.control() != "deleted":  # a deleted job's keys are gone: do not recreate them
            store.set_state(task.stem, "failed", attempt=task.attempt, error=error, finishedAt=time.time())
        return {"status": "failed", "stem": task.stem, "error": error}
    else:
        # The outputs are committed (manifest written): record success even if the lease was lost meanwhile.
        heartbeat.stop()
        if store.control() != "deleted":
            store.set_state(task.stem, "succeeded", attempt=task.attempt, images=result.images,
                            failedImages=result.failed, seconds=round(result.seconds, 3), finishedAt=time.time(),
                            error=None)
        summary = result.to_dict()
        summary["timings"] = {k: round(v, 3) for k, v in result.timings.items()}
        return summary
    finally:
        # Outcome first, lease last: a reader never sees "running" without a lease for a live shard.
        heartbeat.stop()
        store.release_lease(task.stem, owner)


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def embed_shard_task(self, task: dict) -> dict:  # noqa: ANN001
    """Celery entry point; arguments are plain data (no credentials).

    A duplicate delivery that finds another worker's live lease does no work, but it is not simply
    dropped: it comes back after one lease period, and then finds the shard done (exits), still
    leased (waits again), or its lease expired because that worker died (takes the shard over). So a
    shard redelivered by the broker is never lost, even with no operator watching the leases."""
    shard_task = ShardTask.from_dict(task)
    result = run_shard_task(shard_task)
    if result["status"] == "duplicate":
        raise self.retry(countdown=max(lease_seconds(), 1))
    return result
