"""kopf handlers for EmbeddingJob: thin wrappers over embedjob.operator.accept, .reconcile (the tick)
and .cleanup.

Run with ``embedjob operator`` (or ``kopf run -m embedjob.operator.handlers --standalone -A``).
Operator-wide settings are made once: :class:`embedjob.settings.Settings` is read at start-up (the
tick interval is needed when the handlers are registered), and :func:`configure` puts the Redis
client and the settings into kopf's operator ``memo``; each job's in-process state
(:class:`~embedjob.operator.events.JobMemory`) lives in its per-resource ``memo``. Credentials:
``AWS_*`` from the environment for planning and manifests (never from the resource, never in a message).

Handlers are synchronous (kopf runs them in a thread pool); a per-job lock serialises a job's tick
with its cleanup.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf
from kubernetes import client, config

from embedjob.access import AccessPolicy
from embedjob.broker import make_app
from embedjob.operator import status as job_status
from embedjob.operator.accept import accept as accept_job
from embedjob.operator.accept import is_planned
from embedjob.operator.cleanup import cleanup as cleanup_job
from embedjob.operator.events import Event, JobMemory
from embedjob.operator.metrics import OperatorMetrics
from embedjob.operator.reconcile import Reconciler
from embedjob.progress import ProgressStore, redis_client
from embedjob.settings import load, redact_url
from embedjob.spec import API_GROUP, API_VERSION, PLURAL

FINALIZER = f"{API_GROUP}/cleanup"
SETTINGS = load()
INTERVAL = SETTINGS.operator_interval
RESOURCE = (API_GROUP, API_VERSION, PLURAL)

log = logging.getLogger("embedjob.operator")


def _store(memo: kopf.Memo, uid: str) -> ProgressStore:
    return ProgressStore(memo.redis, uid, lease_seconds=memo.settings.lease_seconds)


def _job(memo: kopf.Memo) -> JobMemory:
    if "job" not in memo:  # made once per resource, not on every tick
        memo.setdefault("job", JobMemory())
    return memo["job"]


def _post(body: kopf.Body, events: list[Event]) -> None:
    for e in events:
        kopf.event(body, type=e.type, reason=e.reason, message=e.message[:1000])


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Every operator-wide knob, in one place."""
    memo.settings = SETTINGS
    memo.access = AccessPolicy.from_settings(SETTINGS)  # the storage allow-list jobs are checked against
    memo.redis = redis_client(config=SETTINGS)  # password and TLS from the settings, never logged
    memo.celery = make_app(settings=SETTINGS)
    memo.api = None  # the Kubernetes client, made on first use (ttlSecondsAfterFinished)
    log.info("broker and progress store: %s%s%s", redact_url(SETTINGS.redis_connection_url),
             " (password from EMBEDJOB_REDIS_PASSWORD)" if SETTINGS.redis_password else "",
             f" (TLS, CA {SETTINGS.redis_ca_file})" if SETTINGS.redis_ca_file else "")
    if SETTINGS.storage_allow_list is not None:
        log.info("storage allow-list: %s", dict(SETTINGS.storage_allow_list))
    else:
        log.warning("no storage allow-list (EMBEDJOB_STORAGE_ALLOW_LIST): jobs in every watched namespace may "
                    "read and write anything the workers' credentials reach, at any endpoint")
    memo.metrics = OperatorMetrics(memo.redis)
    if SETTINGS.metrics_port:
        memo.metrics.serve(SETTINGS.metrics_port, SETTINGS.metrics_addr)
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "embedjob-operator"
    settings.execution.max_workers = SETTINGS.operator_threads
    # A deletion waits for the object's timer to stop; a tick in progress (e.g. the one that deletes
    # the job for ttlSecondsAfterFinished) ends within seconds, so re-check often, not every 60 s.
    settings.background.instant_exit_timeout = 2.0
    settings.background.cancellation_polling = 1.0
    # Reconnect watches regularly: a silently dropped connection must not stall the operator.
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150


@kopf.on.probe(id="redis")
def redis_probe(memo: kopf.Memo, **_: Any) -> bool:
    """Reported on the liveness endpoint; a Redis outage is shown, not fatal."""
    try:
        return bool(memo.redis.ping())
    except Exception:  # noqa: BLE001
        return False


@kopf.on.create(*RESOURCE)
@kopf.on.resume(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def accept(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, uid: str, namespace: str, body: kopf.Body,
           patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Validate and plan a job not planned yet (new, or fixed after an invalid spec). The plan lands
    in the status before the first tick may enqueue anything."""
    if is_planned(status):
        return  # already accepted: changes are handled level-triggered by the tick
    try:
        result = accept_job(_store(memo, uid), dict(spec), dict(status), meta.get("generation"),
                            namespace=namespace, policy=memo.access, settings=memo.settings)
    except Exception as e:  # storage or Redis unreachable: try again shortly
        raise kopf.TemporaryError(f"cannot plan yet: {type(e).__name__}: {e}", delay=10) from e
    patch.status.update(job_status.status_patch(status, result.status))
    _post(body, result.events)


# backoff: should a tick fail anyway, kopf retries it at the tick interval, not after its default 60 s.
@kopf.on.timer(*RESOURCE, interval=INTERVAL, initial_delay=min(INTERVAL, 1.0), backoff=INTERVAL)
def tick(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, uid: str, name: str, namespace: str,
         body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Observe, retry, dispatch, report. Patches the status only when it changed. A failed tick
    (Redis restarting, storage or the apiserver unreachable) is logged and simply tried again at the
    next interval: the tick is level-triggered, so nothing is lost by skipping one."""
    rec = Reconciler(_store(memo, uid), memo.celery, _job(memo), memo.settings, namespace=namespace,
                     policy=memo.access)
    started = time.perf_counter()
    try:
        result = rec.tick(dict(spec), dict(status), meta.get("generation"))
    except Exception as e:  # noqa: BLE001 - transient by design; a persistent one shows in every tick's log
        memo.metrics.tick_errors.inc()
        log.warning("tick of %s/%s failed, retrying in %.0fs: %s: %s", namespace, name, INTERVAL,
                    type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        return
    finally:
        memo.metrics.tick_seconds.observe(time.perf_counter() - started)
    memo.metrics.jobs.update(namespace, name, uid, spec.get("queue"), result.status, result.dispatched)
    changes = job_status.status_patch(status, result.status)
    if changes:
        patch.status.update(changes)
    _post(body, result.events)
    if result.delete:
        _delete(memo, name, namespace)


@kopf.on.delete(*RESOURCE)
def cleanup(spec: kopf.Spec, uid: str, name: str, namespace: str, body: kopf.Body, memo: kopf.Memo,
            **_: Any) -> None:
    """Remove the job's queued tasks and Redis keys (outputs are kept) and its metric series. Never
    blocks deletion: after bounded retries the finalizer is released anyway, with a warning event."""
    memo.metrics.jobs.forget(namespace, name)
    quick = redis_client(config=memo.settings)  # short timeouts: a dead Redis must not hold the deletion
    quick.connection_pool.connection_kwargs.update(socket_timeout=5, socket_connect_timeout=2)
    with _job(memo).lock:
        ok, message = cleanup_job(ProgressStore(quick, uid), spec.get("queue") or "embedjob")
    _post(body, [Event("Normal" if ok else "Warning", "Cleaned" if ok else "CleanupIncomplete", message)])


def _delete(memo: kopf.Memo, name: str, namespace: str) -> None:
    """ttlSecondsAfterFinished: delete the resource (the finalizer then cleans up)."""
    if memo.api is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        memo.api = client.CustomObjectsApi()
    try:
        memo.api.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
        log.info("deleted %s/%s: ttlSecondsAfterFinished elapsed", namespace, name)
    except client.ApiException as e:
        if e.status != 404:
            raise
