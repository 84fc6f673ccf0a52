"""The Celery application, torch-free so the operator can enqueue without importing the worker.

Settings follow the shape of long GPU tasks: late acks, requeue when the worker process is lost,
one task prefetched at a time, and a visibility timeout longer than the longest shard. A shard in
flight also holds a lease (see embedjob.progress) so a dead worker's shard is redone long before
the visibility timeout.
"""

from __future__ import annotations

import os

from celery import Celery

from embedjob.progress import redis_url

# Must exceed the longest shard; a dead worker's shard comes back sooner through its lease.
DEFAULT_VISIBILITY_TIMEOUT = 6 * 3600


def visibility_timeout() -> int:
    return int(os.environ.get("EMBEDJOB_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT))


def transport_options() -> dict:
    opts: dict = {"visibility_timeout": visibility_timeout()}
    # How often a consumer looks for unacked messages past their visibility timeout (kombu's default
    # is every 10 s, scanning on every 10th tick). Tests shorten it to see redelivery quickly.
    interval = os.environ.get("EMBEDJOB_RESTORE_INTERVAL")
    if interval:
        opts.update(unacked_restore_interval=float(interval), unacked_restore_throttle=1)
    return opts


def make_app(url: str | None = None) -> Celery:
    url = url or redis_url()
    app = Celery("embedjob", broker=url, backend=None)
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
        broker_transport_options=transport_options(),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app


app = make_app()


def remove_queued_tasks(client, queue: str, task_id_prefix: str) -> int:  # noqa: ANN001
    """Delete waiting messages whose task id starts with ``task_id_prefix`` from the Redis list that
    backs ``queue`` (kombu stores each message as one JSON string). Tasks already taken by a worker
    are not touched; the worker drops them itself when it sees the job stopped."""
    import json

    removed = 0
    # Kombu's Redis transport uses the queue name as the list key (plus priority-suffixed lists).
    keys = [queue] + [f"{queue}\x06\x16{p}" for p in range(1, 10)]
    for key in keys:
        for raw in client.lrange(key, 0, -1):
            try:
                msg = json.loads(raw)
                tid = msg.get("headers", {}).get("id", "")
            except (ValueError, AttributeError):
                continue
            if tid.startswith(task_id_prefix):
                removed += int(client.lrem(key, 1, raw))
    return removed
