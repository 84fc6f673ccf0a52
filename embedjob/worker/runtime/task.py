"""The Celery task: a thin wrapper around :func:`embedjob.worker.datapath.shard.embed_shard`.

Start a worker with ``embedjob worker --queue embedjob`` (or
``celery -A embedjob.worker.runtime.task worker -Q embedjob -c 1``). One process per GPU.

Per task (see embedjob.progress for the Redis keys):
1. the job was suspended or deleted -> drop it (``cancelled``);
2. the shard's manifest exists -> record it succeeded, no work (``skipped``);
3. another live worker holds the shard's lease -> ``duplicate``, no work done twice;
4. otherwise take the lease, renew it by heartbeat while embedding, record the outcome;
5. the worker got SIGTERM and the shard cannot finish before ``EMBEDJOB_SHUTDOWN_DEADLINE``: abort
   it (nothing committed), record it ``queued`` again, release the lease and requeue the message at
   once (``given_back``): another worker redoes it without waiting for the lease to expire.
Every exception records a ``failed`` outcome with the error, classified transient or hard (see
embedjob.policy); a Redis outage is waited out (bounded), then the message goes back to the broker.
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
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import bootsteps
from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutting_down

from embedjob import logs
from embedjob import settings as settings_module
from embedjob.access import AccessPolicy
from embedjob.broker import app
from embedjob.contract import TASK_NAME, EmbedOptions, ShardTask
from embedjob.layout import shard_outputs
from embedjob.policy import describe_failure
from embedjob.progress import ProgressStore, redis_client
from embedjob.results import read_manifest, shard_counts
from embedjob.storage import Storage, StorageError, StorageOptions
from embedjob.worker.runtime import lifecycle, metrics
from embedjob.worker.runtime.lifecycle import GiveBack

log = logging.getLogger("embedjob.worker")
T = TypeVar("T")

_worker_id: tuple[int, str] | None = None


def worker_id() -> str:
    """This process's identity as a lease owner: host, pid and a random part. Made in the process that
    asks, so each prefork pool child (forked after import) has its own."""
    global _worker_id
    if _worker_id is None or _worker_id[0] != os.getpid():
        _worker_id = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    return _worker_id[1]
_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_redis = None


class Redeliver(Exception):  # noqa: N818 - an instruction, not an error report
    """Redis stayed unreachable: nothing could be recorded, so the message goes back to the broker
    (Celery ``Reject(requeue=True)``; if even that fails, the operator's safety net re-enqueues)."""


def _progress(job: str) -> ProgressStore:
    global _redis
    if _redis is None:
        _redis = redis_client()
    return ProgressStore(_redis, job)


def with_redis(fn: Callable[[], T], what: str, budget: float | None = None) -> T:
    """``fn()``, retried while Redis is unreachable (restart, failover), for at most ``budget``
    seconds (settings.redis_wait_seconds); then :class:`Redeliver`. Every retry is logged."""
    budget = settings_module.load().redis_wait_seconds if budget is None else budget
    deadline = time.monotonic() + budget
    delay = 0.25
    while True:
        try:
            return fn()
        except _REDIS_ERRORS as e:
            if time.monotonic() + delay > deadline:
                raise Redeliver(f"Redis unreachable for {budget:.0f}s while {what}: {e}") from e
            log.warning("Redis unreachable while %s (%s); retrying in %.1fs", what, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class _Heartbeat(threading.Thread):
    """Renews the shard lease and publishes images-so-far until stopped. A lease that vanished with
    Redis's data (a restart) is taken again; only a lease held by another worker counts as lost."""

    def __init__(self, store: ProgressStore, stem: str, owner: str) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{stem}")
        self.store, self.stem, self.owner = store, stem, owner
        self.images = 0
        self.lost = threading.Event()
        self._halt = threading.Event()
        self.interval = max(store.lease_seconds / 4, 0.5)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                if not self.store.renew_lease(self.stem, self.owner) and \
                        not self.store.acquire_lease(self.stem, self.owner):
                    self.lost.set()
                    log.warning("lease on %s lost to %s", self.stem, self.store.lease_owner(self.stem))
                    return
                self.store.update_info(self.stem, imagesSoFar=self.images)
            except Exception as e:  # noqa: BLE001 - a Redis blip must not kill the shard; next beat retries
                log.warning("heartbeat for %s failed: %s", self.stem, e)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)


def _record(store: ProgressStore, stem: str, state: str, *, commit: str = "", **info: Any) -> None:
    """Record a shard's outcome, waiting for Redis if it is down. A deleted job's keys are gone: they
    are not recreated."""

    def write() -> None:
        if store.control() != "deleted":
            store.set_state(stem, state, commit=commit, **info)

    with_redis(write, f"recording {stem} as {state}")


def run_shard_task(task: ShardTask, owner: str | None = None) -> dict[str, Any]:
    """The task body as a plain function (what tests and the local runner can call too).

    Every path ends in a recorded outcome: an exception anywhere records the shard ``failed`` with
    the error (and whether it is transient), except when Redis itself stays unreachable, which
    raises :class:`Redeliver` so the message goes back to the broker. Every line logged meanwhile
    names the job, the shard, the attempt and this worker (embedjob.logs)."""
    owner = owner or worker_id()
    with logs.shard_context(job=task.job, shard=task.shard, stem=task.stem, attempt=task.attempt, worker=owner), \
            lifecycle.TaskMarker(task.stem) as marker:
        return _run_shard_task(task, owner, marker)


def _run_shard_task(task: ShardTask, owner: str, marker: lifecycle.TaskMarker) -> dict[str, Any]:
    from embedjob.worker.datapath.shard import embed_shard
    from embedjob.worker.model.load import load_embedder

    store = _progress(task.job)
    if lifecycle.shutting_down():  # taken after SIGTERM (prefetched): nothing started, hand it back
        metrics.SHARDS.labels("given_back").inc()
        return {"status": "given_back", "stem": task.stem}
    if with_redis(store.control, "reading the job's control flag") in ("suspended", "deleted"):
        metrics.SHARDS.labels("cancelled").inc()
        return {"status": "cancelled", "stem": task.stem}

    try:
        # Before any storage access with this worker's credentials: a message naming a location
        # outside the storage allow-list (or a local path) is refused, whoever wrote it to Redis.
        check_task_locations(task)
        options = EmbedOptions(**task.options)
        storage = Storage(StorageOptions.from_dict(task.storage))
    except Exception as e:  # noqa: BLE001 - a bad message: recorded
        return _failed(store, task, e)

    if not with_redis(lambda: store.acquire_lease(task.stem, owner), f"taking the lease on {task.stem}"):
        holder = with_redis(lambda: store.lease_owner(task.stem), "reading the lease")
        metrics.SHARDS.labels("duplicate").inc()
        return {"status": "duplicate", "stem": task.stem, "holder": holder}

    heartbeat = _Heartbeat(store, task.stem, owner)
    metrics.SHARDS_RUNNING.inc()
    try:
        # The skip decision of a delivered task lives here, and only here (the plans decide what
        # to enqueue; embed_shard always embeds). Checked under the lease: a duplicate delivery
        # that arrives after another worker committed sees the manifest and does not redo it.
        try:
            counts = None if options.overwrite else _committed_counts(task, storage)
        except Exception as e:  # noqa: BLE001 - storage unreachable, access denied: recorded
            return _failed(store, task, e)
        if counts is not None:
            _record(store, task.stem, "succeeded", images=counts[0], failedImages=counts[1], finishedAt=time.time())
            metrics.SHARDS.labels("skipped").inc()
            return {"status": "skipped", "stem": task.stem}
        try:
            with_redis(lambda: store.set_state(task.stem, "running", attempt=task.attempt, worker=owner,
                                               startedAt=time.time(), error=None, imagesSoFar=0,
                                               gpu=lifecycle.assigned_gpu()),
                       f"recording {task.stem} as running")
            with_redis(lambda: store.count_execution(task.stem), "counting the execution")
            heartbeat.start()
            embedder = _load_embedder(load_embedder, task, options)

            def on_progress(n: int) -> None:
                heartbeat.images = n
                marker.progress()
                lifecycle.check_give_back()

            lifecycle.check_give_back()

            max_batch = getattr(embedder, "max_batch", None)  # lowered by the model after a CUDA OOM
            result = embed_shard(task.shard, task.output, embedder, options, stem=task.stem, storage=storage,
                                 on_progress=on_progress)
            metrics.record_backoff(max_batch, getattr(embedder, "max_batch", None))
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
        _record(store, task.stem, "succeeded", commit=uuid.uuid4().hex, attempt=task.attempt,
                images=result.images,
                failedImages=result.failed, seconds=round(result.seconds, 3), finishedAt=time.time(),
                error=None, transient=None, errorCode=None, accessError=None)
        _count_success(task, storage, result, embedder.resolve_batch_size(options.batch_size))
        summary = result.to_dict()
        summary["timings"] = {k: round(v, 3) for k, v in result.timings.items()}
        return summary
    finally:
        metrics.SHARDS_RUNNING.dec()
        # Outcome first, lease last: a reader never sees "running" without a lease for a live shard.
        heartbeat.stop()
        try:
            store.release_lease(task.stem, owner)
        except Exception as e:  # noqa: BLE001 - it expires by itself; the outcome is what counts
            log.warning("could not release the lease on %s: %s", task.stem, e)


def _committed_counts(task: ShardTask, storage: Storage) -> tuple[int, int] | None:
    """(images, failed images) of the shard's committed outputs, or None when it is not done."""
    if not storage.exists(shard_outputs(task.output, task.stem).manifest):
        return None
    return shard_counts(read_manifest(task.output, task.stem, storage))


def check_task_locations(task: ShardTask) -> None:
    """Raise :class:`~embedjob.access.StorageNotAllowed` when the message's input, output or model is
    outside the storage allow-list or a local path where none is allowed (embedjob.access)."""
    model = task.model if isinstance(task.model, dict) else {}
    model_path = model.get("path") or None
    name = str(model.get("name") or "")
    if not model_path and name and (os.path.isabs(name) or name.startswith(".") or os.path.exists(name)):
        model_path = name  # a "hub id" that is really a folder loads from disk: it is a path
    endpoint = (task.storage or {}).get("endpoint") if isinstance(task.storage, dict) else None
    AccessPolicy.from_settings(settings_module.load()).check_task(str(task.shard), str(task.output), model_path,
                                                                  endpoint)


def _load_embedder(load: Callable[..., Any], task: ShardTask, options: EmbedOptions) -> Any:
    """``load_embedder``, timed when it really loads (it caches one model per process)."""
    from embedjob.worker.model import load as model_module

    cache = getattr(model_module, "_cache", None)
    before = len(cache) if isinstance(cache, dict) else None
    t0 = time.perf_counter()
    embedder = load(task.model, device=options.device, precision=options.precision, compile=options.compile)
    if before is None or len(cache) > before:
        metrics.MODEL_LOAD_SECONDS.observe(time.perf_counter() - t0)
    return embedder


def _count_success(task: ShardTask, storage: Storage, result: Any, batch_size: int) -> None:
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
        metrics.record_success(result.images, reasons, result.seconds, result.timings, batch_size)
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
    log.error("shard %s failed (%s): %s", task.shard, "transient" if failure["transient"] else "hard",
              failure["error"], exc_info=not isinstance(exc, StorageError))
    _record(store, task.stem, "failed", attempt=task.attempt, finishedAt=time.time(), **failure)
    return {"status": "failed", "stem": task.stem, **failure}


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def embed_shard_task(self, task: dict) -> dict:  # noqa: ANN001
    """Celery entry point; arguments are plain data (no credentials).

    A duplicate delivery that finds another worker's live lease does no work, but it is not simply
    dropped: it comes back after one lease period, and then finds the shard done (exits), still
    leased (waits again), or its lease expired because that worker died (takes the shard over). So a
    shard redelivered by the broker is never lost, even with no operator watching the leases."""
    shard_task = ShardTask.from_dict(task)
    try:
        result = run_shard_task(shard_task)
    except Redeliver as e:
        log.error("%s: giving the message back to the broker", e)
        raise Reject(str(e), requeue=True) from e
    if result["status"] == "duplicate":
        raise self.retry(countdown=max(settings_module.load().lease_seconds, 1))
    if result["status"] == "given_back":
        raise Reject("worker shutting down: shard given back", requeue=True)
    return result


@worker_ready.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    """The worker's ``/metrics`` (all its processes), from the main process once the pool is up; the
    model preload of the threads pool (``embedjob worker`` serves the probes from its start)."""
    s = settings_module.load()
    if s.metrics_port:
        metrics.serve(s.metrics_port, s.metrics_addr)
    if not lifecycle.pool_processes():  # threads pool: this process runs the shards
        _preload_then_ready()


@worker_process_shutdown.connect
def _child_exited(pid: int | None = None, **_: Any) -> None:
    metrics.child_exited(pid or os.getpid())
    lifecycle.process_exited(pid or os.getpid())


@worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    """SIGTERM (Celery's warm shutdown): no new shard starts; a shard still running
    ``EMBEDJOB_SHUTDOWN_DEADLINE`` seconds later is given back (pool children read it from the
    health folder). Size the deadline below the pod's terminationGracePeriodSeconds."""
    lifecycle.begin_shutdown(settings_module.load().shutdown_deadline)
    workers_registry.leave()


@worker_process_init.connect
def _pool_process_started(**_: Any) -> None:
    """A prefork pool child (one per GPU): pin it to its own GPU before anything initialises CUDA,
    then load the model (ready once loaded)."""
    from billiard.process import current_process

    lifecycle.pin_gpu(int(getattr(current_process(), "index", 0) or 0))
    _preload_then_ready()


def _preload_then_ready() -> None:
    """Load ``EMBEDJOB_PRELOAD_MODEL`` in the background (Celery must not wait for it), then mark this
    process ready. Tasks that arrive meanwhile wait for the same load (the model cache is locked)."""
    name = settings_module.load().preload_model

    def load() -> None:
        if name:
            from embedjob.worker.model.load import load_embedder

            t0 = time.perf_counter()
            try:
                load_embedder(name)
            except Exception as e:  # noqa: BLE001 - not ready; the probe says why
                log.error("preloading the model %s failed: %s", name, e)
                return
            metrics.MODEL_LOAD_SECONDS.observe(time.perf_counter() - t0)
            log.info("model %s loaded in %.1fs", name, time.perf_counter() - t0)
        lifecycle.mark_ready(name)

    threading.Thread(target=load, daemon=True, name="preload-model").start()


class _WorkersRegistry:
    """Each consumer announces itself in Redis (``embedjob:workers:<queue>``, a sorted set of
    ``<worker>|<slots>`` by last-seen time): the operator sizes each job's share of the queue from the
    live slots (embedjob.operator.fairness)."""

    def __init__(self) -> None:
        self.members: list[tuple[str, str]] = []
        self.last = 0.0

    def announce(self, queues: list[str], name: str, slots: int) -> None:
        from embedjob.fairness import workers_key

        if time.monotonic() - self.last < 5:
            return
        self.last = time.monotonic()
        self.members = [(workers_key(q), f"{name}|{slots}") for q in queues]
        try:
            r = redis_client_fast()
            pipe = r.pipeline(transaction=False)
            for key, member in self.members:
                pipe.zadd(key, {member: time.time()})
            pipe.execute()
        except Exception as e:  # noqa: BLE001 - the operator falls back to its floor
            log.debug("could not announce the worker: %s", e)

    def leave(self) -> None:
        try:
            r = redis_client_fast()
            for key, member in self.members:
                r.zrem(key, member)
        except Exception as e:  # noqa: BLE001
            log.debug("could not withdraw the worker: %s", e)


workers_registry = _WorkersRegistry()


_fast_client: redis.Redis | None = None


def redis_client_fast() -> redis.Redis:
    """A client with short timeouts, for calls made from inside the consumer loop (never block it long)."""
    global _fast_client
    if _fast_client is None:
        # With the password and TLS settings, like every other client (a bare URL is refused by a
        # protected Redis, and the operator would never see this worker's slots).
        _fast_client = redis_client(socket_timeout=2, connect_timeout=2)
    return _fast_client


class ConsumerBeat(bootsteps.StartStopStep):
    """Liveness of the consumer loop: a timer in the loop itself touches the health folder (a wedged
    loop stops touching it) and announces the worker's slots to the operator."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref = None

    def start(self, c: Any) -> None:
        self.beat(c)
        self.tref = c.timer.call_repeatedly(lifecycle.CONSUMER_BEAT, self.beat, (c,), priority=10)

    def beat(self, c: Any) -> None:
        lifecycle.consumer_beat()
        if not lifecycle.shutting_down():
            slots = int(getattr(c.controller, "concurrency", 1) or 1)
            workers_registry.announce(list(c.app.amqp.queues.consume_from or ["embedjob"]), c.hostname, slots)

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


app.steps["consumer"].add(ConsumerBeat)
# Survives a broker connection loss with shards in flight (a Celery 5.7 + kombu cleanup error stopped
# the worker on Redis restarts; see embedjob.worker.runtime.consumer).
app.conf.worker_consumer = "embedjob.worker.runtime.consumer:Consumer"
