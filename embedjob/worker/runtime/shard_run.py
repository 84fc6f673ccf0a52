"""One delivered shard, from message to recorded outcome: the Celery task's body.

Per task (see embedjob.progress for the Redis keys):
1. the job was suspended or deleted -> drop it (``cancelled``);
2. the shard's manifest exists -> record it succeeded, no work (``skipped``);
3. another live worker holds the shard's lease -> ``duplicate``, no work done twice;
4. otherwise take the lease, renew it by heartbeat while embedding, record the outcome;
5. the worker got SIGTERM and the shard cannot finish before ``EMBEDJOB_SHUTDOWN_DEADLINE``: abort
   it (nothing committed), record it ``queued`` again, release the lease and requeue the message at
   once (``given_back``): another worker redoes it without waiting for the lease to expire.
Every exception records a ``failed`` outcome with the error, classified transient or hard (see
embedjob.policy); a Redis outage is waited out (bounded), then the message goes back to the broker
(:class:`~embedjob.worker.runtime.heartbeat.Redeliver`).

:func:`embed_task` is the part without Redis (load the model, embed, write the outputs): ``embedjob
run`` calls it too (embedjob.cli.run), so a local run embeds exactly as a worker does.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from embedjob import limits, logs
from embedjob import settings as settings_module
from embedjob.access import AccessPolicy
from embedjob.contract import EmbedOptions, ShardTask
from embedjob.layout import shard_outputs
from embedjob.policy import describe_failure
from embedjob.progress import ProgressStore, redis_client
from embedjob.results import ManifestUnreadable, read_manifest, read_shard_record
from embedjob.storage import Storage, StorageError, StorageOptions
from embedjob.worker.host import available_cpus
from embedjob.worker.runtime import lifecycle, metrics
from embedjob.worker.runtime.heartbeat import Heartbeat, Redeliver, release_lease, with_redis, worker_id
from embedjob.worker.runtime.lifecycle import GiveBack

if TYPE_CHECKING:
    from embedjob.worker.datapath.shard import ShardResult
    from embedjob.worker.model.embedder import Embedder

log = logging.getLogger("embedjob.worker")


class ShardRunner:
    """Runs delivered shard tasks as ``owner`` (default: this process's :func:`worker_id`, so each pool
    process forked after the runner was made is its own lease owner), keeping their progress in Redis
    through one client it owns (``client``, or one made from the worker's settings on first use)."""

    def __init__(self, client: redis.Redis | None = None, owner: str | None = None) -> None:
        self._client = client
        self._owner = owner

    @property
    def owner(self) -> str:
        return self._owner or worker_id()

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis_client()
        return self._client

    def store(self, job: str) -> ProgressStore:
        return ProgressStore(self.client, job)

    def run(self, task: ShardTask) -> dict[str, Any]:
        """The task body. Every path ends in a recorded outcome: an exception anywhere records the
        shard ``failed`` with the error (and whether it is transient), except when Redis itself stays
        unreachable, which raises :class:`Redeliver` so the message goes back to the broker. Every line
        logged meanwhile names the job, the shard, the attempt and this worker (embedjob.logs)."""
        with logs.shard_context(job=task.job, shard=task.shard, stem=task.stem, attempt=task.attempt,
                                worker=self.owner), lifecycle.TaskMarker(task.stem) as marker:
            return self._run(task, marker)

    def _run(self, task: ShardTask, marker: lifecycle.TaskMarker) -> dict[str, Any]:
        owner = self.owner
        store = self.store(task.job)
        if lifecycle.shutting_down():  # taken after SIGTERM (prefetched): nothing started, hand it back
            metrics.SHARDS.labels("given_back").inc()
            return {"status": "given_back", "stem": task.stem}
        if with_redis(store.control, "reading the job's control flag") in ("suspended", "deleted"):
            metrics.SHARDS.labels("cancelled").inc()
            return {"status": "cancelled", "stem": task.stem}

        try:
            # Before any storage access with this worker's credentials: a message naming a location
            # outside the storage allow-list (or a local path), or with options beyond this worker's
            # ceilings, is refused, whoever wrote it to Redis.
            check_task_locations(task)
            check_task_options(task)
            options, storage = task_inputs(task)
        except Exception as e:  # noqa: BLE001 - a bad message: recorded
            return _failed(store, task, e)

        if not with_redis(lambda: store.acquire_lease(task.stem, owner), f"taking the lease on {task.stem}"):
            holder = with_redis(lambda: store.lease_owner(task.stem), "reading the lease")
            metrics.SHARDS.labels("duplicate").inc()
            return {"status": "duplicate", "stem": task.stem, "holder": holder}

        heartbeat = Heartbeat(store, task.stem, owner)
        metrics.SHARDS_RUNNING.inc()
        try:
            # The skip decision of a delivered task lives here, and only here (the plans decide what
            # to enqueue; embed_shard always embeds). Checked under the lease: a duplicate delivery
            # that arrives after another worker committed sees the manifest and does not redo it.
            try:
                counts = None if options.overwrite else committed_counts(task, storage)
            except Exception as e:  # noqa: BLE001 - storage unreachable, access denied: recorded
                return _failed(store, task, e)
            if counts is not None:
                record_outcome(store, task.stem, "succeeded", images=counts[0], failedImages=counts[1],
                               tarError=counts[2], finishedAt=time.time())
                metrics.SHARDS.labels("skipped").inc()
                return {"status": "skipped", "stem": task.stem}
            try:
                with_redis(lambda: store.set_state(task.stem, "running", attempt=task.attempt, worker=owner,
                                                   startedAt=time.time(), error=None, imagesSoFar=0,
                                                   gpu=lifecycle.assigned_gpu()),
                           f"recording {task.stem} as running")
                with_redis(lambda: store.count_execution(task.stem), "counting the execution")
                heartbeat.start()

                def on_progress(n: int) -> None:
                    heartbeat.images = n
                    marker.progress()
                    lifecycle.check_give_back()

                result = embed_task(task, options, storage, on_progress=on_progress,
                                    before_embed=lifecycle.check_give_back)
            except Redeliver:
                raise
            except GiveBack as e:
                heartbeat.stop()
                return _given_back(store, task, owner, e)
            except Exception as e:  # noqa: BLE001 - recorded for the operator's retry policy
                heartbeat.stop()
                return _failed(store, task, e)
            # The outputs are committed (manifest written): record success even if the lease was lost meanwhile.
            heartbeat.stop()
            # The commit's id: the same on every retry of this write (Redis may have applied a write
            # whose reply was lost when it died), different for another execution of the shard.
            record_outcome(store, task.stem, "succeeded", commit=uuid.uuid4().hex, attempt=task.attempt,
                           images=result.images,
                           failedImages=result.failed, seconds=round(result.seconds, 3), finishedAt=time.time(),
                           tarError=result.tar_error, error=None, transient=None, permanent=None, errorCode=None,
                           accessError=None)
            _count_success(task, storage, result)
            summary = result.to_dict()
            summary["timings"] = {k: round(v, 3) for k, v in result.timings.items()}
            return summary
        finally:
            metrics.SHARDS_RUNNING.dec()
            # Outcome first, lease last: a reader never sees "running" without a lease for a live shard.
            heartbeat.stop()
            release_lease(store, task.stem, owner)


# -- the shard itself, without Redis (the local runner's path too) ---------------------------------------
def task_inputs(task: ShardTask) -> tuple[EmbedOptions, Storage]:
    """The message's options and storage (credentials from this process's environment)."""
    return EmbedOptions(**task.options), Storage(StorageOptions.from_dict(task.storage))


def load_model(task: ShardTask, options: EmbedOptions) -> Embedder:
    """The task's model, loaded once per process; a real load (not a cache hit) is timed."""
    from embedjob.worker.model.load import load_or_reuse

    t0 = time.perf_counter()
    embedder, cached = load_or_reuse(task.model, device=options.device, precision=options.precision,
                                     compile=options.compile, text=options.text)
    if not cached:
        metrics.MODEL_LOAD_SECONDS.observe(time.perf_counter() - t0)
    return embedder


def embed_task(task: ShardTask, options: EmbedOptions, storage: Storage, *,
               on_progress: Callable[[int], None] | None = None,
               before_embed: Callable[[], None] | None = None) -> ShardResult:
    """Load the model and embed the task's shard (outputs committed when it returns).
    ``before_embed`` runs between the model load and the first batch."""
    from embedjob.worker.datapath.shard import embed_shard

    embedder = load_model(task, options)
    heads = None
    if options.scores:
        from embedjob.worker.model.heads import load_heads
        from embedjob.worker.model.load import default_model_dir

        heads = load_heads(options.scores, embedder.dim, default_model_dir())
    if before_embed is not None:
        before_embed()
    max_batch = embedder.max_batch  # lowered by the model after a CUDA OOM
    result = embed_shard(task.shard, task.output, embedder, options, stem=task.stem, storage=storage,
                         on_progress=on_progress, heads=heads)
    metrics.record_backoff(max_batch, embedder.max_batch)
    return result


# -- outcomes --------------------------------------------------------------------------------------------
def record_outcome(store: ProgressStore, stem: str, state: str, *, commit: str = "", **info: Any) -> None:
    """Record a shard's outcome, waiting for Redis if it is down. A deleted job's keys are gone: they
    are not recreated."""

    def write() -> None:
        if store.control() != "deleted":
            store.set_state(stem, state, commit=commit, **info)

    with_redis(write, f"recording {stem} as {state}")


def committed_counts(task: ShardTask, storage: Storage) -> tuple[int, int, str | None] | None:
    """(images, failed images, tar error) of the shard's committed outputs, or None when it is not done.
    A manifest that cannot be read is committed all the same, with its counts unknown (0), as the
    operator takes it (embedjob.operator.leases.committed)."""
    if not storage.exists(shard_outputs(task.output, task.stem).manifest):
        return None
    try:
        record = read_shard_record(task.output, task.stem, storage)
    except ManifestUnreadable as e:
        log.warning("%s", e)
        return 0, 0, None
    return record["images"], record["failedImages"], record["tarError"]


def check_task_locations(task: ShardTask) -> None:
    """Raise :class:`~embedjob.access.StorageNotAllowed` when the message's input, output or model is
    outside the storage allow-list or a local path where none is allowed (embedjob.access)."""
    model = task.model if isinstance(task.model, dict) else {}
    model_path = model.get("path") or None
    name = str(model.get("name") or "")
    if not model_path and name and (os.path.isabs(name) or name.startswith(".") or os.path.exists(name)):
        model_path = name  # a "hub id" that is really a folder loads from disk: it is a path
    endpoint = (task.storage or {}).get("endpoint") if isinstance(task.storage, dict) else None
    policy = AccessPolicy.from_settings(settings_module.load())
    policy.check_task(str(task.shard), str(task.output), model_path, endpoint, stem=str(task.stem))
    # A score head's weights file is checked as a model folder is (a local path only where allowed).
    scores = task.options.get("scores") if isinstance(task.options, dict) else None
    for head in (scores or {}).values() if isinstance(scores, dict) else ():
        if isinstance(head, dict) and head.get("path"):
            policy.check_task(str(task.shard), str(task.output), str(head["path"]), endpoint, stem=str(task.stem))


def check_task_options(task: ShardTask) -> None:
    """Raise :class:`~embedjob.limits.OptionsNotAllowed` when the message's options or model are beyond
    this worker's own ceilings (``EMBEDJOB_MAX_*``, its CPUs, ``EMBEDJOB_MODEL_ALLOW_LIST``; embedjob.limits)."""
    limits.check_task(task.options, task.model, settings_module.load(), available_cpus())


def _count_success(task: ShardTask, storage: Storage, result: ShardResult) -> None:
    """Worker metrics of an embedded shard; the failure reasons come from its manifest (the
    pipeline records each skipped image there). Never fails the shard."""
    reasons: list[str] = []
    if result.failed:
        try:
            manifest = read_manifest(task.output, task.stem, storage)
            reasons = [str(f.get("reason", "")) for f in manifest.get("failed") or []]
        except Exception as e:  # noqa: BLE001
            log.warning("metrics: cannot read the failure reasons of %s: %s", task.stem, e)
        reasons += ["unknown"] * max(0, result.failed - len(reasons))
    try:
        metrics.record_success(result.images, reasons, result.seconds, result.timings, result.batch_size)
    except Exception as e:  # noqa: BLE001
        log.warning("metrics: %s", e)


def _given_back(store: ProgressStore, task: ShardTask, owner: str, exc: GiveBack) -> dict[str, Any]:
    """SIGTERM and the shard could not finish in time: nothing was committed (the writer commits only
    at the end). ``running -> queued`` (compare-and-set) before the lease goes, so the operator never
    counts a lease expiry; the caller requeues the message, so the next free worker takes it at once."""
    log.warning("shard %s given back: %s", task.stem, exc)

    def record() -> None:
        if store.control() != "deleted" and store.set_state_if(task.stem, "running", "queued"):
            info = store.info(task.stem)
            store.update_info(task.stem, givenBack=int(info.get("givenBack") or 0) + 1, imagesSoFar=0,
                              givenBackAt=time.time())

    with_redis(record, f"giving {task.stem} back")
    metrics.SHARDS.labels("given_back").inc()
    return {"status": "given_back", "stem": task.stem}


def _failed(store: ProgressStore, task: ShardTask, exc: BaseException) -> dict[str, Any]:
    metrics.SHARDS.labels("failed").inc()
    failure = describe_failure(exc)
    kind = "transient" if failure["transient"] else "permanent, not retried" if failure.get("permanent") else "hard"
    log.error("shard %s failed (%s): %s", task.shard, kind, failure["error"],
              exc_info=not isinstance(exc, StorageError) and not failure.get("permanent"))
    record_outcome(store, task.stem, "failed", attempt=task.attempt, finishedAt=time.time(), **failure)
    return {"status": "failed", "stem": task.stem, **failure}
