"""The Celery application, torch-free so the operator can enqueue without importing the worker.

Settings follow the shape of long GPU tasks: late acks, requeue when the worker process is lost,
one task prefetched at a time, and a visibility timeout longer than the longest shard. A shard in
flight also holds a lease (see embedjob.progress) so a dead worker's shard is redone long before
the visibility timeout.
"""

from __future__ import annotations

import json

from celery import Celery

from embedjob import settings as settings_module
from embedjob.settings import Settings


def transport_options(settings: Settings) -> dict:
    # Must exceed the longest shard; a dead worker's shard comes back sooner through its lease.
    opts: dict = {"visibility_timeout": settings.visibility_timeout}
    # How often a consumer looks for unacked messages past their visibility timeout (kombu's default
    # is every 10 s, scanning on every 10th tick). Tests shorten it to see redelivery quickly.
    if settings.restore_interval:
        opts.update(unacked_restore_interval=settings.restore_interval, unacked_restore_throttle=1)
    return opts


def make_app(url: str | None = None, settings: Settings | None = None) -> Celery:
    """The Celery app on ``url`` as given, or (default) on the settings' Redis with its password and,
    for ``rediss://``, verified TLS (``broker_use_ssl`` with CERT_REQUIRED and the CA file)."""
    settings = settings or settings_module.load()
    ssl_options = None
    if url is None:
        url = settings.redis_connection_url
        ssl_options = settings.redis_ssl_options()
    app = Celery("embedjob", broker=url, backend=None)
    if ssl_options:
        app.conf.update(broker_use_ssl=dict(ssl_options), redis_backend_use_ssl=dict(ssl_options))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=None,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_default_queue="embedjob",
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options(settings),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app


app = make_app()


def _queue_keys(queue: str) -> list[str]:
    # Kombu's Redis transport keeps a queue's waiting messages in a list named after it, and messages
    # with a priority in lists suffixed "\x06\x16<priority>".
    return [queue] + [f"{queue}\x06\x16{p}" for p in range(1, 10)]


def queue_lengths(client, queues: list[str]) -> dict[str, int]:  # noqa: ANN001
    """Messages waiting in each of ``queues`` (over its priority lists; delivered ones are not
    counted), in one round trip."""
    pipe = client.pipeline(transaction=False)
    for q in queues:
        for key in _queue_keys(q):
            pipe.llen(key)
    lengths = pipe.execute()
    n = len(_queue_keys(""))
    return {q: sum(lengths[i * n:(i + 1) * n]) for i, q in enumerate(queues)}


def _task_id(message: object) -> str:
    """The Celery task id of one kombu message (a JSON string, or its parsed dict)."""
    try:
        if isinstance(message, str | bytes):
            message = json.loads(message)
        return str(message.get("headers", {}).get("id", ""))  # type: ignore[union-attr]
    except (ValueError, AttributeError):
        return ""


def remove_queued_tasks(client, queue: str, task_id_prefix: str) -> int:  # noqa: ANN001
    """Delete waiting messages whose task id starts with ``task_id_prefix`` from the Redis list that
    backs ``queue`` (kombu stores each message as one JSON string). Tasks already taken by a worker
    are not touched; the worker drops them itself when it sees the job stopped."""
    removed = 0
    for key in _queue_keys(queue):
        for raw in client.lrange(key, 0, -1):
            if _task_id(raw).startswith(task_id_prefix):
                removed += int(client.lrem(key, 1, raw))
    return removed


def broker_snapshot(client, queue: str, task_id_prefix: str) -> tuple[set[str], dict[str, float]]:  # noqa: ANN001
    """Task ids starting with ``task_id_prefix`` that the broker holds: (waiting in ``queue``'s
    lists, delivered to a consumer but not acknowledged -> delivery time). Kombu keeps delivered
    messages in the ``unacked`` hash (delivery tag -> [message, exchange, routing key]) and their
    delivery times in the ``unacked_index`` sorted set."""
    waiting = {tid for key in _queue_keys(queue) for tid in map(_task_id, client.lrange(key, 0, -1))
               if tid.startswith(task_id_prefix)}
    delivered: dict[str, float] = {}
    times = dict(client.zrange("unacked_index", 0, -1, withscores=True))
    for tag, raw in client.hgetall("unacked").items():
        try:
            tid = _task_id(json.loads(raw)[0])
        except (ValueError, IndexError, TypeError):
            continue
        if tid.startswith(task_id_prefix):
            delivered[tid] = float(times.get(tag, 0.0))
    return waiting, delivered
