"""The failure step of a tick: every failed attempt is counted once (embedjob.policy decides: retry
after a backoff, transient or hard, or give up; a permanent failure at once), and the job's fail-fast
check (the same access error on every shard tried so far)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from embedjob import policy
from embedjob.operator.events import Event
from embedjob.progress import ProgressStore
from embedjob.spec import JobSpec

log = logging.getLogger("embedjob.operator")


def count_failures(store: ProgressStore, spec: JobSpec, states: Mapping[str, str], now: float,
                   events: list[Event]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(info of every failed stem, the stems whose retry is due)."""
    failed = [s for s, v in states.items() if v == "failed"]
    infos = store.infos(failed) if failed else {}
    due: list[str] = []
    for stem in failed:
        info = infos[stem]
        dispatch_n = int(info.get("dispatch") or 0)
        if info.get("countedDispatch") != dispatch_n:  # an attempt not counted yet
            infos[stem] = info = _count(store, spec, stem, info, dispatch_n, now, events)
        if not info.get("final") and (info.get("retryAt") or 0) <= now:
            due.append(stem)
    return infos, due


def _count(store: ProgressStore, spec: JobSpec, stem: str, info: dict[str, Any], dispatch_n: int, now: float,
           events: list[Event]) -> dict[str, Any]:
    d = policy.on_failure(transient=bool(info.get("transient")), failures=int(info.get("failures") or 0),
                          transient_failures=int(info.get("transientFailures") or 0),
                          per_shard=spec.retries.perShard, backoff_base=spec.retries.backoffSeconds,
                          permanent=bool(info.get("permanent")))
    info = store.update_info(stem, failures=d.failures, transientFailures=d.transient_failures,
                             countedDispatch=dispatch_n, final=d.final, retryAt=None if d.final else now + d.delay)
    store.count_total("transientFailures" if d.transient_failures else "failures")
    if info.get("accessError"):
        store.record_access_error(stem, info.get("errorCode"), info.get("error"))
    if d.final:
        why = "a permanent error, not retried" if info.get("permanent") else f"failed {d.failures} time(s), giving up"
        events.append(Event("Warning", "ShardFailed", f"{stem}: {why}: {info.get('error')}"))
    elif d.transient_failures:
        log.warning("job %s: %s hit a transient error, retry in %.0fs: %s", store.job, stem, d.delay,
                    info.get("error"))
    return info


def fatal_error(store: ProgressStore, shards_to_do: int, succeeded_this_run: int) -> str:
    """The access error every shard tried so far failed with ("" when the job should go on)."""
    return policy.common_access_error(store.access_errors(), shards_to_do, succeeded_this_run) or ""
