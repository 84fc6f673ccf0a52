"""The failure policy: when a failed shard is retried, when it is given up, when the job fails.
Torch-free; the operator and the local runner (``embedjob run``) both decide with these functions.

- A **hard** failure (the shard itself is bad, or an error retrying cannot fix) consumes one of
  ``spec.retries.perShard`` retries; the next attempt waits ``backoff_seconds``.
- A **permanent** failure (a tar that cannot be parsed, not a tar at all, a missing object, 403, a
  truncated shard under ``onTruncatedShard: fail``) fails the shard at once: retrying cannot fix it.
- A **transient** failure (the object store was unreachable, answered 5xx or throttled after
  botocore's own retries) is retried with the same backoff but does not consume a retry, up to
  ``MAX_TRANSIENT_RETRIES`` in a row, its delay capped at 8 backoffs; after that it counts as hard
  (an outage that long is not transient any more).
- **Fail fast**: when the first shards of a job all fail with the same access error (403, bad
  credentials, missing bucket) and none succeeded, the job fails at once with that error instead
  of spending every retry of every shard on it.
- The job fails when more than ``spec.maxFailedShards`` shards have failed for good.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from embedjob.access import StorageNotAllowed
from embedjob.limits import OptionsNotAllowed
from embedjob.storage import StorageError

_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

MAX_BACKOFF = 3600.0
MAX_TRANSIENT_RETRIES = 20
TRANSIENT_MAX_DELAY = 300.0
# How many distinct shards must fail with the same access error (and none succeed) to fail the job.
FAIL_FAST_SHARDS = 3


class PermanentError(Exception):
    """A shard failure retrying cannot fix (the data itself is bad): the shard fails at once. The
    worker's own errors of this kind subclass it (a tar that cannot be parsed, a truncated shard the
    job refuses)."""

    code = "PermanentError"


def backoff_seconds(base: float, failures: int) -> float:
    """Exponential backoff: base, 2*base, 4*base, ... capped at an hour."""
    return float(min(MAX_BACKOFF, base * (2 ** max(0, failures - 1))))


@dataclass(frozen=True)
class Decision:
    """What to do after one failed attempt of a shard."""

    final: bool  # give up: the shard counts as failed
    delay: float  # seconds before the retry (when not final)
    failures: int  # hard failures so far (the retry budget used)
    transient_failures: int  # transient failures in a row


def on_failure(*, transient: bool, failures: int, transient_failures: int, per_shard: int,
               backoff_base: float, permanent: bool = False) -> Decision:
    """Decide after a failed attempt. ``failures`` / ``transient_failures`` are the counts BEFORE it.
    A ``permanent`` failure is final at once, whatever retries are left."""
    if permanent:
        return Decision(final=True, delay=0.0, failures=failures + 1, transient_failures=0)
    if transient and transient_failures < MAX_TRANSIENT_RETRIES:
        n = transient_failures + 1
        # An outage ends for every shard at once: keep polling at most every 8 backoffs (5 min at most),
        # so the job resumes soon after the store is back instead of after an hour of doubling.
        delay = min(backoff_seconds(backoff_base, n), max(backoff_base, 1.0) * 8, TRANSIENT_MAX_DELAY)
        return Decision(final=False, delay=delay, failures=failures, transient_failures=n)
    failures += 1
    final = failures > per_shard
    return Decision(final=final, delay=0.0 if final else backoff_seconds(backoff_base, failures),
                    failures=failures, transient_failures=0)


def job_failed(failed_shards: int, max_failed_shards: int) -> bool:
    return failed_shards > max_failed_shards


def common_access_error(failed_infos: Iterable[Mapping[str, Any]], total: int,
                        succeeded_this_run: int) -> str | None:
    """The error message when the job should fail fast: at least ``min(FAIL_FAST_SHARDS, total)``
    shards failed with the same access error code (``accessError`` set by the worker) and no shard
    succeeded in this run. None otherwise."""
    if succeeded_this_run > 0 or total <= 0:
        return None
    by_code: dict[str, list[str]] = {}
    for info in failed_infos:
        if info.get("accessError") and info.get("errorCode"):
            by_code.setdefault(str(info["errorCode"]), []).append(str(info.get("error") or ""))
    need = min(FAIL_FAST_SHARDS, total)
    for _code, errors in sorted(by_code.items(), key=lambda kv: -len(kv[1])):
        if len(errors) >= need:
            return errors[0]
    return None


def describe_failure(exc: BaseException) -> dict[str, Any]:
    """The failed outcome's fields: the error text, its code, and its class: ``transient`` (worth a
    retry that does not consume the shard's budget: network, 5xx, throttling, Redis), ``permanent``
    (retrying cannot fix it: the shard fails at once: a tar that cannot be parsed, a missing object,
    403), or neither (hard: retried with backoff); and whether it is an access error (bad
    credentials, missing bucket: the same for every shard, so the job fails fast)."""
    error = f"{type(exc).__name__}: {exc}"[:1000]
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, StorageError):
            return {"error": error, "errorCode": cause.code, "transient": cause.transient,
                    "permanent": cause.access_denied or cause.missing,
                    "accessError": cause.access_denied or cause.code == "NoSuchBucket"}
        if isinstance(cause, StorageNotAllowed):  # the same for every shard of the job: fail fast
            return {"error": error, "errorCode": "StorageNotAllowed", "transient": False, "permanent": True,
                    "accessError": True}
        if isinstance(cause, OptionsNotAllowed):  # beyond the worker's ceilings: the same for every shard
            return {"error": error, "errorCode": "OptionsNotAllowed", "transient": False, "permanent": True,
                    "accessError": True}
        if isinstance(cause, _REDIS_ERRORS):
            return {"error": error, "errorCode": type(cause).__name__, "transient": True, "permanent": False,
                    "accessError": False}
        if isinstance(cause, PermanentError | FileNotFoundError):  # bad data; a local shard that is gone
            return {"error": error, "errorCode": type(cause).__name__, "transient": False, "permanent": True,
                    "accessError": False}
        cause = cause.__cause__ or cause.__context__
    return {"error": error, "errorCode": type(exc).__name__, "transient": False, "permanent": False,
            "accessError": False}
