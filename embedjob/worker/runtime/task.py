"""The Celery task: a thin wrapper around the shard run (embedjob.worker.runtime.shard_run).

Start a worker with ``embedjob worker --queue embedjob`` (or
``celery -A embedjob.worker.runtime.task worker -Q embedjob -c 1``). One process per GPU.

The task turns the shard run's outcome into Celery's terms: Redis unreachable -> the message goes
back to the broker; a shard given back on SIGTERM -> requeued at once; a duplicate delivery ->
re-checked one lease period later. The task never retries itself otherwise: real failures are
recorded and the operator (or the local runner) decides on retries; a dead worker's lease expires
and the shard is redone.
"""

from __future__ import annotations

import logging

from celery.exceptions import Reject

from embedjob import settings as settings_module
from embedjob.contract import REPORT_TASK_NAME, TASK_NAME, ShardTask
from embedjob.worker.runtime.app import app
from embedjob.worker.runtime.heartbeat import Redeliver
from embedjob.worker.runtime.report_run import run_report
from embedjob.worker.runtime.shard_run import ShardRunner

log = logging.getLogger("embedjob.worker")

# The worker process's runner: it owns the Redis client the shards' bookkeeping goes through.
runner = ShardRunner()


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def embed_shard_task(self, task: dict) -> dict:  # noqa: ANN001
    """Celery entry point; arguments are plain data (no credentials).

    A duplicate delivery that finds another worker's live lease does no work, but it is not simply
    dropped: it comes back after one lease period, and then finds the shard done (exits), still
    leased (waits again), or its lease expired because that worker died (takes the shard over). So a
    shard redelivered by the broker is never lost, even with no operator watching the leases."""
    shard_task = ShardTask.from_dict(task)
    try:
        result = runner.run(shard_task)
    except Redeliver as e:
        log.error("%s: giving the message back to the broker", e)
        raise Reject(str(e), requeue=True) from e
    if result["status"] == "duplicate":
        raise self.retry(countdown=max(settings_module.load().lease_seconds, 1))
    if result["status"] == "given_back":
        raise Reject("worker shutting down: shard given back", requeue=True)
    return result


@app.task(name=REPORT_TASK_NAME, acks_late=True)
def write_report_task(task: dict) -> dict:
    """The job's report page (spec.output.report), sent once by the operator when the job succeeded."""
    return run_report(task, runner.client)


__all__ = ["app", "embed_shard_task", "runner", "write_report_task"]
