"""The report task (``spec.output.report``): `embedjob report`'s page, written as ``report.html`` under
the job's output by a worker (it has the parquet reader and Pillow; the operator has neither).

The operator sends it once, when the job succeeds (embedjob.operator.observe.finish); the outcome goes
to Redis (``ProgressStore.record_report``), and the operator's next tick turns ``status.report.state``
from ``Requested`` into ``Written`` or ``Failed``. The worker checks
the message as it checks a shard's (storage allow-list, endpoint) and reads thumbnails only from the
job's own planned input shards, as recorded in Redis when the operator accepted the job: the shard
URIs in the metadata are the output's, and the output is the job owner's to write.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from embedjob import settings as settings_module
from embedjob.access import AccessPolicy
from embedjob.progress import ProgressStore
from embedjob.report import write_report
from embedjob.storage import Storage, StorageOptions

log = logging.getLogger("embedjob.worker")


def run_report(task: dict[str, Any], client: redis.Redis) -> dict[str, Any]:
    """Write the report of the job ``task["job"]`` under ``task["output"]``. Never raises: the outcome
    (``done`` with the URI, or ``failed`` with the error) is returned and logged."""
    try:
        job, output = str(task["job"]), str(task["output"])
        storage_options = task.get("storage") or {}
        policy = AccessPolicy.from_settings(settings_module.load())
        policy.check_endpoint("task storage.endpoint", storage_options.get("endpoint"))
        policy.check("task output", output)
        store = ProgressStore(client, job)
        accepted = store.accepted_spec() or {}
        if (accepted.get("output") or {}).get("uri") not in (None, output):
            raise ValueError(f"the report's output {output!r} is not the job's")
        inputs = {uri for _stem, uri in store.plan() or []}
        uri = write_report(output, Storage(StorageOptions.from_dict(storage_options)), inputs.__contains__)
    except Exception as e:  # noqa: BLE001 - a report is best effort: the job's outputs are complete
        log.error("report of job %s: %s", task.get("job"), e)
        error = f"{type(e).__name__}: {e}"
        _record(client, task.get("job"), "Failed", error=error[:500])
        return {"status": "failed", "error": error}
    log.info("report of job %s written to %s", job, uri)
    _record(client, job, "Written", uri=uri)
    return {"status": "done", "uri": uri}


def _record(client: redis.Redis, job: Any, state: str, **fields: Any) -> None:
    """The outcome for the operator (status.report.state); never fails the task."""
    if not isinstance(job, str) or not job:
        return
    try:
        ProgressStore(client, job).record_report(state, **fields)
    except Exception as e:  # noqa: BLE001 - Redis down: the status keeps saying Requested
        log.warning("report of job %s: cannot record its outcome: %s", job, e)
