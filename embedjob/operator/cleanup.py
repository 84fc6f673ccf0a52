"""Deleting a job: stop its workers (the control flag), remove its queued tasks and its Redis keys. The
outputs are kept. Never blocks the deletion: after bounded retries the finalizer is released anyway."""

from __future__ import annotations

import logging
import time

from embedjob.progress import ProgressStore

log = logging.getLogger("embedjob.operator")

# A deleted job's control flag outlives its other keys so that late messages are still dropped.
DELETED_FLAG_TTL = 7 * 24 * 3600


def cleanup(store: ProgressStore, queue: str, attempts: int = 3, delay: float = 1.0) -> tuple[bool, str]:
    """Returns (ok, message) and never raises, so deletion never hangs on Redis."""
    last = ""
    for i in range(attempts):
        try:
            store.set_control("deleted", ttl=DELETED_FLAG_TTL)
            store.unregister_job(queue)
            removed = store.remove_queued_tasks(queue)
            keys = store.delete_all(keep=("control",))
            return True, f"removed {removed} queued task(s) and {keys} Redis key(s); outputs kept"
        except Exception as e:  # noqa: BLE001 - any Redis error: retry a bounded number of times
            last = f"{type(e).__name__}: {e}"
            log.warning("cleanup of %s failed (attempt %d/%d): %s", store.job, i + 1, attempts, last)
            if i + 1 < attempts:
                time.sleep(delay * (2**i))
    return False, f"could not clean Redis after {attempts} attempts ({last}); released anyway"
