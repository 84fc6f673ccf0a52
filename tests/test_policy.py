"""The failure policy (embedjob.policy) and the worker's classification of errors (pure functions)."""

from __future__ import annotations

import redis

from embedjob import policy
from embedjob.policy import describe_failure
from embedjob.storage import StorageError
from embedjob.worker.datapath.read import SourceReadError


def test_backoff_doubles_and_is_capped():
    assert [policy.backoff_seconds(30, n) for n in (1, 2, 3)] == [30, 60, 120]
    assert policy.backoff_seconds(30, 40) == policy.MAX_BACKOFF


def test_hard_failures_consume_the_budget_transient_ones_do_not():
    d = policy.on_failure(transient=False, failures=0, transient_failures=0, per_shard=1, backoff_base=10)
    assert (d.final, d.failures, d.delay) == (False, 1, 10)
    d = policy.on_failure(transient=False, failures=1, transient_failures=0, per_shard=1, backoff_base=10)
    assert d.final and d.failures == 2
    d = policy.on_failure(transient=True, failures=1, transient_failures=2, per_shard=1, backoff_base=10)
    assert (d.final, d.failures, d.transient_failures, d.delay) == (False, 1, 3, 40)
    # an "outage" that never ends is a hard failure after all
    d = policy.on_failure(transient=True, failures=1, transient_failures=policy.MAX_TRANSIENT_RETRIES,
                          per_shard=1, backoff_base=10)
    assert d.final and d.transient_failures == 0


def test_fail_fast_needs_the_same_access_error_on_several_shards_and_no_success():
    denied = {"accessError": True, "errorCode": "403", "error": "HeadObject ...: 403"}
    assert policy.common_access_error([denied] * 2, total=10, succeeded_this_run=0) is None
    assert policy.common_access_error([denied] * 3, total=10, succeeded_this_run=0) == denied["error"]
    assert policy.common_access_error([denied], total=1, succeeded_this_run=0) == denied["error"]
    assert policy.common_access_error([denied] * 3, total=10, succeeded_this_run=1) is None
    other = {"accessError": False, "errorCode": "ValueError", "error": "not a tar"}
    assert policy.common_access_error([other] * 5, total=5, succeeded_this_run=0) is None


def test_worker_classifies_failures_through_wrapping_exceptions():
    denied = StorageError("GetObject", "s3://b/k.tar", "AccessDenied", "AccessDenied (HTTP 403)", transient=False)
    try:
        try:
            raise denied
        except StorageError as e:
            raise SourceReadError(f"reading the shard failed: {e}") from e
    except SourceReadError as wrapped:
        info = describe_failure(wrapped)
    assert info["errorCode"] == "AccessDenied" and info["accessError"] and not info["transient"]
    assert "GetObject s3://b/k.tar" in info["error"]
    down = StorageError("HeadObject", "s3://b/m.json", "EndpointConnectionError", "refused", transient=True)
    assert describe_failure(down)["transient"] and not describe_failure(down)["accessError"]
    assert describe_failure(redis.exceptions.ConnectionError("gone"))["transient"]
    bad = describe_failure(ValueError("not a tar"))
    assert not bad["transient"] and bad["errorCode"] == "ValueError" and bad["error"] == "ValueError: not a tar"


def test_transient_retries_keep_polling_instead_of_doubling_forever():
    delays = []
    n = 0
    for _ in range(8):
        d = policy.on_failure(transient=True, failures=0, transient_failures=n, per_shard=3, backoff_base=30)
        delays.append(d.delay)
        n = d.transient_failures
    assert delays == [30, 60, 120, 240, 240, 240, 240, 240]


def test_storage_errors_survive_pickling():
    import pickle

    e = StorageError("GetObject", "s3://b/k", "SlowDown", "SlowDown (HTTP 503)", transient=True)
    back = pickle.loads(pickle.dumps(e))
    assert (back.op, back.uri, back.code, back.transient, str(back)) == (e.op, e.uri, e.code, True, str(e))


def test_permanent_failures_fail_at_once_whatever_retries_are_left():
    d = policy.on_failure(transient=False, permanent=True, failures=0, transient_failures=0, per_shard=3,
                          backoff_base=30)
    assert d.final and d.delay == 0 and d.failures == 1


def test_each_failure_class():
    """Permanent: unparseable tar, not a tar, missing object, 403, a local shard that is gone.
    Transient: network, 5xx, throttling, Redis. Hard (retried with backoff): anything else."""
    from embedjob.worker.datapath.read import TarOpenError

    def cls(e: BaseException) -> str:
        d = describe_failure(e)
        assert not (d["permanent"] and d["transient"])
        return "permanent" if d["permanent"] else "transient" if d["transient"] else "hard"

    missing = StorageError("GetObject", "s3://b/k.tar", "NoSuchKey", "NoSuchKey (HTTP 404)", transient=False)
    denied = StorageError("GetObject", "s3://b/k.tar", "AccessDenied", "AccessDenied (HTTP 403)", transient=False)
    assert cls(TarOpenError("not a readable tar: bad header")) == "permanent"
    assert cls(missing) == "permanent" and cls(denied) == "permanent"
    assert cls(SourceReadError("reading the shard failed")) == "hard"
    try:
        try:
            raise missing
        except StorageError as e:
            raise SourceReadError(str(e)) from e
    except SourceReadError as wrapped:
        assert cls(wrapped) == "permanent"
    assert cls(FileNotFoundError(2, "No such file", "/data/x.tar")) == "permanent"
    for code in ("SlowDown", "503", "EndpointConnectionError"):
        assert cls(StorageError("GetObject", "s3://b/k", code, code, transient=True)) == "transient"
    assert cls(redis.exceptions.ConnectionError("gone")) == "transient"
    assert cls(RuntimeError("CUDA error")) == "hard"
