"""kopf handlers for EmbeddingJob: thin wrappers over embedjob.operator.reconcile.

Run with ``embedjob operator`` (or ``kopf run -m embedjob.operator.handlers --standalone -A``).
Operator-wide settings are made once, in :func:`configure`. Environment:

- ``EMBEDJOB_REDIS_URL``: broker and progress store (the workers use the same one);
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL``: object store access for
  planning and manifests (never taken from the resource, never put into a message);
- ``EMBEDJOB_OPERATOR_INTERVAL``: seconds between status ticks (default 5).

Handlers are synchronous (kopf runs them in a thread pool); a per-job lock in reconcile serialises
a job's tick with its cleanup.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from embedjob.broker import app as celery_app
from embedjob.operator import reconcile
from embedjob.operator import status as st
from embedjob.progress import ProgressStore, redis_client
from embedjob.spec import API_GROUP, API_VERSION, PLURAL

FINALIZER = f"{API_GROUP}/cleanup"
INTERVAL = float(os.environ.get("EMBEDJOB_OPERATOR_INTERVAL", "5"))
RESOURCE = (API_GROUP, API_VERSION, PLURAL)

log = logging.getLogger("embedjob.operator")
_redis: Any = None


def _store(uid: str) -> ProgressStore:
    global _redis
    if _redis is None:
        _redis = redis_client()
    return ProgressStore(_redis, uid)


def _post(body: kopf.Body, events: list[reconcile.Event]) -> None:
    for e in events:
        kopf.event(body, type=e.type, reason=e.reason, message=e.message[:1000])


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Every operator-wide knob, in one place."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "embedjob-operator"
    settings.execution.max_workers = int(os.environ.get("EMBEDJOB_OPERATOR_THREADS", "8"))
    # A deletion waits for the object's timer to stop; a tick in progress (e.g. the one that deletes
    # the job for ttlSecondsAfterFinished) ends within seconds, so re-check often, not every 60 s.
    settings.background.instant_exit_timeout = 2.0
    settings.background.cancellation_polling = 1.0
    # Reconnect watches regularly: a silently dropped connection must not stall the operator.
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150


@kopf.on.probe(id="redis")
def redis_probe(**_: Any) -> bool:
    """Reported on the liveness endpoint; a Redis outage is shown, not fatal."""
    try:
        return bool(_store("probe").r.ping())
    except Exception:  # noqa: BLE001
        return False


@kopf.on.create(*RESOURCE)
@kopf.on.resume(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def accept(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, uid: str, body: kopf.Body,
           patch: kopf.Patch, **_: Any) -> None:
    """Validate and plan a job not planned yet (new, or fixed after an invalid spec). The plan lands
    in the status before the first tick may enqueue anything."""
    if reconcile.is_planned(status):
        return  # already accepted: changes are handled level-triggered by the tick
    try:
        result = reconcile.accept(_store(uid), dict(spec), dict(status), meta.get("generation"))
    except Exception as e:  # storage or Redis unreachable: try again shortly
        raise kopf.TemporaryError(f"cannot plan yet: {type(e).__name__}: {e}", delay=10) from e
    patch.status.update(st.status_patch(status, result.status))
    _post(body, result.events)


# backoff: should a tick fail anyway, kopf retries it at the tick interval, not after its default 60 s.
@kopf.on.timer(*RESOURCE, interval=INTERVAL, initial_delay=min(INTERVAL, 1.0), backoff=INTERVAL)
def tick(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, uid: str, name: str, namespace: str,
         body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Observe, retry, dispatch, report. Patches the status only when it changed. A failed tick
    (Redis restarting, storage or the apiserver unreachable) is logged and simply tried again at the
    next interval: the tick is level-triggered, so nothing is lost by skipping one."""
    rec = reconcile.Reconciler(_store(uid), celery_app, reconcile.memory_for(uid))
    try:
        result = rec.tick(dict(spec), dict(status), meta.get("generation"))
    except Exception as e:  # noqa: BLE001 - transient by design; a persistent one shows in every tick's log
        log.warning("tick of %s/%s failed, retrying in %.0fs: %s: %s", namespace, name, INTERVAL,
                    type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        return
    changes = st.status_patch(status, result.status)
    if changes:
        patch.status.update(changes)
    _post(body, result.events)
    if result.delete:
        _delete(name, namespace)


@kopf.on.delete(*RESOURCE)
def cleanup(spec: kopf.Spec, uid: str, body: kopf.Body, **_: Any) -> None:
    """Remove the job's queued tasks and Redis keys (outputs are kept). Never blocks deletion: after
    bounded retries the finalizer is released anyway, with a warning event."""
    store = ProgressStore(redis_client(), uid)
    store.r.connection_pool.connection_kwargs.update(socket_timeout=5, socket_connect_timeout=2)
    with reconcile.memory_for(uid).lock:
        ok, message = reconcile.cleanup(store, spec.get("queue") or "embedjob")
    _post(body, [reconcile.Event("Normal" if ok else "Warning", "Cleaned" if ok else "CleanupIncomplete", message)])


def _delete(name: str, namespace: str) -> None:
    """ttlSecondsAfterFinished: delete the resource (the finalizer then cleans up)."""
    from kubernetes import client

    try:
        _api().delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
        log.info("deleted %s/%s: ttlSecondsAfterFinished elapsed", namespace, name)
    except client.ApiException as e:
        if e.status != 404:
            raise


_api_client: Any = None


def _api() -> Any:
    global _api_client
    if _api_client is None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        _api_client = client.CustomObjectsApi()
    return _api_client
