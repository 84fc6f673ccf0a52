"""Metrics without a cluster: the operator's collector renders the statuses it was given (per job,
dropped on delete, demand = waiting + running); the JSON logs' shard context. The worker's metrics
are in tests/worker/test_metrics.py."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from embedjob.operator.metrics import OperatorMetrics, demand


def samples(metrics: OperatorMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def status(phase: str, queued: int, running: int, succeeded: int = 0, failed: int = 0, **extra) -> dict:
    return {"phase": phase, "shards": {"total": queued + running + succeeded + failed, "queued": queued,
                                       "running": running, "succeeded": succeeded, "failed": failed},
            "images": {"embedded": 10 * succeeded + 7, "embeddedThisRun": 10 * succeeded, "failed": 1},
            "attempts": {"failures": 2, "transientFailures": 3, "leaseExpiries": 4, "messagesLost": 5}, **extra}


def test_demand_is_waiting_plus_running_and_zero_only_when_nothing_is_left():
    assert demand(status("Pending", 5, 0)) == 5
    assert demand(status("Running", 3, 2, 1)) == 5
    assert demand(status("Running", 0, 1, 9)) == 1  # the Redis list is empty, a worker still holds one
    assert demand(status("Suspended", 4, 1)) == 1  # nothing new is dispatched; the running one finishes
    assert demand(status("Succeeded", 0, 0, 10)) == 0
    assert demand(status("Failed", 3, 0, 1, 5)) == 0
    assert demand({}) == 0


def test_collector_renders_each_job_and_drops_a_deleted_one():
    m = OperatorMetrics()
    m.jobs.update("ns", "a", "uid-a", "gpu", status("Running", 3, 2, 1,
                                                    estimatedCompletionTime="2030-01-01T00:00:00Z"), dispatched=6)
    m.jobs.update("ns", "b", "uid-b", None, status("Succeeded", 0, 0, 4))
    m.jobs.update("ns", "a", "uid-a", "gpu", status("Running", 2, 2, 2), dispatched=1)
    m.tick_seconds.observe(0.02)
    s = samples(m)
    a = (("name", "a"), ("namespace", "ns"))
    assert s[("embedjob_job_shards", (*a, ("state", "running")))] == 2
    assert s[("embedjob_job_shards", (*a, ("state", "succeeded")))] == 2
    assert s[("embedjob_job_planned_shards", a)] == 6
    assert s[("embedjob_job_images_embedded_total", a)] == 20
    assert s[("embedjob_job_images_skipped_total", a)] == 1
    assert s[("embedjob_job_shard_failures_total", a)] == 2
    assert s[("embedjob_job_shard_transient_failures_total", a)] == 3
    assert s[("embedjob_job_lease_expiries_total", a)] == 4
    assert s[("embedjob_job_messages_lost_total", a)] == 5
    assert s[("embedjob_job_shards_dispatched_total", a)] == 7
    assert s[("embedjob_job_phase", (*a, ("phase", "Running")))] == 1
    assert s[("embedjob_job_phase", (*a, ("phase", "Succeeded")))] == 0
    assert ("embedjob_job_estimated_completion_timestamp_seconds", a) not in s  # the latest status has none
    assert s[("embedjob_jobs", (("phase", "Running"),))] == 1
    assert s[("embedjob_jobs", (("phase", "Succeeded"),))] == 1
    assert s[("embedjob_queue_demand_shards", (("queue", "gpu"),))] == 4
    assert s[("embedjob_queue_demand_shards", (("queue", "embedjob"),))] == 0
    assert s[("embedjob_operator_reconcile_duration_seconds_count", ())] == 1
    # no label anywhere names a shard
    assert all(k not in dict(labels) for (_, labels) in s for k in ("shard", "stem"))

    m.jobs.forget("ns", "a")
    s = samples(m)
    assert not [k for k in s if ("name", "a") in k[1]]
    assert ("embedjob_queue_demand_shards", (("queue", "gpu"),)) not in s  # no job on it any more
    assert s[("embedjob_jobs", (("phase", "Running"),))] == 0


def test_a_recreated_job_under_the_same_name_starts_its_counters_from_zero():
    m = OperatorMetrics()
    m.jobs.update("ns", "a", "uid-1", None, status("Running", 1, 0), dispatched=5)
    m.jobs.update("ns", "a", "uid-2", None, status("Pending", 1, 0), dispatched=1)
    s = samples(m)
    assert s[("embedjob_job_shards_dispatched_total", (("name", "a"), ("namespace", "ns")))] == 1
    assert s[("embedjob_job_info", (("name", "a"), ("namespace", "ns"), ("queue", "embedjob"), ("uid", "uid-2")))] == 1


def test_queue_length_is_llen_over_the_priority_lists(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    q = "metrics-unit-q"
    r.delete(q, f"{q}\x06\x163")
    r.rpush(q, "a", "b")
    r.rpush(f"{q}\x06\x163", "c")
    m = OperatorMetrics(r)
    m.jobs.update("ns", "a", "u", q, status("Running", 3, 0))
    assert samples(m)[("embedjob_queue_messages", (("queue", q),))] == 3
    r.delete(q, f"{q}\x06\x163")


def test_json_logs_carry_the_shard_context_from_every_thread():
    import io
    import json
    import logging
    import threading

    from embedjob import logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    log = logging.getLogger("embedjob.test.jsonlogs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        with logs.shard_context(job="uid-1", shard="s3://b/in/0001.tar", stem="0001", attempt=2, worker="h:1:ab"):
            log.info("in the task")
            t = threading.Thread(target=lambda: log.warning("in a decode thread"))
            t.start()
            t.join()
        log.info("after the shard")
    finally:
        log.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [x["message"] for x in lines] == ["in the task", "in a decode thread", "after the shard"]
    for x in lines[:2]:
        assert (x["job"], x["shard"], x["stem"], x["attempt"], x["worker"]) == \
            ("uid-1", "s3://b/in/0001.tar", "0001", 2, "h:1:ab")
    assert "job" not in lines[2] and lines[2]["level"] == "INFO"


def test_log_format_setting_is_checked():
    import pytest

    from embedjob.settings import Settings

    assert Settings.from_env({"EMBEDJOB_LOG_FORMAT": "json"}).log_format == "json"
    assert Settings.from_env({}).log_format == "text"
    with pytest.raises(ValueError, match="EMBEDJOB_LOG_FORMAT"):
        Settings.from_env({"EMBEDJOB_LOG_FORMAT": "xml"})


def test_log_context_follows_the_thread_when_two_shards_are_in_flight():
    import logging
    import threading

    from embedjob import logs

    seen: dict[str, str] = {}
    started, release = threading.Barrier(2), threading.Event()

    def shard(stem: str) -> None:
        with logs.shard_context(job="j", stem=stem):
            started.wait()
            record = logging.LogRecord("t", logging.ERROR, __file__, 1, "x", None, None)
            logs.ContextFilter().filter(record)
            seen[stem] = record.stem
            release.wait(5)

    threads = [threading.Thread(target=shard, args=(s,)) for s in ("0001", "0009")]
    for t in threads:
        t.start()
    import time

    time.sleep(0.2)
    release.set()
    for t in threads:
        t.join()
    assert seen == {"0001": "0001", "0009": "0009"}
